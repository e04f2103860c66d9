"""An ensemble's errors against reference labels, and the calibration of its spreads.

Errors are those of the ensemble mean: energies in eV/atom, forces in eV/Å per Cartesian
component, charges in e per atom, dipoles in e·Å per Cartesian component about the centre of
mass. Spreads are the K members' (or heads') standard deviation: energies in eV, forces per atom
in eV/Å, sqrt(mean_k |F_k − F_mean|²).

:func:`calibrate` fits on the validation frames the factors by which the spreads are multiplied
to become predicted errors (maximum likelihood of a Gaussian error model with the spread as its
scale):

    s_E² = mean_g (ΔE_g / σ_g)²,    s_F² = mean_i |ΔF_i|² / σ_i²
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from ase import Atoms

from ionflow.platform.dataset import reference_charges, reference_dipole, reference_energy, reference_forces
from ionflow.platform.model.ensemble import Ensemble
from ionflow.platform.model.graph import build_batch

#: Frames per forward pass when evaluating: bounds the memory; the results do not depend on it.
EVALUATION_BATCH_SIZE = 64


def _predictions(
    ensemble: Ensemble, frames: Sequence[Atoms], batch_size: int
) -> Iterator[tuple[Sequence[Atoms], dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """(frames, batch, prediction) for each chunk of ``batch_size`` frames, on the CPU."""
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size]
        batch = build_batch(chunk, ensemble.z_table, ensemble.r_max, dtype=ensemble.spec.dtype, device=ensemble.device)
        pred = {k: v.cpu() for k, v in ensemble.predict(batch).items()}
        yield chunk, {k: v.cpu() for k, v in batch.items()}, pred


def _errors_and_spreads(
    ensemble: Ensemble, frames: Sequence[Atoms], batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Energy errors (g,) eV and raw spreads (g,) eV; per-atom force error norms (n,) and raw spreads (n,) eV/Å."""
    de, se, df, sf = [], [], [], []
    for chunk, _, pred in _predictions(ensemble, frames, batch_size):
        energies, forces = pred["energies"].numpy(), pred["forces_members"].numpy()
        de.append(energies.mean(0) - [reference_energy(a) for a in chunk])
        se.append(energies.std(0))
        df.append(np.linalg.norm(forces.mean(0) - np.concatenate([reference_forces(a) for a in chunk]), axis=-1))
        sf.append(np.sqrt(((forces - forces.mean(0)) ** 2).sum(-1).mean(0)))
    return tuple(np.concatenate(x) for x in (de, se, df, sf))


def calibrate(ensemble: Ensemble, frames: Sequence[Atoms], batch_size: int = EVALUATION_BATCH_SIZE) -> dict[str, float]:
    """Calibration factors that turn the raw spreads into predicted errors, fitted on ``frames``.

    Maximum likelihood of a Gaussian error model with the spread as its scale: for energies
    s_E² = mean_g (ΔE_g / σ_g)², for forces s_F² = mean_i |ΔF_i|² / σ_i² (σ_i² the per-atom spread
    squared, summed over components). Entries whose raw spread is zero are left out; a factor
    that cannot be fitted is 1.
    """

    def factor(errors: np.ndarray, spreads: np.ndarray) -> float:
        ok = spreads > 0
        return float(np.sqrt(np.mean((errors[ok] / spreads[ok]) ** 2))) if ok.any() else 1.0

    de, se, df, sf = _errors_and_spreads(ensemble, frames, batch_size)
    return {"energy": factor(de, se), "forces": factor(df, sf)}


def evaluate(ensemble: Ensemble, frames: Sequence[Atoms], batch_size: int = EVALUATION_BATCH_SIZE) -> dict[str, float]:
    """Errors of the ensemble mean against reference labels, and its (calibrated) spreads.

    Returns energy RMSE/MAE (eV/atom), force RMSE/MAE (eV/Å, per component), mean and max
    per-atom force spread (eV/Å), mean energy spread (eV), ``force_z_rms`` (the RMS over atoms of
    |ΔF_i| / force spread_i: 1 for a calibrated model, above 1 when it is overconfident), and ``n``
    frames. For a model with
    an electrostatic head, also, when some frames carry the labels: ``charges_rmse``/``charges_mae``
    (e, over labelled atoms, ``n_charges`` frames) and ``dipole_rmse``/``dipole_mae`` (e·Å, per
    Cartesian component, about the centre of mass, over ``n_dipole`` finite labelled frames).
    """
    if not frames:
        return {"n": 0}
    electrostatic = ensemble.spec.settings.has_electrostatics
    de, df, fstd, estd, dq, dmu = [], [], [], [], [], []
    n_charges = 0
    for chunk, batch, pred in _predictions(ensemble, frames, batch_size):
        n_atoms = np.array([len(a) for a in chunk])
        de.append((pred["energy"].numpy() - [reference_energy(a) for a in chunk]) / n_atoms)
        df.append(pred["forces"].numpy() - np.concatenate([reference_forces(a) for a in chunk]))
        fstd.append(pred["force_std"].numpy())
        estd.append(pred["energy_std"].numpy())
        if not electrostatic:
            continue
        charges, dipoles = pred["charges"].numpy(), pred["dipole"].numpy()
        ptr = batch["ptr"].numpy()
        for g, atoms in enumerate(chunk):
            q = reference_charges(atoms)
            if q is not None:
                dq.append(charges[ptr[g] : ptr[g + 1]] - q)
                n_charges += 1
            mu = reference_dipole(atoms)
            if mu is not None:
                dmu.append(dipoles[g] - mu)
    de, df, fstd, estd = map(np.concatenate, (de, df, fstd, estd))
    metrics = {
        "n": len(frames),
        "energy_rmse": float(np.sqrt(np.mean(de**2))),
        "energy_mae": float(np.mean(np.abs(de))),
        "forces_rmse": float(np.sqrt(np.mean(df**2))),
        "forces_mae": float(np.mean(np.abs(df))),
        "force_std_mean": float(np.mean(fstd)),
        "force_std_max": float(np.max(fstd)),
        "energy_std_mean": float(np.mean(estd)),
    }
    spread = fstd > 0
    if spread.any():
        metrics["force_z_rms"] = float(np.sqrt(np.mean(np.sum(df[spread] ** 2, -1) / fstd[spread] ** 2)))
    if dq:
        dq = np.concatenate(dq)
        metrics.update(
            n_charges=n_charges,
            charges_rmse=float(np.sqrt(np.mean(dq**2))),
            charges_mae=float(np.mean(np.abs(dq))),
        )
    if dmu:
        dmu = np.stack(dmu)
        metrics.update(
            n_dipole=len(dmu),
            dipole_rmse=float(np.sqrt(np.mean(dmu**2))),
            dipole_mae=float(np.mean(np.abs(dmu))),
        )
    return metrics
