"""Server time of each dashboard page on the lineage benchmark's database (100k structures).

The database of ``benchmarks/lineage_query.py``: 100 iterations x 10 MD runs x 100 sampled frames
(100,000 structures, memberships and selection decisions), 1,020 labels, 101 models in a parent
chain. Each page of ``ionflow ui`` is requested through the app (Starlette's test client, no
network) and its server time read from the ``Server-Timing`` header the app sets; median of
repeats after one warm-up. Goal: every page <= 300 ms. Pages that need model files (parity, the 3D
view's predictions) are not part of it: the benchmark database has none.

Usage: python benchmarks/ui_pages.py [--postgres URL] [--repeats 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from datetime import date
from pathlib import Path

from starlette.testclient import TestClient

sys.path.insert(0, str(Path(__file__).parent))
from lineage_query import databases, populate  # noqa: E402

from ionflow.ui.app import create_app  # noqa: E402

PAGES = {
    "campaigns": "/",
    "campaign (newest iteration's 1,000 decisions)": "/campaign/1",
    "campaign, iteration 50": "/campaign/1?iteration=50",
    "model v100 (1,020 labels, 100 parents)": "/model/101",
    "structure (a chosen MD frame)": "/structure/21",
    "live state (polled every 3 s)": "/api/campaign/1/state",
}


def measure(url: str, repeats: int) -> dict[str, float]:
    client = TestClient(create_app(url))
    out = {}
    for name, path in PAGES.items():
        times = []
        for r in range(repeats + 1):
            response = client.get(path)
            assert response.status_code == 200, (path, response.status_code, response.text[:300])
            if r:
                times.append(float(response.headers["server-timing"].split("dur=")[1]))
        out[name] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default=os.environ.get("IONFLOW_TEST_POSTGRES_URL"))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    results = {}
    for name, url in databases(args.postgres, "ui"):
        populate(url)
        results[name] = measure(url, args.repeats)
    names = list(results)
    print(f"\n{date.today()}: server time per page (ms), median of {args.repeats}, 100,000 structures")
    print("| page | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for name in PAGES:
        print(f"| {name} | " + " | ".join(f"{results[d][name]:.1f}" for d in names) + " |")
    slowest = max(max(r.values()) for r in results.values())
    print(f"slowest page: {slowest:.1f} ms (goal <= 300 ms)")


if __name__ == "__main__":
    main()
