"""Cost of the electrostatic head: one energy+forces evaluation, equilibrated vs local.

One committee member (``Member.forward``: MACE backbone, charge head, Fukui equilibration,
periodic Coulomb energy, forces by autograd) of the default backbone (r_max 4 Å,
16x0e+16x1o, 2 layers, float64) with ``electrostatics: equilibrated`` against the same
member with ``electrostatics: none``, on periodic NaCl-in-water boxes of ~100, ~1000 and
~10000 atoms at liquid density (1 molecule per 3.1 Å cube, randomly oriented, no two atoms
of different molecules closer than 1.7 Å), charge 0. The graph is built once per size;
what is timed is ``member(batch)`` (energy and forces), after a warm-up, median of repeats.
Usage: python benchmarks/electrostatics_cost.py [--sizes 100 1000 10000] [--repeats 9 5 2] [--threads N]
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
import torch
from ase import Atoms
from scipy.spatial.transform import Rotation

from ionflow.config import ModelConfig
from ionflow.platform.model import Committee, ModelSpec
from ionflow.platform.model.graph import build_batch
from ionflow.platform.structures import with_charge_state

SPACING = 3.1  # Å per molecule: 1/3.1³ = 0.0336 molecules/Å³, liquid water
WATER = np.array([[0.0, 0.0, 0.0], [0.7572, 0.5865, 0.0], [-0.7572, 0.5865, 0.0]])  # O, H, H (Å)
Z_TABLE = [1, 8, 11, 17]
E0 = [-13.6, -2041.0, -4400.0, -12500.0]  # rough per-element energies (eV): cost does not depend on them


def grid_shape(n_atoms: int) -> tuple[int, int, int]:
    """A near-cubic grid of molecule sites holding ~n_atoms/3 molecules."""
    sites = max(8, round(n_atoms / 3))
    a = max(2, round(sites ** (1 / 3)))
    b = max(2, round((sites / a) ** 0.5))
    c = max(2, round(sites / (a * b)))
    return a, b, c


def nacl_in_water(n_atoms: int, seed: int = 0) -> Atoms:
    """Periodic box of randomly oriented H2O with one Na+/Cl- pair per ~100 molecules, charge 0."""
    rng = np.random.default_rng(seed)
    shape = grid_shape(n_atoms)
    cell = np.diag(np.array(shape) * SPACING)
    sites = (np.stack(np.meshgrid(*[np.arange(k) for k in shape], indexing="ij"), -1).reshape(-1, 3) + 0.5) * SPACING
    sites += rng.normal(scale=0.1, size=sites.shape)
    n_pairs = max(1, len(sites) // 100)
    ions = rng.choice(len(sites), size=2 * n_pairs, replace=False)
    kind = {int(s): ("Na" if k < n_pairs else "Cl") for k, s in enumerate(ions)}
    grid = np.stack(np.unravel_index(np.arange(len(sites)), shape), -1)  # integer site coordinates
    offsets = np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3)
    box = np.diag(cell)
    placed = np.full((len(sites), 3, 3), np.nan)  # atoms of each site once placed (ions: 1 row)
    symbols: list[str] = []
    for s, centre in enumerate(sites):
        near = np.ravel_multi_index(((grid[s] + offsets) % shape).T, shape)
        others = placed[near].reshape(-1, 3)
        others = others[~np.isnan(others[:, 0])]
        if s in kind:
            symbols.append(kind[s])
            placed[s, 0] = centre
            continue
        for _ in range(500):  # random orientation, no clash with the neighbours already placed
            molecule = Rotation.random(random_state=int(rng.integers(1 << 31))).apply(WATER) + centre
            d = molecule[:, None, :] - others[None, :, :]
            d -= np.round(d / box) * box  # minimum image, orthorhombic
            if len(others) == 0 or np.sqrt((d**2).sum(-1)).min() > 1.7:
                break
        symbols += ["O", "H", "H"]
        placed[s] = molecule
    positions = placed.reshape(-1, 3)
    positions = positions[~np.isnan(positions[:, 0])]
    atoms = Atoms(symbols, positions=positions, cell=cell, pbc=True)
    atoms.wrap()
    return with_charge_state(atoms, 0, 1)


def min_distance(atoms: Atoms) -> float:
    from matscipy.neighbours import neighbour_list

    return float(neighbour_list("d", atoms, 1.5).min(initial=1.5))


def member(electrostatics: str) -> torch.nn.Module:
    hyper = ModelConfig(ensemble_size=2, electrostatics=electrostatics).hyper()
    spec = ModelSpec(hyper=hyper, z_table=Z_TABLE, atomic_energies=E0, scale=1.0, avg_num_neighbors=20.0)
    committee = Committee(spec, seeds=[0, 1])
    committee.eval()
    return committee.members[0]


def time_once(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    t0 = time.perf_counter()
    out = model(batch)
    out["forces"].sum().item()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--repeats", type=int, nargs="+", default=[9, 5, 2], help="per size (last one repeats)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {mode: member(mode) for mode in ("none", "equilibrated")}
    rows = []
    for k, size in enumerate(args.sizes):
        repeats = args.repeats[min(k, len(args.repeats) - 1)]
        atoms = nacl_in_water(size, seed=k)
        batch = build_batch([atoms], Z_TABLE, 4.0)
        row = {
            "target_atoms": size,
            "atoms": len(atoms),
            "box_A": [round(float(x), 2) for x in atoms.cell.lengths()],
            "ions": int(np.sum(atoms.numbers > 8)),
            "min_distance_A": round(min_distance(atoms), 3),
            "edges_per_atom": round(batch["edge_index"].shape[1] / len(atoms), 1),
            "repeats": repeats,
        }
        # alternate the two models so that drifts in machine load hit both alike
        times = {mode: [] for mode in models}
        for model in models.values():
            model(batch)  # warm-up
        for _ in range(repeats):
            for mode, model in models.items():
                times[mode].append(time_once(model, batch))
        for mode in models:
            ms = 1000 * statistics.median(times[mode])
            row[f"{mode}_ms"] = round(ms, 2)
            row[f"{mode}_us_per_atom"] = round(1000 * ms / len(atoms), 2)
        row["ratio_equilibrated_over_none"] = round(row["equilibrated_ms"] / row["none_ms"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    growth = {}
    for a, b in zip(rows, rows[1:]):
        for mode in models:
            growth[f"{mode}_us_per_atom_{b['atoms']}_over_{a['atoms']}"] = round(
                b[f"{mode}_us_per_atom"] / a[f"{mode}_us_per_atom"], 3
            )
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "model": "one member, r_max 4, 16x0e+16x1o, 2 layers, float64; equilibrated: charge_width 1 Å, coulomb method auto",
        "sizes": rows,
        "growth": growth,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
