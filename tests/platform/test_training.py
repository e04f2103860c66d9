"""Training: fitting real GFN2-xTB labels lowers held-out errors; parents stay untouched; E0 fits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ase import Atoms

from ionflow.config import TrainingConfig
from ionflow.platform.dataset import fit_atomic_energies
from ionflow.platform.evaluation import evaluate
from ionflow.platform.model import Committee, build_batch
from ionflow.platform.settings import ModelSettings, TrainingSettings
from ionflow.platform.structures import labelled_copy
from ionflow.platform.training import new_spec, train_ensemble

FAST = dict(learning_rate=1e-2, batch_size=16, energy_weight=10.0, forces_weight=1.0)


def fast(**overrides) -> TrainingSettings:
    """The campaign's training settings with FAST's and ``overrides``; a refinement keeps FAST's rate."""
    return TrainingConfig(**{**FAST, "finetune_lr_factor": 1.0, **overrides}).settings()


def test_training_lowers_held_out_errors(trained, tiny_hyper):
    committee, report, train, valid, test = trained
    # The same seed gives the same initial weights: this is the committee before any step.
    before = evaluate(Committee(new_spec(train, ModelSettings(**tiny_hyper), seed=3)).eval(), test)
    after = evaluate(committee, test)
    assert after["n"] == before["n"] == len(test)
    # seed 3 gives about 0.21x (energy) and 0.5x (forces); other seeds 0.25-0.45x and 0.45-0.55x
    assert after["energy_rmse"] < 0.5 * before["energy_rmse"], (before, after)
    assert after["forces_rmse"] < 0.75 * before["forces_rmse"], (before, after)
    raw = copy.deepcopy(committee)  # spreads before calibration, comparable with the untrained ones
    raw.spec.calibration = {"energy": 1.0, "forces": 1.0}
    assert evaluate(raw, test)["force_std_mean"] < before["force_std_mean"]

    assert report.epochs == 60 and not report.from_parent
    assert 0 <= report.best_epoch < 60
    assert np.isfinite(report.valid_loss) and np.isfinite(report.train_loss)
    assert report.wall_time_s > 0


def test_training_fits_the_training_set_better_than_held_out_frames(trained):
    committee, _, train, _, test = trained
    assert evaluate(committee, train)["forces_rmse"] < 1.2 * evaluate(committee, test)["forces_rmse"]


def test_finetune_leaves_parent_untouched(trained, tiny_hyper):
    parent, _, train, valid, _ = trained
    state = {k: v.clone() for k, v in parent.state_dict().items()}
    spec = copy.deepcopy(parent.spec.to_dict())
    calls = []
    child, report = train_ensemble(
        train,
        valid,
        ModelSettings(**tiny_hyper),
        fast(finetune_epochs=3),
        seed=5,
        parent=parent,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert report.from_parent
    assert child is not parent
    assert calls == [(1, 3), (2, 3), (3, 3)]
    for key, value in parent.state_dict().items():
        assert torch.equal(value, state[key]), f"parent weight {key} changed"
    assert parent.spec.to_dict() == spec
    refined = child.spec.to_dict()
    assert refined.pop("calibration") != spec.pop("calibration"), "the refined model is recalibrated"
    assert refined == spec, "a refined model keeps its parent's architecture and E0"
    changed = [k for k, v in child.state_dict().items() if not torch.equal(v, state[k])]
    assert changed, "fine-tuning did not change any weight"


def test_new_element_starts_from_scratch(trained, tiny_hyper):
    """A parent that has never seen nitrogen cannot be refined on NH3; a fresh committee is built."""
    parent = trained[0]
    nh3 = Atoms("NH3", positions=[[0, 0, 0.1], [0, 0.94, -0.25], [0.81, -0.47, -0.25], [-0.81, -0.47, -0.25]])
    frames = [labelled_copy(nh3, -100.0 - 0.01 * i, np.zeros((4, 3))) for i in range(3)]
    child, report = train_ensemble(
        frames, [], ModelSettings(**tiny_hyper), fast(finetune_epochs=1), seed=1, parent=parent
    )
    assert not report.from_parent
    assert child.z_table == [1, 7]
    assert parent.z_table == [1, 8]


def test_training_reproducible_with_seed(h3o_labelled, tiny_hyper):
    train = h3o_labelled[:6]
    a, _ = train_ensemble(train, [], ModelSettings(**tiny_hyper), fast(epochs=2), seed=8)
    b, _ = train_ensemble(train, [], ModelSettings(**tiny_hyper), fast(epochs=2), seed=8)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_training_refuses_empty_data(tiny_hyper):
    with pytest.raises(ValueError, match="no training frames"):
        train_ensemble([], [], ModelSettings(**tiny_hyper), fast(epochs=1), seed=0)


def test_evaluate_reports_per_atom_energy_errors(untrained_committee, h3o_labelled):
    """Labels set to the committee's own predictions, energies offset by 0.1 eV/atom."""
    frames = h3o_labelled[:3]
    batch = build_batch(frames, untrained_committee.z_table, untrained_committee.r_max)
    pred = untrained_committee.predict(batch)
    forces = pred["forces"].numpy().reshape(len(frames), -1, 3)
    own = [labelled_copy(a, float(e) + 0.1 * len(a), f) for a, e, f in zip(frames, pred["energy"].numpy(), forces)]
    errors = evaluate(untrained_committee, own, batch_size=2)
    assert errors["n"] == 3
    assert errors["energy_rmse"] == pytest.approx(0.1, abs=1e-9)
    assert errors["energy_mae"] == pytest.approx(0.1, abs=1e-9)
    assert errors["forces_rmse"] < 1e-9 and errors["forces_mae"] < 1e-9
    assert errors["force_std_max"] >= errors["force_std_mean"] > 0
    assert evaluate(untrained_committee, []) == {"n": 0}


def test_fit_atomic_energies_recovers_per_element_energies():
    e_h, e_o = -13.1, -432.7
    frames = []
    for symbols, n in [("OH2", 3), ("OH3", 2)]:
        atoms = Atoms(symbols)
        atoms.positions = np.arange(3 * len(atoms), dtype=float).reshape(-1, 3)
        n_h, n_o = int(np.sum(atoms.numbers == 1)), int(np.sum(atoms.numbers == 8))
        for _ in range(n):
            frames.append(labelled_copy(atoms, n_h * e_h + n_o * e_o, np.zeros((len(atoms), 3))))
    e0 = fit_atomic_energies(frames, [1, 8])
    np.testing.assert_allclose(e0, [e_h, e_o], rtol=0, atol=1e-9)
    # the order of the table is respected
    np.testing.assert_allclose(fit_atomic_energies(frames, [8, 1]), [e_o, e_h], rtol=0, atol=1e-9)


def test_fit_atomic_energies_single_composition_reproduces_mean_energy(h3o_labelled):
    e0 = fit_atomic_energies(h3o_labelled, [1, 8])
    mean = np.mean([a.info["REF_energy"] for a in h3o_labelled])
    assert 3 * e0[0] + e0[1] == pytest.approx(mean, abs=1e-8)


def test_new_spec_statistics(h3o_labelled, tiny_hyper):
    spec = new_spec(h3o_labelled, ModelSettings(**tiny_hyper), seed=4)
    forces = np.concatenate([a.arrays["REF_forces"].ravel() for a in h3o_labelled])
    assert spec.z_table == [1, 8]
    assert spec.scale == pytest.approx(np.sqrt(np.mean(forces**2)))
    # every pair of the 4 atoms is within r_max = 4 Å: 3 neighbours each
    assert spec.avg_num_neighbors == pytest.approx(3.0)
    assert spec.seeds == [4000, 4001]


def test_a_refinement_uses_the_finetune_epochs_and_learning_rate(trained, tiny_hyper):
    """With a parent: finetune_epochs at learning_rate x finetune_lr_factor (what campaigns do)."""
    parent, _, train, valid, _ = trained
    model = ModelSettings(**tiny_hyper)
    halved = TrainingConfig(**{**FAST, "learning_rate": 2e-2}, finetune_epochs=2, finetune_lr_factor=0.5).settings()
    a, report = train_ensemble(train, valid, model, halved, seed=5, parent=parent)
    b, _ = train_ensemble(train, valid, model, fast(finetune_epochs=2), seed=5, parent=parent)
    assert report.epochs == 2 and report.from_parent
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
