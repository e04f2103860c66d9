"""Fit a committee to reference labels, and measure its errors.

Labels are read from ``REF_energy`` (eV, ``info``) and ``REF_forces`` (eV/Å,
``arrays``), the keys ionflow writes in its extxyz datasets. The loss is

    L = w_E * mean_g ((E_pred - E_ref) / N_g)^2 + w_F * mean_i |F_pred - F_ref|^2

summed over the committee's members, which share nothing but the data: the sum
of independent losses trains each member as if it were alone.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms

from ionflow.platform.model.committee import Committee, ModelSpec
from ionflow.platform.model.graph import build_batch
from ionflow.platform.structures import REF_PREFIX

Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class TrainReport:
    """What a training run did; errors in eV/atom and eV/Å on the validation set."""

    epochs: int
    wall_time_s: float
    train_loss: float
    valid_loss: float
    best_epoch: int
    from_parent: bool


def reference_energy(atoms: Atoms) -> float:
    return float(atoms.info[REF_PREFIX + "energy"])


def reference_forces(atoms: Atoms) -> np.ndarray:
    return np.asarray(atoms.arrays[REF_PREFIX + "forces"], dtype=float)


def fit_atomic_energies(frames: Sequence[Atoms], z_table: Sequence[int]) -> np.ndarray:
    """Per-element reference energies E0 (eV) from a least-squares fit E ~ sum_z n_z E0_z.

    With one composition the system is underdetermined; lstsq then gives the
    minimum-norm solution, which still reproduces the mean energy exactly.
    """
    counts = np.array([[np.sum(a.numbers == z) for z in z_table] for a in frames], dtype=float)
    energies = np.array([reference_energy(a) for a in frames])
    e0, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return e0


def new_spec(frames: Sequence[Atoms], hyper: dict, seed: int) -> ModelSpec:
    """Architecture and data statistics (E0, force scale, neighbour count) for a fresh committee."""
    z_table = sorted({int(z) for a in frames for z in a.numbers})
    e0 = fit_atomic_energies(frames, z_table)
    forces = np.concatenate([reference_forces(a).ravel() for a in frames])
    scale = float(np.sqrt(np.mean(forces**2))) or 1.0
    batch = build_batch(frames, z_table, float(hyper["r_max"]))
    avg_neighbours = batch["edge_index"].shape[1] / max(1, batch["positions"].shape[0])
    k = int(hyper["committee_size"])
    return ModelSpec(
        hyper=dict(hyper),
        z_table=z_table,
        atomic_energies=[float(x) for x in e0],
        scale=scale,
        shift=0.0,
        avg_num_neighbors=max(1.0, float(avg_neighbours)),
        seeds=[seed * 1000 + i for i in range(k)],
    )


def _batches(frames: Sequence[Atoms], spec: ModelSpec, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Graphs are built once: positions do not change during training."""
    out = []
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size]
        batch = build_batch(chunk, spec.z_table, float(spec.hyper["r_max"]), dtype=spec.dtype)
        batch["ref_energy"] = torch.tensor([reference_energy(a) for a in chunk], dtype=spec.dtype)
        batch["ref_forces"] = torch.tensor(np.concatenate([reference_forces(a) for a in chunk]), dtype=spec.dtype)
        batch["n_atoms"] = torch.tensor([len(a) for a in chunk], dtype=spec.dtype)
        out.append(batch)
    return out


def _loss(committee: Committee, batch: dict[str, torch.Tensor], w_e: float, w_f: float, training: bool) -> torch.Tensor:
    out = committee(batch, training=training)
    de = (out["energy"] - batch["ref_energy"]) / batch["n_atoms"]  # [K, g] eV/atom
    df = out["forces"] - batch["ref_forces"]  # [K, n, 3] eV/Å
    return w_e * (de**2).mean(-1).sum() + w_f * (df**2).mean((-2, -1)).sum()


def train_committee(
    train: Sequence[Atoms],
    valid: Sequence[Atoms],
    hyper: dict,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    energy_weight: float,
    forces_weight: float,
    seed: int,
    parent: Committee | None = None,
    progress: Progress | None = None,
) -> tuple[Committee, TrainReport]:
    """Train a committee on labelled ``train`` frames, keeping the weights best on ``valid``.

    With a ``parent`` whose elements cover the data the committee is refined from
    the parent's weights (the parent itself is not modified); otherwise it starts
    from scratch with E0 and force scale fitted to ``train``.
    """
    if not train:
        raise ValueError("no training frames")
    start = time.perf_counter()
    elements = {int(z) for a in train for z in a.numbers}
    from_parent = parent is not None and elements <= set(parent.z_table)
    if from_parent:
        committee = copy.deepcopy(parent)
    else:
        committee = Committee(new_spec(train, hyper, seed))
    spec = committee.spec
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_batches_fixed = None if len(train) > batch_size else _batches(train, spec, batch_size)
    valid_batches = _batches(valid, spec, batch_size) if valid else []

    optimiser = torch.optim.Adam(committee.parameters(), lr=learning_rate, amsgrad=True)
    # Cosine decay to 2% of the initial rate: small data sets need the late, gentle steps.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda e: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))
    )
    best = (math.inf, -1, copy.deepcopy(committee.state_dict()))
    train_loss = math.nan
    for epoch in range(epochs):
        committee.train()
        if train_batches_fixed is not None:
            batches = train_batches_fixed
        else:
            order = rng.permutation(len(train))
            batches = _batches([train[i] for i in order], spec, batch_size)
        total = 0.0
        for batch in batches:
            optimiser.zero_grad(set_to_none=True)
            loss = _loss(committee, batch, energy_weight, forces_weight, training=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach())
        scheduler.step()
        train_loss = total / len(batches)
        committee.eval()
        if valid_batches:
            valid_loss = sum(
                float(_loss(committee, b, energy_weight, forces_weight, training=False).detach()) for b in valid_batches
            ) / len(valid_batches)
        else:
            valid_loss = train_loss
        if valid_loss < best[0]:
            best = (valid_loss, epoch, copy.deepcopy(committee.state_dict()))
        if progress:
            progress(epoch + 1, epochs)
    committee.load_state_dict(best[2])
    committee.eval()
    report = TrainReport(
        epochs=epochs,
        wall_time_s=time.perf_counter() - start,
        train_loss=train_loss,
        valid_loss=best[0],
        best_epoch=best[1],
        from_parent=from_parent,
    )
    return committee, report


def evaluate(committee: Committee, frames: Sequence[Atoms], batch_size: int = 64) -> dict[str, float]:
    """Errors of the committee mean against reference labels, and its spreads.

    Returns energy RMSE/MAE (eV/atom), force RMSE/MAE (eV/Å, per component), mean and max
    per-atom force spread (eV/Å), mean energy spread (eV), and ``n`` frames.
    """
    if not frames:
        return {"n": 0}
    de, df, fstd, estd = [], [], [], []
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size]
        batch = build_batch(chunk, committee.z_table, committee.r_max, dtype=committee.spec.dtype)
        pred = committee.predict(batch)
        n_atoms = np.array([len(a) for a in chunk])
        de.append((pred["energy"].numpy() - [reference_energy(a) for a in chunk]) / n_atoms)
        df.append(pred["forces"].numpy() - np.concatenate([reference_forces(a) for a in chunk]))
        fstd.append(pred["force_std"].numpy())
        estd.append(pred["energy_std"].numpy())
    de, df, fstd, estd = map(np.concatenate, (de, df, fstd, estd))
    return {
        "n": len(frames),
        "energy_rmse": float(np.sqrt(np.mean(de**2))),
        "energy_mae": float(np.mean(np.abs(de))),
        "forces_rmse": float(np.sqrt(np.mean(df**2))),
        "forces_mae": float(np.mean(np.abs(df))),
        "force_std_mean": float(np.mean(fstd)),
        "force_std_max": float(np.max(fstd)),
        "energy_std_mean": float(np.mean(estd)),
    }
