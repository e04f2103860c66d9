"""Overhead of labelling through AiiDA against the local pool, on the localhost computer.

The same N structures (water molecules with small displacements, GFN2-xTB through tblite: ~10 ms
each, so that the overhead is what is measured) are labelled

* locally: ``label_stream`` on one worker process (as a campaign's label step with workers: 1);
* through AiiDA: ``ionflow.label`` jobs of ``batch`` structures each on a ``core.local`` +
  ``core.direct`` computer, submitted to the profile's daemon, from submission until every job
  has terminated and its results are read back (what the campaign's label step waits for).

Overhead per calculation = (AiiDA time - local time) / N; per job = (AiiDA - local) / jobs.
Each job starts a fresh ``ionflow label-batch`` process (Python, numpy, ase, the adapter's
import), which the local pool pays once.

Usage: python benchmarks/aiida_dispatch.py --profile P [--computer localhost] [--code ionflow]
       [--n 24] [--batches 1 6 24]
(the profile needs a broker and a running daemon, and the code must be this environment's
``ionflow`` on that computer; see the README's "Reference calculations on a cluster")
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date

import numpy as np
from ase.build import molecule

from ionflow.dft_adapters.base import LabelResult
from ionflow.dft_adapters.batch import atoms_text, batch_parameters, structures_text
from ionflow.dft_adapters.pool import label_stream


def structures(n: int) -> list:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        atoms = molecule("H2O")
        atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
        atoms.info.update(charge=0, multiplicity=1)
        out.append(atoms)
    return out


def local(frames: list) -> float:
    start = time.perf_counter()
    results = list(label_stream("tblite", {}, frames, workers=1, threads=1, timeout_s=600))
    assert all(r.ok for _, r in results)
    return time.perf_counter() - start


def through_aiida(frames: list, batch: int, target, dispatch) -> float:  # noqa: ANN001
    params = batch_parameters("tblite", {}, workers=1, threads=1, timeout_s=600)
    missing = LabelResult(status="failed", code="tblite", code_version="", settings_hash="", wall_time_s=0.0)
    start = time.perf_counter()
    nodes = []
    for k in range(0, len(frames), batch):
        chunk = frames[k : k + batch]
        text = structures_text(atoms_text(a) for a in chunk)
        node = dispatch.submit_batch(target, dispatch.new_key(), params, text, "benchmark", {"ionflow_benchmark": 1})
        nodes.append((node, len(chunk)))
    ok = 0
    for node, n in nodes:
        while (out := dispatch.outcome(node, n, target.computer.label, missing)) is None:
            time.sleep(0.05)
        ok += sum(r.ok for r in out.results.values())
    elapsed = time.perf_counter() - start
    assert ok == len(frames), f"{ok} of {len(frames)} ok"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None)
    parser.add_argument("--computer", default="localhost")
    parser.add_argument("--code", default="ionflow")
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 6, 24])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ionflow.dft_adapters.aiida import dispatch

    target = dispatch.check_target(args.profile, args.computer, args.code, {})
    dispatch.ensure_daemon()
    frames = structures(args.n)
    local(frames[:2])  # warm-up: imports
    t_local = local(frames)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; date {date.today()}")
    print(
        f"computer {args.computer}: {target.computer.transport_type} + {target.computer.scheduler_type}, "
        f"job poll interval {target.computer.get_minimum_job_poll_interval()} s"
    )
    print(f"local pool, 1 worker: {t_local:.2f} s for {args.n} ({1000 * t_local / args.n:.1f} ms each)")
    print("| structures per job | jobs | AiiDA (s) | local (s) | ratio | overhead per calculation (s) | per job (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for batch in args.batches:
        jobs = -(-args.n // batch)
        t = through_aiida(frames, batch, target, dispatch)
        over = t - t_local
        print(
            f"| {batch} | {jobs} | {t:.2f} | {t_local:.2f} | {t / t_local:.1f} | {over / args.n:.2f} | {over / jobs:.2f} |"
        )


if __name__ == "__main__":
    main()
