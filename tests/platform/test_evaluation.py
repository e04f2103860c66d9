"""Errors and calibration metrics of :func:`evaluate`, checked against a hand computation over the
ASE calculator's per-frame predictions."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from ase import Atoms

from ionflow.config import ModelConfig
from ionflow.platform.evaluation import calibration_bins, compare, evaluate, rank_correlation, z_rms
from ionflow.platform.model import Ensemble, EnsembleCalculator, build_ensemble
from ionflow.platform.structures import labelled_copy, rattled
from ionflow.platform.training import new_spec
from tests.structures import hydronium, water

#: Calibration factors of the test model: the spreads must be used as the model reports them.
CALIBRATION = {"energy": 3.0, "forces": 0.5}

#: Mean force components of the random labels (eV/Å): errors of either sign, unequal per element.
FORCE_LABEL_SCALE = 0.3


@pytest.fixture(scope="module")
def frames() -> list[Atoms]:
    """Two rattled H3O+ (with REF_charges, REF_dipole) and one H2O (energy and forces only), random labels."""
    rng = np.random.default_rng(5)
    structures = rattled(hydronium(), n=2, stdev=0.05, seed=1) + rattled(water(), n=1, stdev=0.05, seed=2)
    out = []
    for k, atoms in enumerate(structures):
        extra = {} if k == 2 else {"charges": rng.normal(0.25, 0.3, len(atoms)), "dipole": rng.normal(0, 0.5, 3)}
        energy = -10.7 * np.sum(atoms.numbers == 1) - 114.0 * np.sum(atoms.numbers == 8) + rng.normal(0, 0.5)
        out.append(labelled_copy(atoms, energy, rng.normal(0, FORCE_LABEL_SCALE, (len(atoms), 3)), **extra))
    return out


@pytest.fixture(scope="module")
def ensemble(frames) -> Ensemble:
    """An untrained committee of 2 with an equilibrated-charge head, float64, calibrated spreads."""
    settings = ModelConfig(ensemble_size=2, hidden_irreps="4x0e+4x1o", mlp_irreps="4x0e", num_interactions=1).settings()
    spec = dataclasses.replace(new_spec(frames, settings, seed=4), calibration=dict(CALIBRATION))
    return build_ensemble(spec, seeds=spec.seeds).eval()


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of the ranks (no ties in these data)."""
    return float(np.corrcoef(np.argsort(np.argsort(x)), np.argsort(np.argsort(y)))[0, 1])


def by_hand(ensemble: Ensemble, frames: list[Atoms]) -> dict:
    """Every metric of evaluate, from the ASE calculator's predictions one frame at a time."""
    de, dE, sE, dF, sF, z, dq, dmu = [], [], [], [], [], [], [], []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = EnsembleCalculator(ensemble)
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        dE.append(energy - atoms.info["REF_energy"])
        de.append(dE[-1] / len(atoms))
        sE.append(atoms.calc.results["energy_uncertainty"])
        dF.append(forces - atoms.arrays["REF_forces"])
        sF.append(atoms.calc.results["forces_uncertainty"])
        z.append(atoms.numbers)
        if "REF_charges" in atoms.arrays:
            dq.append(atoms.get_charges() - atoms.arrays["REF_charges"])
        if "REF_dipole" in atoms.info:  # labels about the origin, the model's about the centre of mass
            reference = atoms.info["REF_dipole"] - atoms.info["charge"] * atoms.get_center_of_mass()
            dmu.append(atoms.get_dipole_moment() - reference)
    de, dE, sE = np.array(de), np.array(dE), np.array(sE)
    dF, sF, z, dq, dmu = np.concatenate(dF), np.concatenate(sF), np.concatenate(z), np.concatenate(dq), np.array(dmu)
    norm = np.sqrt((dF**2).sum(1))
    rms, mae = (lambda d: np.sqrt(np.mean(d**2))), (lambda d: np.mean(np.abs(d)))
    return {
        "n": len(frames),
        "n_atoms": len(z),
        "energy_rmse": rms(de),
        "energy_mae": mae(de),
        "forces_rmse": rms(dF),
        "forces_mae": mae(dF),
        "force_std_mean": sF.mean(),
        "force_std_max": sF.max(),
        "energy_std_mean": sE.mean(),
        "force_z_rms": rms(norm / sF),
        "energy_z_rms": rms(dE / sE),
        "forces_spearman": spearman(sF, norm),
        "energy_spearman": spearman(sE, np.abs(dE)),
        "n_charges": 2,
        "charges_rmse": rms(dq),
        "charges_mae": mae(dq),
        "n_dipole": 2,
        "dipole_rmse": rms(dmu),
        "dipole_mae": mae(dmu),
        "forces_rmse_per_element": {"H": rms(dF[z == 1]), "O": rms(dF[z == 8])},
        "forces_mae_per_element": {"H": mae(dF[z == 1]), "O": mae(dF[z == 8])},
    }


def test_evaluate_matches_a_hand_computation(ensemble, frames):
    metrics = evaluate(ensemble, frames, batch_size=2)
    expected = by_hand(ensemble, frames)
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-10), key
    # not trivially passing: errors of each element differ, spreads are non-zero and not calibrated
    assert metrics["forces_rmse_per_element"]["H"] != pytest.approx(metrics["forces_rmse_per_element"]["O"], rel=1e-3)
    assert metrics["force_std_mean"] > 0 and metrics["energy_z_rms"] > 1
    assert abs(metrics["forces_spearman"]) < 1


def test_batch_size_does_not_change_the_numbers(ensemble, frames):
    one, all_ = evaluate(ensemble, frames, batch_size=1), evaluate(ensemble, frames, batch_size=3)
    assert one.keys() == all_.keys()
    for key, value in all_.items():
        assert one[key] == pytest.approx(value, rel=1e-10), key


def test_metrics_are_plain_json_and_undefined_ones_are_none(ensemble, frames):
    metrics = evaluate(ensemble, frames[:1])
    assert metrics["energy_spearman"] is None  # one frame: no ranking
    assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics
    assert all(type(v) in (int, float, dict, type(None)) for v in metrics.values())
    assert rank_correlation(np.ones(4), np.arange(4.0)) is None  # constant spread
    assert rank_correlation(np.arange(4.0), np.zeros(4)) is None  # constant error
    assert z_rms(np.ones(3), np.zeros(3)) is None  # no spread
    assert z_rms(np.array([3.0, 1.0, 9.0]), np.array([1.0, 0.0, 3.0])) == pytest.approx(3.0)


def test_comparison_keeps_predictions_beside_labels(ensemble, frames):
    c = compare(ensemble, frames, batch_size=2)
    assert c.forces.shape == c.ref_forces.shape == (11, 3) and c.force_std.shape == c.numbers.shape == (11,)
    assert c.charges.shape == c.ref_charges.shape == (8,) and c.n_charges == 2
    assert c.dipole.shape == c.ref_dipole.shape == (2, 3)
    np.testing.assert_allclose(c.energy_errors, (c.energy - c.ref_energy) / np.array([4, 4, 3]))
    with pytest.raises(ValueError, match="no frames"):
        compare(ensemble, [])


def test_calibration_bins_group_atoms_of_similar_spread():
    spreads = np.array([0.4, 0.1, 0.3, 0.2, 0.6, 0.5])
    errors = np.array([4.0, 1.0, 3.0, 2.0, 6.0, 5.0])
    mean_spread, rms_error = calibration_bins(spreads, errors, bins=3)
    np.testing.assert_allclose(mean_spread, [0.15, 0.35, 0.55])
    np.testing.assert_allclose(rms_error, np.sqrt([(1 + 4) / 2, (9 + 16) / 2, (25 + 36) / 2]))
    assert len(calibration_bins(spreads[:2], errors[:2], bins=10)[0]) == 2  # no empty bins
