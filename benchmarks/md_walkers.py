"""Batched MD walkers vs one walker at a time, side by side in one run.

ionflow moves all walkers of an iteration together (one committee call per step for all
of them). This measures what that buys over running the same walkers one after another,
with the quickstart's committee (3 MACE members, 16x0e+16x1o, 2 layers) on H5O2+.
Usage: python benchmarks/md_walkers.py [--walkers 4] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date

import torch
from ase import Atoms

from ionflow.config import ModelConfig
from ionflow.platform.md import run_walkers
from ionflow.platform.model import Committee, ModelSpec
from ionflow.platform.structures import rattled, with_charge_state

ZUNDEL = [
    ("O", (0.0, 0.0746, 1.2269)),
    ("O", (0.0, -0.0746, -1.2269)),
    ("H", (0.0, 0.0, 0.0)),
    ("H", (0.7888, 0.5146, 1.5803)),
    ("H", (-0.7888, 0.5146, 1.5803)),
    ("H", (0.7888, -0.5146, -1.5803)),
    ("H", (-0.7888, -0.5146, -1.5803)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--walkers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    args = parser.parse_args()
    start = with_charge_state(Atoms([s for s, _ in ZUNDEL], positions=[p for _, p in ZUNDEL]), 1, 1)
    spec = ModelSpec(
        hyper=ModelConfig(dtype=args.dtype).hyper(), z_table=[1, 8], atomic_energies=[-13.6, -2041.0], scale=3.0
    )
    committee = Committee(spec)
    starts = rattled(start, args.walkers, 0.02, seed=0)
    md = dict(
        steps=args.steps,
        timestep_fs=0.5,
        temperature_K=350.0,
        friction_per_fs=0.02,
        sample_every=10,
        stop_uncertainty=1e9,
    )

    run_walkers(committee, starts[:1], **{**md, "steps": 5}, seed=0)  # warm-up (TorchScript, allocations)
    t0 = time.perf_counter()
    run_walkers(committee, starts, **md, seed=1)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    for w, atoms in enumerate(starts):
        run_walkers(committee, [atoms], **md, seed=2 + w)
    sequential = time.perf_counter() - t0

    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "system": f"H5O2+ (7 atoms), 3-member committee, {args.dtype}",
        "walkers": args.walkers,
        "steps": args.steps,
        "batched_s": round(batched, 3),
        "sequential_s": round(sequential, 3),
        "ms_per_step_batched": round(1000 * batched / args.steps, 2),
        "speedup": round(sequential / batched, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
