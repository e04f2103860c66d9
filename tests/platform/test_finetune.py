"""Fine-tuning from a foundation model: a small mace-torch ``ScaleShiftMACE`` pretrained here at
GFN2-xTB (nothing is downloaded), saved as mace-torch saves its models (``torch.save`` of the
module), then fine-tuned on a few GFN1-xTB labels of H3O+."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import molecule

from ionflow.config import ModelConfig, TrainingConfig
from ionflow.platform.evaluation import evaluate
from ionflow.platform.finetune import from_foundation, members, parameter_groups, read_replay, zero_shot
from ionflow.platform.model import load_model, read_provenance, save_model
from ionflow.platform.model.foundation import file_sha256, read_foundation
from ionflow.platform.model.graph import build_batch
from ionflow.platform.structures import rattled, with_charge_state, write_extxyz
from ionflow.platform.training import train_ensemble
from tests.foundation import Z_TABLE, water_dimer
from tests.foundation import label as _label
from tests.structures import hydronium


@pytest.fixture(scope="session")
def gfn1_frames() -> list:
    """30 H3O+ frames at GFN1-xTB, another level of theory than the foundation's."""
    return _label(rattled(hydronium(), n=30, stdev=0.1, seed=7), "GFN1-xTB")


def _predict(ensemble, frames) -> dict:
    return ensemble.predict(build_batch(frames, ensemble.z_table, ensemble.r_max, dtype=ensemble.spec.dtype))


MODEL = ModelConfig(
    ensemble_size=2, hidden_irreps="8x0e+8x1o", mlp_irreps="8x0e", num_interactions=2, dtype="float64"
).settings()
TRAINING = TrainingConfig(
    epochs=40, learning_rate=1e-2, batch_size=16, energy_weight=10.0, forces_weight=1.0, foundation_lr_factor=0.1
).settings()


@pytest.fixture(scope="session")
def fine_tuned(foundation_file, gfn1_frames):
    foundation = read_foundation(foundation_file)
    train, valid = gfn1_frames[:6], gfn1_frames[6:8]
    ensemble, _ = train_ensemble(train, valid, MODEL, TRAINING, seed=3, foundation=foundation)
    return ensemble, foundation


def test_fine_tuning_beats_training_from_scratch_on_the_same_labels(fine_tuned, gfn1_frames):
    ensemble, _ = fine_tuned
    train, valid, test = gfn1_frames[:6], gfn1_frames[6:8], gfn1_frames[8:]
    scratch, _ = train_ensemble(train, valid, MODEL, TRAINING, seed=3)
    tuned, fresh = evaluate(ensemble, test), evaluate(scratch, test)
    assert tuned["forces_rmse"] < 0.75 * fresh["forces_rmse"], (tuned, fresh)
    assert tuned["energy_rmse"] < fresh["energy_rmse"], (tuned, fresh)


def test_fine_tuned_model_keeps_the_foundation_architecture_and_physics(fine_tuned, foundation_file, gfn1_frames):
    ensemble, foundation = fine_tuned
    spec = ensemble.spec
    assert spec.z_table == Z_TABLE and spec.foundation["sha256"] == file_sha256(foundation_file)
    assert type(members(ensemble)[0].backbone.interactions[1]).__name__ == "RealAgnosticResidualInteractionBlock"
    # forces are minus the gradient of the energy (central differences, float64)
    atoms = gfn1_frames[9].copy()
    forces = _predict(ensemble, [atoms])["forces"]  # [n, 3] committee mean
    step, i = 1e-4, 2
    energies = []
    for sign in (1, -1):
        moved = atoms.copy()
        moved.positions[i, 0] += sign * step
        energies.append(float(_predict(ensemble, [moved])["energy"][0]))
    assert float(forces[i, 0]) == pytest.approx(-(energies[0] - energies[1]) / (2 * step), abs=1e-6)
    # rotation invariance of the energy
    rotated = atoms.copy()
    rotated.rotate(73.0, (0.3, -0.5, 0.8), center="COM")
    assert float(_predict(ensemble, [rotated])["energy"][0]) == pytest.approx(
        float(_predict(ensemble, [atoms])["energy"][0]), abs=1e-9
    )


def test_model_file_reads_back_without_unpickling_and_names_its_foundation(fine_tuned, gfn1_frames, tmp_path):
    ensemble, foundation = fine_tuned
    path = save_model(ensemble, tmp_path / "model.pt", {"trained_by": "test"})
    payload = torch.load(path, weights_only=True)  # plain data: nothing is unpickled
    assert payload["spec"]["backbone"]["interaction_cls"] == "RealAgnosticResidualInteractionBlock"
    assert read_provenance(path)["foundation_sha256"] == foundation.sha256
    again = load_model(path)
    frames = gfn1_frames[8:12]
    assert torch.allclose(_predict(again, frames)["energy"], _predict(ensemble, frames)["energy"], atol=1e-10)


def test_frozen_layers_keep_the_foundation_weights_and_the_backbone_learns_slower(foundation_file, gfn1_frames):
    foundation = read_foundation(foundation_file)
    training = dataclasses.replace(TRAINING, epochs=3, frozen_layers=1)
    ensemble, _ = train_ensemble(gfn1_frames[:6], gfn1_frames[6:8], MODEL, training, seed=3, foundation=foundation)
    state = foundation.state_dict
    for member in members(ensemble):
        tuned = member.backbone.state_dict()
        for prefix in ("node_embedding.", "radial_embedding.", "interactions.0.", "products.0."):
            names = [k for k in state if k.startswith(prefix)]
            assert names and all(torch.equal(tuned[k], state[k]) for k in names), prefix
        later = [k for k in state if k.startswith("interactions.1.") and state[k].is_floating_point()]
        assert any(not torch.equal(tuned[k], state[k]) for k in later)
    groups = parameter_groups(from_foundation(gfn1_frames[:6], MODEL, [1, 2], foundation), training, 0.01)
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.001)]
    with pytest.raises(ValueError, match="frozen_layers is 3 but the foundation has 2"):
        parameter_groups(ensemble, dataclasses.replace(training, frozen_layers=3), 0.01)


def test_replay_of_the_foundation_data_reduces_forgetting(foundation_file, gfn1_frames, foundation_pretraining):
    """Fine-tuning on H3O+ alone degrades the backbone on water dimers (GFN2, frames it never saw);
    replaying the foundation's own frames degrades it less."""
    foundation = read_foundation(foundation_file)
    held = _label(rattled(water_dimer(), n=10, stdev=0.12, seed=999), "GFN2-xTB")
    batch = build_batch(held, Z_TABLE, 4.0, dtype=torch.float64)
    reference = torch.tensor(np.concatenate([a.arrays["REF_forces"] for a in held]))

    def dimer_force_rmse(ensemble) -> float:
        out = members(ensemble)[0].backbone(dict(batch), training=False, compute_force=True)
        return float(((out["forces"] - reference) ** 2).mean().sqrt())

    train, valid = gfn1_frames[:6], gfn1_frames[6:8]
    errors = {}
    for weight in (0.0, 5.0):
        training = dataclasses.replace(TRAINING, replay_weight=weight, replay_frames=32)
        replay = foundation_pretraining if weight else ()
        ensemble, _ = train_ensemble(train, valid, MODEL, training, seed=3, foundation=foundation, replay=replay)
        errors[weight] = dimer_force_rmse(ensemble)
    assert errors[5.0] < 0.97 * errors[0.0], errors
    with pytest.raises(ValueError, match="need a model fine-tuned from a foundation"):
        train_ensemble(train, valid, MODEL, TRAINING, seed=3, replay=foundation_pretraining)


def test_elements_outside_the_foundation_table_are_refused(foundation_file, tmp_path):
    foundation = read_foundation(foundation_file)
    ammonia = _label([with_charge_state(molecule("NH3"), 0, 1)] * 3, "GFN2-xTB")
    with pytest.raises(ValueError, match=r"hold N, which the foundation model .* was not trained on"):
        train_ensemble(ammonia[:2], ammonia[2:], MODEL, TRAINING, seed=0, foundation=foundation)
    write_extxyz(tmp_path / "replay.extxyz", ammonia)
    with pytest.raises(ValueError, match="holds N, outside the foundation's elements"):
        read_replay(tmp_path / "replay.extxyz", foundation.z_table)


class _Marker:
    """Unpickling this touches a file: stands for the code a hostile pickle could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_pinned_sha256_is_checked_before_anything_is_unpickled(tmp_path, foundation_file):
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.model"
    torch.save(_Marker(marker), hostile)
    with pytest.raises(ValueError, match="not the 0+ it is pinned to; not loaded"):
        read_foundation(hostile, expected_sha256="0" * 64)
    assert not marker.exists()
    with pytest.raises(ValueError, match="not a mace-torch model"):  # unpinned: it is read, and runs
        read_foundation(hostile)
    assert marker.exists()
    linear = tmp_path / "linear.model"
    torch.save(torch.nn.Linear(2, 2), linear)
    with pytest.raises(ValueError, match="the model is a Linear; ionflow fine-tunes ScaleShiftMACE"):
        read_foundation(linear)
    compiled = tmp_path / "foundation_compiled.model"  # what mace_run_train writes beside NAME.model
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), compiled)
    with pytest.raises(ValueError, match=r"TorchScript \(compiled\) model.*NAME\.model"):
        read_foundation(compiled)
    assert read_foundation(foundation_file, file_sha256(foundation_file).upper()).z_table == Z_TABLE
    with pytest.raises(ValueError, match="no foundation model file"):
        read_foundation(tmp_path / "absent.model")


def test_zero_shot_model_is_the_foundation_alone(foundation_file, gfn1_frames):
    """Before any label, the campaign explores with the foundation itself: same energies and forces
    as the mace-torch model in the file (no electrostatic head, the state head at zero)."""
    foundation = read_foundation(foundation_file)
    ensemble = zero_shot(foundation, MODEL)
    assert ensemble.spec.settings.electrostatics == "none" and ensemble.size == 1
    original = torch.load(foundation_file, weights_only=False)  # the test's own file
    frames = gfn1_frames[:4]
    batch = build_batch(frames, Z_TABLE, 4.0, dtype=torch.float64)
    expected = original(dict(batch), training=False, compute_force=True)
    got = _predict(ensemble, frames)
    assert torch.allclose(got["energy"], expected["energy"].detach(), atol=1e-9)
    assert torch.allclose(got["forces"], expected["forces"].detach(), atol=1e-9)
    assert float(got["force_std"].max()) == 0.0


def test_a_file_in_either_product_layout_is_read(tmp_path, foundation_pretraining):
    """mace-torch writes the product blocks' weights in its reduced layout where cuequivariance is
    installed, in the original one elsewhere: both read back to the same predictions."""
    from ionflow.platform.model.foundation import cueq_installed
    from tests.foundation import make_foundation

    frames = foundation_pretraining[:3]
    for reduced in (False, True):
        path = make_foundation(tmp_path / f"{reduced}.model", frames, epochs=1, reduced_cg=reduced)
        foundation = read_foundation(path)
        assert foundation.config["use_reduced_cg"] == (reduced and cueq_installed())
        original = torch.load(path, weights_only=False)
        batch = build_batch(frames, Z_TABLE, 4.0, dtype=torch.float64)
        expected = original(dict(batch), training=False, compute_force=False)["energy"].detach()
        assert torch.allclose(_predict(zero_shot(foundation, MODEL), frames)["energy"], expected, atol=1e-9)
