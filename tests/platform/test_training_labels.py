"""Charge and dipole labels in training: the dipole convention, the masked loss terms, and learning.

Reference dipoles are stored about the origin of each frame (as the adapters report them); the
model's are about the centre of mass. H3O+ (charge +1) is translated at random so that a wrong
conversion would show: its origin dipole moves by Q x shift.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from ionflow.config import ModelConfig, TrainingConfig
from ionflow.dft_adapters import get_adapter
from ionflow.platform.dataset import (
    dataset_problem,
    is_validation,
    label_batches,
    reference_dipole,
    split,
    validation_flags,
)
from ionflow.platform.evaluation import evaluate
from ionflow.platform.loss import LossWeights, batch_loss
from ionflow.platform.model import Committee, build_batch
from ionflow.platform.model.charges import dipole as model_dipole
from ionflow.platform.settings import ModelSettings
from ionflow.platform.structures import (
    centre_of_mass,
    dipole_about_centre_of_mass,
    labelled_copy,
    rattled,
    structure_hash,
    with_reference_labels,
)
from ionflow.platform.training import new_spec, train_ensemble
from tests.conftest import hydronium

TINY = dict(ensemble_size=2, hidden_irreps="8x0e+8x1o", mlp_irreps="8x0e", num_interactions=1, dtype="float64")


def tiny_model(electrostatics: str = "equilibrated") -> ModelSettings:
    return ModelConfig(**TINY, electrostatics=electrostatics).settings()


def label(frames: list[Atoms]) -> list[Atoms]:
    results = get_adapter("tblite").label(frames)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    return [labelled_copy(a, r.energy, r.forces, dipole=r.dipole, charges=r.charges) for a, r in zip(frames, results)]


@pytest.fixture(scope="module")
def translated_h3o() -> list[Atoms]:
    """20 rattled H3O+ frames, each moved by a random shift of up to 3 Å, labelled with GFN2-xTB."""
    frames = rattled(hydronium(), n=20, stdev=0.1, seed=7)
    rng = np.random.default_rng(0)
    for frame in frames:
        frame.positions += rng.uniform(-3.0, 3.0, size=3)
    return label(frames)


# --- the dipole convention ----------------------------------------------------------------------


def test_reference_dipole_about_centre_of_mass_is_translation_invariant():
    shift = np.array([3.0, -2.0, 5.0])
    moved = hydronium()
    moved.positions += shift
    here, there = label([hydronium(), moved])
    raw_here, raw_there = here.info["REF_dipole"], there.info["REF_dipole"]
    # the adapters' dipole is about the frame's origin: for a cation it moves with the molecule
    assert np.allclose(raw_there - raw_here, 1 * shift, atol=1e-4)
    assert np.allclose(reference_dipole(here), reference_dipole(there), atol=1e-4)
    assert np.allclose(dipole_about_centre_of_mass(here, raw_here), reference_dipole(here))


def test_conversion_matches_the_models_dipole_for_point_charges():
    """For point charges q_i the origin dipole is sum q_i r_i; moved, it is the model's sum q_i (r_i - r_com)."""
    atoms = hydronium()
    atoms.positions += [1.0, 2.0, -4.0]
    q = np.array([-0.4, 0.5, 0.45, 0.45])  # sums to the total charge, +1
    converted = dipole_about_centre_of_mass(atoms, q @ atoms.positions)
    masses = torch.tensor(atoms.get_masses())
    expected = model_dipole(
        torch.tensor(q), torch.tensor(atoms.positions), masses, torch.zeros(4, dtype=torch.long), 1
    )[0].numpy()
    assert np.allclose(converted, expected, atol=1e-12)
    assert np.allclose(centre_of_mass(atoms), atoms.get_center_of_mass())


def test_neutral_dipole_is_unchanged_and_periodic_has_none():
    water = Atoms("OH2", positions=[[0, 0, 0.1], [0, 0.76, -0.47], [0, -0.76, -0.47]])
    assert np.allclose(dipole_about_centre_of_mass(water, [0.1, 0.2, 0.3]), [0.1, 0.2, 0.3])
    cell = labelled_copy(water, 0.0, np.zeros((3, 3)), dipole=[0.1, 0.2, 0.3])
    cell.cell, cell.pbc = np.eye(3) * 6.0, True
    assert reference_dipole(cell) is None


def test_plain_ase_labels_become_ref_keys():
    atoms = hydronium()
    forces = np.arange(12.0).reshape(4, 3)
    atoms.calc = SinglePointCalculator(atoms, energy=-5.0, forces=forces, dipole=[0.0, 0.1, 0.2])
    out = with_reference_labels(atoms)
    assert out.calc is None and out.info["charge"] == 1
    assert out.info["REF_energy"] == -5.0
    assert np.array_equal(out.arrays["REF_forces"], forces)
    assert np.allclose(out.info["REF_dipole"], [0.0, 0.1, 0.2])
    assert "REF_charges" not in out.arrays
    assert dataset_problem([out]) is None
    assert "frame 0" in dataset_problem([with_reference_labels(hydronium())])


# --- the loss -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def electrostatic_committee(translated_h3o) -> Committee:
    return Committee(new_spec(translated_h3o, tiny_model(), seed=1)).eval()


def _without(atoms: Atoms, *keys: str) -> Atoms:
    out = atoms.copy()
    for key in keys:
        out.info.pop("REF_" + key, None)
        out.arrays.pop("REF_" + key, None)
    return out


def test_loss_uses_charges_and_dipoles_only_where_labelled(electrostatic_committee, translated_h3o):
    committee = electrostatic_committee
    a, b, c, d = translated_h3o[:4]
    periodic = a.copy()  # a dipole label on a periodic frame is not used
    periodic.cell, periodic.pbc = np.eye(3) * 12.0, True
    frames = [a, _without(b, "charges", "dipole"), _without(c, "charges"), periodic]
    batch = label_batches(frames, committee.spec, batch_size=8)[0]
    assert batch["charges_mask"].tolist() == [True] * 4 + [False] * 4 + [False] * 4 + [True] * 4
    assert batch["dipole_mask"].tolist() == [True, False, True, False]

    out = committee(build_batch(frames, committee.z_table, committee.r_max))
    loss_q = float(batch_loss(committee, batch, LossWeights(0, 0, 1, 0), training=False)[0].detach())
    q_ref = np.concatenate([a.arrays["REF_charges"], periodic.arrays["REF_charges"]])
    q_pred = torch.cat([out["charges"][:, 0:4], out["charges"][:, 12:16]], dim=1).detach().numpy()
    assert loss_q == pytest.approx(float(((q_pred - q_ref) ** 2).mean(-1).sum()), rel=1e-10)

    loss_mu = float(batch_loss(committee, batch, LossWeights(0, 0, 0, 1), training=False)[0].detach())
    mu_pred = out["dipole"][:, [0, 2]].detach().numpy()  # [K, 2, 3]
    mu_ref = np.stack([reference_dipole(a), reference_dipole(c)])
    assert loss_mu == pytest.approx(float(((mu_pred - mu_ref) ** 2).mean(-1).mean(-1).sum()), rel=1e-10)

    # without any labels, the charge and dipole weights change nothing
    bare = [_without(x, "charges", "dipole") for x in frames]
    bare_batch = label_batches(bare, committee.spec, batch_size=8)[0]
    plain = float(batch_loss(committee, bare_batch, LossWeights(1, 1, 0, 0), training=False)[0].detach())
    weighted = float(batch_loss(committee, bare_batch, LossWeights(1, 1, 5, 5), training=False)[0].detach())
    assert weighted == plain


def test_evaluate_reports_charge_and_dipole_errors(electrostatic_committee, translated_h3o):
    frames = translated_h3o[:3] + [_without(translated_h3o[3], "charges", "dipole")]
    metrics = evaluate(electrostatic_committee, frames)
    assert metrics["n"] == 4 and metrics["n_charges"] == 3 and metrics["n_dipole"] == 3
    assert metrics["charges_rmse"] > 0 and metrics["dipole_rmse"] > 0
    bare = evaluate(electrostatic_committee, [_without(f, "charges", "dipole") for f in frames])
    assert "charges_rmse" not in bare and "dipole_rmse" not in bare


def test_model_without_electrostatics_ignores_the_labels(translated_h3o):
    training = TrainingConfig(
        epochs=1,
        learning_rate=1e-2,
        batch_size=8,
        energy_weight=1.0,
        forces_weight=1.0,
        charges_weight=1.0,
        dipole_weight=1.0,
    ).settings()
    committee, report = train_ensemble(translated_h3o[:4], [], tiny_model("none"), training, seed=0)
    assert np.isfinite(report.train_loss)
    assert "dipole_rmse" not in evaluate(committee, translated_h3o[4:6])


# --- learning -----------------------------------------------------------------------------------


def test_dipole_labels_lower_the_held_out_dipole_error(translated_h3o):
    """seed 3, 20 epochs: about 0.16 e·Å untrained, 0.16 without dipole labels, 0.02 with them."""
    train, test = translated_h3o[:14], translated_h3o[14:]
    model = tiny_model()
    common = dict(epochs=20, learning_rate=2e-2, batch_size=16, energy_weight=1.0, forces_weight=0.1)
    before = evaluate(Committee(new_spec(train, model, seed=3)).eval(), test)["dipole_rmse"]
    without, _ = train_ensemble(train, [], model, TrainingConfig(**common, dipole_weight=0.0).settings(), seed=3)
    with_labels, _ = train_ensemble(train, [], model, TrainingConfig(**common, dipole_weight=100.0).settings(), seed=3)
    after_without = evaluate(without, test)["dipole_rmse"]
    after = evaluate(with_labels, test)["dipole_rmse"]
    assert after < 0.4 * before, (before, after)
    assert after < 0.4 * after_without, (after_without, after)


def test_split_is_deterministic_and_keeps_both_sides():
    """The campaigns' rule: a structure's side follows its hash; both sides are kept non-empty."""
    frames = rattled(hydronium(), n=40, stdev=0.1, seed=3)  # the split needs no labels
    train, valid = split(frames, 0.2)
    again = split(frames, 0.2)
    assert [id(a) for a in valid] == [id(a) for a in again[1]]
    assert [id(a) for a in train] == [id(a) for a in again[0]]
    assert len(train) + len(valid) == 40 and 0 < len(valid) < 20
    assert all(not is_validation(structure_hash(a), 0.2) for a in train[1:])
    assert all(is_validation(structure_hash(a), 0.2) for a in valid)
    for fraction in (0.05, 0.2, 0.5, 0.85):
        for n in range(1, 41):
            train, valid = split(frames[:n], fraction)
            assert train, (fraction, n)
            if n >= 4:
                assert valid, (fraction, n)
    assert split(frames, 0.0)[1] == []
    assert split(frames[:1], 0.5)[1] == []


def test_split_is_stable_as_the_data_grows():
    """A frame never changes side when others are added (the first alone may, to keep both sides)."""
    hashes = [structure_hash(a) for a in rattled(hydronium(), n=40, stdev=0.1, seed=3)]
    final = validation_flags(hashes, 0.3)
    natural = [is_validation(h, 0.3) for h in hashes]
    for n in range(1, 41):
        flags = validation_flags(hashes[:n], 0.3)
        assert flags[1:] == final[1:n], n
        if 0 < sum(natural[:n]) < n:  # both sides already non-empty: nothing moves
            assert flags == natural[:n], n


def test_split_reads_the_campaigns_structure_hash():
    """A frame from the campaign database carries its hash; the split uses it as it is."""
    frames = rattled(hydronium(), n=8, stdev=0.1, seed=3)
    names = [f"structure-{k}" for k in range(8)]
    for frame, name in zip(frames, names):
        frame.info["structure_hash"] = name
    train, valid = split(frames, 0.4)
    assert [a.info["structure_hash"] for a in valid] == [h for h, v in zip(names, validation_flags(names, 0.4)) if v]
    # the rule itself, pinned (sha256 of the hash, its first 8 hex digits as a fraction of 16**8):
    # what the campaigns' rule gave before it moved here (ionflow.db.records.is_validation)
    assert validation_flags(names, 0.4) == [False, True, False, True, True, False, False, False]
