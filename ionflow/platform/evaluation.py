"""An ensemble's errors against reference labels, and the calibration of its spreads.

Errors are those of the ensemble mean: energies in eV/atom, forces in eV/Å per Cartesian
component, charges in e per atom, dipoles in e·Å per Cartesian component about the centre of
mass. Spreads are the K members' (or heads') standard deviation: energies in eV, forces per atom
in eV/Å, sqrt(mean_k |F_k − F_mean|²).

:func:`calibrate` fits on the validation frames the factors by which the spreads are multiplied
to become predicted errors (maximum likelihood of a Gaussian error model with the spread as its
scale):

    s_E² = mean_g (ΔE_g / σ_g)²,    s_F² = mean_i |ΔF_i|² / σ_i²

:func:`evaluate` reports, besides the errors (overall, and for forces per element), the same
ratios with the calibrated spreads (``force_z_rms``, ``energy_z_rms``: 1 when calibrated, above 1
when overconfident) and how well the spreads rank the errors (Spearman's ρ of σ_i against |ΔF_i|
and of σ_g against |ΔE_g|). :func:`compare` keeps the predictions beside the labels for plots.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols
from scipy.stats import spearmanr

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


def _finite(value: float) -> float | None:
    """A plain float, or None for NaN/inf: metrics are stored as JSON."""
    value = float(value)
    return value if np.isfinite(value) else None


def z_rms(errors: np.ndarray, spreads: np.ndarray) -> float | None:
    """RMS of error/spread over the entries with a non-zero spread: 1 for calibrated spreads, above 1
    for overconfident ones; None when no spread is non-zero."""
    ok = spreads > 0
    return _finite(np.sqrt(np.mean((errors[ok] / spreads[ok]) ** 2))) if ok.any() else None


def calibrate(ensemble: Ensemble, frames: Sequence[Atoms], batch_size: int = EVALUATION_BATCH_SIZE) -> dict[str, float]:
    """Calibration factors that turn the raw spreads into predicted errors, fitted on ``frames``.

    Maximum likelihood of a Gaussian error model with the spread as its scale: for energies
    s_E² = mean_g (ΔE_g / σ_g)², for forces s_F² = mean_i |ΔF_i|² / σ_i² (σ_i² the per-atom spread
    squared, summed over components). Entries whose raw spread is zero are left out; a factor
    that cannot be fitted is 1.
    """

    def factor(errors: np.ndarray, spreads: np.ndarray) -> float:
        s = z_rms(errors, spreads)
        return 1.0 if s is None else s

    de, se, df, sf = _errors_and_spreads(ensemble, frames, batch_size)
    return {"energy": factor(de, se), "forces": factor(df, sf)}


@dataclass(frozen=True)
class Comparison:
    """An ensemble's predictions next to the reference labels of the same g frames (n atoms).

    Predictions keep the model's dtype (float32 or float64); labels are float64.
    """

    n_atoms: np.ndarray  # (g,) atoms per frame
    energy: np.ndarray  # (g,) eV, ensemble mean
    ref_energy: np.ndarray  # (g,) eV
    energy_std: np.ndarray  # (g,) eV, calibrated spread
    numbers: np.ndarray  # (n,) atomic numbers
    forces: np.ndarray  # (n, 3) eV/Å, ensemble mean
    ref_forces: np.ndarray  # (n, 3) eV/Å
    force_std: np.ndarray  # (n,) eV/Å, calibrated per-atom spread
    charges: np.ndarray  # (m,) e, on the atoms of the frames with REF_charges (electrostatic models only)
    ref_charges: np.ndarray  # (m,) e
    n_charges: int  # frames behind ``charges``
    dipole: np.ndarray  # (d, 3) e·Å about the centre of mass, frames with a finite REF_dipole (electrostatic models)
    ref_dipole: np.ndarray  # (d, 3) e·Å

    @property
    def energy_errors(self) -> np.ndarray:
        """(g,) eV/atom, prediction minus label."""
        return (self.energy - self.ref_energy) / self.n_atoms

    @property
    def force_errors(self) -> np.ndarray:
        """(n, 3) eV/Å, prediction minus label."""
        return self.forces - self.ref_forces


def compare(ensemble: Ensemble, frames: Sequence[Atoms], batch_size: int = EVALUATION_BATCH_SIZE) -> Comparison:
    """The ensemble's predictions on labelled ``frames`` (at least one) beside their labels."""
    if not frames:
        raise ValueError("no frames to compare")
    electrostatic = ensemble.spec.settings.has_electrostatics
    energy, estd, forces, fstd, charges, ref_charges, dipole, ref_dipole = [], [], [], [], [], [], [], []
    n_charges = 0
    for chunk, batch, pred in _predictions(ensemble, frames, batch_size):
        energy.append(pred["energy"].numpy())
        estd.append(pred["energy_std"].numpy())
        forces.append(pred["forces"].numpy())
        fstd.append(pred["force_std"].numpy())
        if not electrostatic:
            continue
        q_pred, mu_pred = pred["charges"].numpy(), pred["dipole"].numpy()
        ptr = batch["ptr"].numpy()
        for g, atoms in enumerate(chunk):
            q = reference_charges(atoms)
            if q is not None:
                charges.append(q_pred[ptr[g] : ptr[g + 1]])
                ref_charges.append(q)
                n_charges += 1
            mu = reference_dipole(atoms)
            if mu is not None:
                dipole.append(mu_pred[g])
                ref_dipole.append(mu)
    return Comparison(
        n_atoms=np.array([len(a) for a in frames]),
        energy=np.concatenate(energy),
        ref_energy=np.array([reference_energy(a) for a in frames]),
        energy_std=np.concatenate(estd),
        numbers=np.concatenate([a.numbers for a in frames]),
        forces=np.concatenate(forces),
        ref_forces=np.concatenate([reference_forces(a) for a in frames]),
        force_std=np.concatenate(fstd),
        charges=np.concatenate(charges) if charges else np.zeros(0),
        ref_charges=np.concatenate(ref_charges) if ref_charges else np.zeros(0),
        n_charges=n_charges,
        dipole=np.stack(dipole) if dipole else np.zeros((0, 3)),
        ref_dipole=np.stack(ref_dipole) if ref_dipole else np.zeros((0, 3)),
    )


def rank_correlation(spreads: np.ndarray, errors: np.ndarray) -> float | None:
    """Spearman's rank correlation of spreads and errors (1: larger spreads always mark larger
    errors); None for fewer than two entries or a constant side, where it is not defined."""
    if len(spreads) < 2 or np.ptp(spreads) == 0 or np.ptp(errors) == 0:
        return None
    return _finite(spearmanr(spreads, errors).statistic)


def calibration_bins(spreads: np.ndarray, errors: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Entries sorted by spread into ``bins`` groups of (nearly) equal count: the mean spread and
    the RMS error of each group, for a calibration plot (a calibrated model lies on y = x)."""
    groups = [g for g in np.array_split(np.argsort(spreads), bins) if len(g)]
    return np.array([spreads[g].mean() for g in groups]), np.array([np.sqrt(np.mean(errors[g] ** 2)) for g in groups])


def _per_element(numbers: np.ndarray, df: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """Force RMSE and MAE (eV/Å, per component) of the atoms of each element, keyed by symbol."""
    rmse, mae = {}, {}
    for z in np.unique(numbers):
        d = df[numbers == z]
        rmse[chemical_symbols[z]] = float(np.sqrt(np.mean(d**2)))
        mae[chemical_symbols[z]] = float(np.mean(np.abs(d)))
    return rmse, mae


def error_metrics(c: Comparison) -> dict[str, Any]:
    """The numbers :func:`evaluate` returns, from a :class:`Comparison`."""
    de, df, fstd, estd = c.energy_errors, c.force_errors, c.force_std, c.energy_std
    metrics: dict[str, Any] = {
        "n": len(de),
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
    if c.n_charges:
        dq = c.charges - c.ref_charges
        metrics.update(
            n_charges=c.n_charges,
            charges_rmse=float(np.sqrt(np.mean(dq**2))),
            charges_mae=float(np.mean(np.abs(dq))),
        )
    if len(c.dipole):
        dmu = c.dipole - c.ref_dipole
        metrics.update(
            n_dipole=len(dmu),
            dipole_rmse=float(np.sqrt(np.mean(dmu**2))),
            dipole_mae=float(np.mean(np.abs(dmu))),
        )
    force_error = np.linalg.norm(df, axis=-1)  # (n,) eV/Å
    energy_error = c.energy - c.ref_energy  # (g,) eV, on the scale of the energy spread
    rmse, mae = _per_element(c.numbers, df)
    metrics.update(
        n_atoms=len(c.numbers),
        forces_rmse_per_element=rmse,
        forces_mae_per_element=mae,
        energy_z_rms=z_rms(energy_error, estd),
        forces_spearman=rank_correlation(fstd, force_error),
        energy_spearman=rank_correlation(estd, np.abs(energy_error)),
    )
    return metrics


def evaluate(ensemble: Ensemble, frames: Sequence[Atoms], batch_size: int = EVALUATION_BATCH_SIZE) -> dict[str, Any]:
    """Errors of the ensemble mean against reference labels, and the calibration of its spreads.

    Returns energy RMSE/MAE (eV/atom), force RMSE/MAE (eV/Å, per component), mean and max
    per-atom force spread (eV/Å), mean energy spread (eV), ``force_z_rms`` (the RMS over atoms of
    |ΔF_i| / force spread_i: 1 for a calibrated model, above 1 when it is overconfident; absent
    when no spread is non-zero), ``n`` frames and ``n_atoms`` atoms. For a model with an
    electrostatic head, also, when some frames carry the labels: ``charges_rmse``/``charges_mae``
    (e, over labelled atoms, ``n_charges`` frames) and ``dipole_rmse``/``dipole_mae`` (e·Å, per
    Cartesian component, about the centre of mass, over ``n_dipole`` finite labelled frames).

    Also ``forces_rmse_per_element``/``forces_mae_per_element`` ({symbol: eV/Å}, per component
    over that element's atoms), ``energy_z_rms`` (RMS over frames of ΔE_g / energy spread_g),
    ``forces_spearman`` (rank correlation of the per-atom force spread with |ΔF_i|) and
    ``energy_spearman`` (of the energy spread with |ΔE_g|); these three are None where undefined
    (no spread, a constant side, one entry). Every value is a plain int, float, None or dict, so
    the whole is JSON.
    """
    if not frames:
        return {"n": 0}
    return error_metrics(compare(ensemble, frames, batch_size))
