"""Cost of the diverse selection strategy against the number of atoms, next to the descriptor check.

One selection step as a campaign makes it: 20 candidate frames (spreads drawn in the trust
window, so all are candidates), 50 labelled frames, 6 frames per iteration. Systems: periodic
NaCl-in-water boxes at liquid density (``electrostatics_cost.nacl_in_water``: H, O, Na, Cl) of
~100, ~370 and ~1000 atoms, each frame a 0.05 Å rattle of the box. Model: a tiny untrained
committee (2 members, 8x0e+8x1o, 2 layers, r_max 4 Å, float64); only its first member's
backbone runs (no forces).

Timed, each once per size after a warm-up on the smallest box:
  diverse      ``select_diverse`` in full, and within it the environments (the model's forward
               passes on the 70 frames, timed by wrapping the function) — the rest is
               farthest-point sampling and the blocked distances to the reference;
  uncertainty  ``select`` with its all-pairs distance descriptor (``min_distance`` 0.02 Å): N(N-1)/2
               sorted distances per frame, compared candidate by candidate with every labelled frame.

Usage: python benchmarks/selection_scaling.py [--sizes 96 384 1000] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from electrostatics_cost import E0, Z_TABLE, nacl_in_water  # noqa: E402

from ionflow.config import ModelConfig  # noqa: E402
from ionflow.platform import selection  # noqa: E402
from ionflow.platform.environments import environments  # noqa: E402
from ionflow.platform.model import Committee, ModelSpec  # noqa: E402
from ionflow.platform.selection import select, select_diverse  # noqa: E402
from ionflow.platform.structures import rattled  # noqa: E402

CANDIDATES, LABELLED, PER_ITERATION = 20, 50, 6
WINDOW = dict(threshold=0.05, ceiling=1.0, per_iteration=PER_ITERATION)


def tiny_committee() -> Committee:
    hyper = ModelConfig(
        ensemble_size=2, hidden_irreps="8x0e+8x1o", mlp_irreps="8x0e", num_interactions=2, dtype="float64"
    ).hyper()
    spec = ModelSpec(hyper=hyper, z_table=Z_TABLE, atomic_energies=E0, avg_num_neighbors=10.0, seeds=[1, 2])
    return Committee(spec).eval()


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def measure(ensemble: Committee, n_atoms: int) -> dict:
    box = nacl_in_water(n_atoms, seed=0)
    frames = rattled(box, CANDIDATES + LABELLED, 0.05, seed=1)
    candidates, labelled = frames[:CANDIDATES], frames[CANDIDATES:]
    scores = np.random.default_rng(2).uniform(0.1, 0.9, CANDIDATES)
    spent = [0.0]

    def environments_timed(*args, **kwargs):  # the forward passes inside select_diverse
        seconds, out = timed(environments, *args, **kwargs)
        spent[0] += seconds
        return out

    selection.environments = environments_timed
    try:
        t_diverse, decisions = timed(
            select_diverse, candidates, scores, ensemble, min_novelty=0.1, labelled=labelled, **WINDOW
        )
    finally:
        selection.environments = environments
    t_env = spent[0]
    t_descriptor, _ = timed(select, candidates, scores, min_distance=0.02, labelled=labelled, **WINDOW)
    return {
        "atoms": len(box),
        "diverse_s": t_diverse,
        "environments_s": t_env,
        "descriptor_s": t_descriptor,
        "chosen": sum(d.chosen for d in decisions),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 384, 1000])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ensemble = tiny_committee()
    measure(ensemble, min(args.sizes))  # warm-up: TorchScript kernels, first allocations
    rows = [measure(ensemble, n) for n in args.sizes]
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({args.threads} threads), {date.today()}"
    )
    print("| atoms | diverse (s) | of which environments (s) | descriptor check (s) | diverse per atom (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        per_atom = 1e3 * r["diverse_s"] / r["atoms"]
        print(
            f"| {r['atoms']} | {r['diverse_s']:.2f} | {r['environments_s']:.2f} | {r['descriptor_s']:.2f} | "
            f"{per_atom:.2f} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
