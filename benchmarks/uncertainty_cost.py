"""Cost and quality of uncertainty: shallow ensemble vs a 4-member committee.

Cost: one ``predict`` call, i.e. what selection and the MD walkers' uncertainty stops need per
step: ensemble-mean energy and forces, the energy spread and the per-atom force spread. Four
models with the default backbone (r_max 4 Å, 16x0e+16x1o, 2 layers, float64) and the default
electrostatic head (equilibrated): a 4-member committee, shallow ensembles with 4 and 8 heads, and
one member alone (no uncertainty) as the floor. Systems: the quickstart's batch (4 Zundel H5O2+
walkers, 28 atoms), a batch of 24 rattled H3O+ (96 atoms) and the ~1000-atom periodic NaCl-in-water box of ``electrostatics_cost.py``. The models alternate within
each repeat; median of repeats.

Quality (``--quality``): both kinds trained the same way (80 epochs, same seed, 24 frames, 12 for
validation and calibration) on H3O+ rattled by 0.12 Å and labelled with GFN2-xTB (tblite); on 24
held-out frames: force RMSE, the RMS of error/calibrated spread (1 = calibrated) and the Spearman
rank correlation between per-atom force spread and per-atom force error (what selection relies on).

Usage: python benchmarks/uncertainty_cost.py [--repeats 15 15 5] [--threads N] [--quality]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

sys.path.insert(0, str(Path(__file__).parent))
from electrostatics_cost import E0, Z_TABLE, nacl_in_water  # noqa: E402

from ionflow.config import ModelConfig  # noqa: E402
from ionflow.platform.model import ModelSpec, build_batch, build_ensemble  # noqa: E402
from ionflow.platform.structures import rattled, with_charge_state  # noqa: E402

ZUNDEL = Atoms(
    "OOHHHHH",
    positions=[
        [0.0, 0.0, 1.2],
        [0.0, 0.0, -1.2],
        [0.0, 0.1, 0.0],
        [0.78, -0.5, 1.6],
        [-0.78, -0.5, 1.6],
        [0.79, -0.51, -1.58],
        [-0.79, -0.51, -1.58],
    ],
)
HYDRONIUM = Atoms("OH3", positions=[[0.0, 0.0, 0.12], [0.0, 0.94, -0.16], [0.81, -0.47, -0.16], [-0.83, -0.46, -0.15]])


def ensemble(kind: str, k: int):
    hyper = ModelConfig(uncertainty=kind, ensemble_size=k, electrostatics="equilibrated").hyper()
    spec = ModelSpec(hyper=hyper, z_table=Z_TABLE, atomic_energies=E0, scale=1.0, avg_num_neighbors=10.0)
    return build_ensemble(spec).eval()


class Single(torch.nn.Module):
    """One member alone: energy and forces, no spread (the cost floor)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = ensemble("committee", 2).members[0]

    def predict(self, batch):
        out = self.inner(batch)
        return {"energy": out["energy"].detach(), "forces": out["forces"].detach()}


def systems() -> dict[str, list[Atoms]]:
    zundel = with_charge_state(ZUNDEL, 1, 1)
    clusters = rattled(with_charge_state(HYDRONIUM.copy(), 1, 1), 24, 0.05, seed=2)
    return {
        "4 Zundel walkers (28 atoms)": rattled(zundel, 4, 0.05, seed=1),
        "24 H3O+ clusters (96 atoms)": clusters,
        "NaCl in water, periodic (1017 atoms)": [nacl_in_water(1000, seed=1)],
    }


def time_once(model, batch) -> float:
    t0 = time.perf_counter()
    out = model.predict(batch)
    float(out["forces"].sum())
    return time.perf_counter() - t0


def cost(repeats: list[int]) -> list[dict]:
    models = {
        "single member (no uncertainty)": Single().eval(),
        "committee, 4 members": ensemble("committee", 4),
        "shallow, 4 heads": ensemble("shallow", 4),
        "shallow, 8 heads": ensemble("shallow", 8),
    }
    rows = []
    for i, (name, frames) in enumerate(systems().items()):
        n_repeats = repeats[min(i, len(repeats) - 1)]
        batch = build_batch(frames, Z_TABLE, 4.0)
        times = {m: [] for m in models}
        for model in models.values():
            time_once(model, batch)  # warm-up
        for _ in range(n_repeats):
            for m, model in models.items():
                times[m].append(time_once(model, batch))
        row = {"system": name, "atoms": int(batch["positions"].shape[0]), "repeats": n_repeats}
        for m in models:
            row[f"{m} ms"] = round(1000 * statistics.median(times[m]), 2)
        committee = row["committee, 4 members ms"]
        for m in models:
            row[f"{m} / committee"] = round(row[f"{m} ms"] / committee, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def quality() -> list[dict]:
    from ionflow.config import TrainingConfig
    from ionflow.dft_adapters import get_adapter
    from ionflow.platform.evaluation import evaluate
    from ionflow.platform.structures import labelled_copy
    from ionflow.platform.training import train_ensemble

    frames = rattled(with_charge_state(HYDRONIUM.copy(), 1, 1), n=60, stdev=0.12, seed=7)
    results = get_adapter("tblite").label(frames)
    frames = [labelled_copy(a, r.energy, r.forces) for a, r in zip(frames, results)]
    train, valid, test = frames[:24], frames[24:36], frames[36:]
    rows = []
    for kind, k in [("committee", 4), ("shallow", 4), ("shallow", 8)]:
        settings = ModelConfig(
            uncertainty=kind,
            ensemble_size=k,
            hidden_irreps="8x0e+8x1o",
            mlp_irreps="8x0e",
            electrostatics="equilibrated",
        ).settings()
        training = TrainingConfig(
            epochs=80, learning_rate=2e-2, batch_size=16, energy_weight=10, forces_weight=1
        ).settings()
        t0 = time.perf_counter()
        model, _ = train_ensemble(train, valid, settings, training, seed=3)
        wall = time.perf_counter() - t0
        metrics = evaluate(model, test)
        batch = build_batch(test, model.z_table, model.r_max)
        pred = model.predict(batch)
        error = np.linalg.norm(pred["forces"].numpy() - np.concatenate([a.arrays["REF_forces"] for a in test]), axis=-1)
        row = {
            "model": f"{kind}, {k} {'members' if kind == 'committee' else 'heads'}",
            "train_s": round(wall, 1),
            "forces_rmse_eV_A": round(metrics["forces_rmse"], 3),
            "energy_rmse_meV_atom": round(1000 * metrics["energy_rmse"], 1),
            "force_z_rms": round(metrics["force_z_rms"], 3),
            "spearman_spread_vs_error": round(spearman(pred["force_std"].numpy(), error), 3),
            "calibration": {key: round(v, 3) for key, v in model.spec.calibration.items()},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, nargs="+", default=[15, 15, 5])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quality", action="store_true", help="also train both kinds and compare their uncertainty")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "cost": cost(args.repeats),
    }
    if args.quality:
        result["quality"] = quality()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
