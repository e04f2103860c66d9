"""Parallel labelling: k workers vs one, side by side in one run.

A batch of rattled methanol molecules labelled with PySCF (PBE/def2-SVP, density fitting, the
quickstart's level of theory) through :func:`ionflow.dft_adapters.pool.label_stream`, as a
campaign's label step does:

* 1 worker x 1 thread  (the baseline)
* 2 workers x 1 thread (the goal: >= 1.8x on 2 cores)
* 1 worker x 2 threads (PySCF's own OpenMP threading, for comparison)

Every configuration starts its worker processes inside the timed region (their start-up,
importing PySCF, is part of the cost), and all of them label the same structures. The order of
configurations rotates between repeats; the median wall time is reported. The energies of all
configurations must agree (the check fails loudly otherwise).

Usage: python benchmarks/labelling_parallel.py [--n 12] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date

import numpy as np
from ase.build import molecule

from ionflow.dft_adapters.pool import label_stream
from ionflow.platform.structures import rattled, with_charge_state

SETTINGS = {"xc": "pbe", "basis": "def2-svp", "density_fit": True}
CONFIGS = [("1 worker x 1 thread", 1, 1), ("2 workers x 1 thread", 2, 1), ("1 worker x 2 threads", 1, 2)]


def structures(n: int):
    return rattled(with_charge_state(molecule("CH3OH"), 0, 1), n, stdev=0.05, seed=0)


def run(frames, workers: int, threads: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    # a timeout makes even one worker run in its own process, as every configuration here does
    results = dict(label_stream("pyscf", SETTINGS, frames, workers=workers, threads=threads, timeout_s=3600))
    elapsed = time.perf_counter() - start
    assert all(r.ok for r in results.values()), [r.error for r in results.values() if not r.ok]
    return elapsed, np.array([results[i].energy for i in range(len(frames))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12, help="structures per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the numbers here too")
    args = parser.parse_args()

    frames = structures(args.n)
    times: dict[str, list[float]] = {name: [] for name, _, _ in CONFIGS}
    energies = {}
    for r in range(args.repeats):
        order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
        for name, workers, threads in order:
            elapsed, e = run(frames, workers, threads)
            times[name].append(elapsed)
            energies[name] = e
            print(f"repeat {r + 1}: {name}: {elapsed:.2f} s", flush=True)
    base = energies[CONFIGS[0][0]]
    for name, e in energies.items():
        assert np.allclose(e, base, atol=1e-6), f"{name} gives other energies"

    median = {name: statistics.median(t) for name, t in times.items()}
    serial = median[CONFIGS[0][0]]
    print(
        f"\n{platform.machine()}, {os.cpu_count()} cores, {date.today()}, {args.n} x CH3OH PBE/def2-SVP, "
        f"median of {args.repeats}"
    )
    print("| configuration | wall (s) | per structure (s) | speed-up vs 1x1 |")
    print("| --- | --- | --- | --- |")
    for name, _, _ in CONFIGS:
        print(f"| {name} | {median[name]:.2f} | {median[name] / args.n:.2f} | {serial / median[name]:.2f}x |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"n": args.n, "repeats": args.repeats, "times": times, "median": median}, handle, indent=2)


if __name__ == "__main__":
    main()
