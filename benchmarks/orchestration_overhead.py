"""Orchestration and database overhead as a share of a campaign's wall time.

Runs a campaign file (default: the quickstart, PySCF on 2 workers) through the real Prefect
flow against a temporary local Prefect server, in a fresh campaign folder, and splits its
wall time:

* tasks: the sum of the top-level task runs' durations, from Prefect's API (the steps run one
  after another, so their sum is the time spent inside steps);
* orchestration: flow wall time minus that sum: flow and task creation, state changes,
  the hand-over between steps;
* database: time spent executing SQL in the flow's process (SQLAlchemy cursor events on
  every engine), which is inside the tasks;
* overhead = orchestration + database, as a share of the flow's wall time.

The temporary server's start (once per ``ionflow run``; none with a long-running server) is
reported apart.

With ``--server-db URL`` (e.g. ``postgresql+asyncpg://postgres@127.0.0.1:5432/prefect_bench``)
the flow talks to a ``prefect server start`` on 127.0.0.1 backed by that database, as on a
cluster, instead of the temporary SQLite-backed server.

Usage: python benchmarks/orchestration_overhead.py [CAMPAIGN.yaml] [--server-db URL]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import date
from pathlib import Path

import yaml

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="ionflow-bench-prefect-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")


@contextlib.contextmanager
def real_server(database_url: str):
    """``prefect server start`` on a free port of 127.0.0.1 with ``database_url``; sets PREFECT_API_URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PREFECT_API_DATABASE_CONNECTION_URL=database_url)
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        for _ in range(240):
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2):
                break
            time.sleep(0.5)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: url}):
            yield
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("campaign", nargs="?", default=str(Path(__file__).parents[1] / "examples" / "quickstart.yaml"))
    parser.add_argument("--server-db", help="run a real Prefect server on this database instead of the temporary one")
    args = parser.parse_args()
    source = Path(args.campaign)
    work = Path(tempfile.mkdtemp(prefix="ionflow-bench-"))
    config = yaml.safe_load(source.read_text())
    config["workdir"] = str(work / "runs")
    path = work / "campaign.yaml"
    path.write_text(yaml.safe_dump(config))

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.testing.utilities import prefect_test_harness
    from sqlalchemy import Engine, event

    sql = {"seconds": 0.0, "statements": 0}

    @event.listens_for(Engine, "before_cursor_execute")
    def _start(conn, cursor, statement, parameters, context, executemany):
        conn.info.setdefault("ionflow_t", []).append(time.perf_counter())

    @event.listens_for(Engine, "after_cursor_execute")
    def _end(conn, cursor, statement, parameters, context, executemany):
        sql["seconds"] += time.perf_counter() - conn.info["ionflow_t"].pop()
        sql["statements"] += 1

    t = time.perf_counter()
    server = real_server(args.server_db) if args.server_db else prefect_test_harness(server_startup_timeout=120)
    with server:
        server_s = time.perf_counter() - t
        from ionflow.db import Campaign, make_engine, session_factory, session_scope
        from ionflow.flows.campaign import campaign_flow

        t = time.perf_counter()
        summary = campaign_flow(str(path))
        wall = time.perf_counter() - t
        sql_during_flow = dict(sql)
        from sqlalchemy import select

        engine = make_engine(summary["database_url"])
        with session_scope(session_factory(engine)) as session:
            flow_run_id = session.scalar(select(Campaign.prefect_flow_run_id))
        engine.dispose()
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            flow_run = client.read_flow_run(flow_run_id)
    top = [r for r in runs if r.start_time and r.end_time]
    tasks_s = sum((r.end_time - r.start_time).total_seconds() for r in top)
    flow_s = (flow_run.end_time - flow_run.start_time).total_seconds() if flow_run.end_time else wall
    orchestration = wall - tasks_s
    overhead = orchestration + sql_during_flow["seconds"]
    print(f"\n{date.today()}, {os.cpu_count()} cores: {config['name']} ({summary['stop_reason']})")
    print("| quantity | seconds | share of the flow's wall time |")
    print("| --- | --- | --- |")
    print(f"| flow wall time (campaign_flow call) | {wall:.1f} | 100% |")
    print(f"| flow run per Prefect (start to end) | {flow_s:.1f} | |")
    print(f"| inside the {len(top)} task runs | {tasks_s:.1f} | {100 * tasks_s / wall:.1f}% |")
    print(f"| orchestration (wall - tasks) | {orchestration:.2f} | {100 * orchestration / wall:.2f}% |")
    print(
        f"| database: {sql_during_flow['statements']} SQL statements | {sql_during_flow['seconds']:.2f} | {100 * sql_during_flow['seconds'] / wall:.2f}% |"
    )
    print(f"| **overhead (orchestration + database)** | {overhead:.2f} | **{100 * overhead / wall:.2f}%** |")
    backend = (
        f"prefect server on {args.server_db.split('@')[-1]}" if args.server_db else "temporary SQLite-backed server"
    )
    print(f"| server start ({backend}; once per `ionflow run`) | {server_s:.1f} | |")
    ordered = sorted(top, key=lambda r: r.start_time)
    edges = [(flow_run.start_time, "flow start")] + [(r.end_time, r.name) for r in ordered]
    gaps = [((r.start_time - prev).total_seconds(), f"{name} -> {r.name}") for (prev, name), r in zip(edges, ordered)]
    gaps.append(((flow_run.end_time - ordered[-1].end_time).total_seconds(), f"{ordered[-1].name} -> flow end"))
    print(
        "\nlargest gaps between task runs (s):",
        ", ".join(f"{g:.2f} ({what})" for g, what in sorted(gaps, reverse=True)[:6]),
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
