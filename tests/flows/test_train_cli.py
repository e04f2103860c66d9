"""``ionflow train``: a committee from any labelled extxyz, and refusals before any work."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from typer.testing import CliRunner

import ionflow
from ionflow.cli import app
from ionflow.dft_adapters import get_adapter
from ionflow.platform.structures import labelled_copy, rattled

from ..conftest import hydronium

runner = CliRunner()

TINY_MODEL = {"model": {"hidden_irreps": "8x0e+8x1o", "mlp_irreps": "8x0e", "num_interactions": 1}}


@pytest.fixture(scope="module")
def labelled_frames():
    """8 rattled H3O+ frames labelled with GFN2-xTB: energy, forces, charges, dipole."""
    frames = rattled(hydronium(), n=8, stdev=0.08, seed=2)
    results = get_adapter("tblite").label(frames)
    assert all(r.ok for r in results)
    return frames, results


def write_dataset(path, labelled_frames, plain_from: int = 6):
    """REF_ keys for the first frames, ASE's plain energy/forces/... (a calculator) for the rest."""
    frames, results = labelled_frames
    out = []
    for k, (atoms, r) in enumerate(zip(frames, results)):
        if k < plain_from:
            out.append(labelled_copy(atoms, r.energy, r.forces, dipole=r.dipole, charges=r.charges))
        else:
            plain = atoms.copy()
            plain.calc = SinglePointCalculator(plain, energy=r.energy, forces=r.forces, dipole=r.dipole)
            out.append(plain)
    write(str(path), out, format="extxyz")
    return path


def write_config(path, config=TINY_MODEL):
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_writes_a_model_that_loads_as_a_calculator(tmp_path, labelled_frames):
    data = write_dataset(tmp_path / "data.extxyz", labelled_frames)
    model = tmp_path / "out" / "model.pt"
    args = [
        "train",
        str(data),
        "-o",
        str(model),
        "--config",
        str(write_config(tmp_path / "model.yaml")),
        "--electrostatics",
        "equilibrated",
        "--epochs",
        "5",
        "--ensemble-size",
        "2",
        "--valid-fraction",
        "0.15",  # the split follows each structure's hash: 2 of these 8 frames fall below 0.15
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for words in ("energy (meV/atom)", "forces (eV/Å)", "charges (e)", "dipole (e·Å)", "2 frames"):
        assert words in result.output, result.output
    assert model.is_file()

    calc = ionflow.load_calculator(model)
    assert len(calc.committee.members) == 2
    assert calc.committee.spec.hyper["electrostatics"] == "equilibrated"
    assert calc.committee.spec.hyper["num_interactions"] == 1
    atoms = hydronium()
    atoms.calc = calc
    assert np.isfinite(atoms.get_potential_energy())
    assert atoms.get_forces().shape == (4, 3)
    charges = atoms.get_charges()
    assert charges.shape == (4,) and charges.sum() == pytest.approx(1.0, abs=1e-6)
    assert atoms.get_dipole_moment().shape == (3,)


def test_train_a_shallow_ensemble(tmp_path, labelled_frames):
    from ionflow.platform.model import ShallowEnsemble

    data = write_dataset(tmp_path / "data.extxyz", labelled_frames)
    model = tmp_path / "shallow.pt"
    args = [
        "train",
        str(data),
        "-o",
        str(model),
        "--config",
        str(write_config(tmp_path / "model.yaml")),
        "--uncertainty",
        "shallow",
        "--ensemble-size",
        "5",
        "--epochs",
        "4",
        "--valid-fraction",
        "0.25",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "uncertainty calibration" in result.output
    calc = ionflow.load_calculator(model)
    assert isinstance(calc.committee, ShallowEnsemble) and calc.committee.member.heads == 5
    atoms = hydronium()
    atoms.calc = calc
    atoms.get_potential_energy()
    assert calc.results["forces_uncertainty"].shape == (4,) and np.all(calc.results["forces_uncertainty"] > 0)


def test_train_refuses_an_unknown_uncertainty_kind(tmp_path, labelled_frames):
    data = write_dataset(tmp_path / "data.extxyz", labelled_frames)
    result = runner.invoke(app, ["train", str(data), "-o", str(tmp_path / "m.pt"), "--uncertainty", "dropout"])
    assert result.exit_code == 2
    assert "uncertainty" in result.output and not (tmp_path / "m.pt").exists()


def _frame_without_labels(path, labelled_frames):
    frames, _ = labelled_frames
    write_dataset(path, labelled_frames)
    bare = frames[0].copy()
    with open(path, "a") as handle:
        write(handle, bare, format="extxyz")


def _inconsistent_multiplicity(path, labelled_frames):
    write_dataset(path, labelled_frames)
    frames = read(str(path), index=":")
    frames[3].info["multiplicity"] = 2  # H3O+ has 10 electrons: a doublet is impossible
    write(str(path), frames, format="extxyz")


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("missing file", ["no such data file"]),
        ("frame without labels", ["frame 8", "REF_energy"]),
        ("inconsistent multiplicity", ["frame 3", "multiplicity 2"]),
        ("unknown config key", ["model.colour", "unknown key"]),
        ("bad electrostatics", ["model.electrostatics"]),
    ],
)
def test_train_refuses_bad_input_before_any_work(tmp_path, labelled_frames, case, words):
    data = tmp_path / "data.extxyz"
    config = write_config(tmp_path / "model.yaml")
    extra = []
    if case == "missing file":
        pass
    elif case == "frame without labels":
        _frame_without_labels(data, labelled_frames)
    elif case == "inconsistent multiplicity":
        _inconsistent_multiplicity(data, labelled_frames)
    elif case == "unknown config key":
        write_dataset(data, labelled_frames)
        write_config(config, {"model": {**TINY_MODEL["model"], "colour": "blue"}})
    elif case == "bad electrostatics":
        write_dataset(data, labelled_frames)
        extra = ["--electrostatics", "ewald"]
    model = tmp_path / "model.pt"
    result = runner.invoke(app, ["train", str(data), "-o", str(model), "--config", str(config), *extra])
    assert result.exit_code == 2, result.output
    for word in words:
        assert word in result.output, result.output
    assert not model.exists()


def test_unknown_section_is_refused(tmp_path, labelled_frames):
    data = write_dataset(tmp_path / "data.extxyz", labelled_frames)
    config = write_config(tmp_path / "model.yaml", {**TINY_MODEL, "explore": {"steps": 3}})
    result = runner.invoke(app, ["train", str(data), "-o", str(tmp_path / "m.pt"), "--config", str(config)])
    assert result.exit_code == 2
    assert "explore" in result.output and "unknown key" in result.output


def test_train_fine_tunes_a_foundation_model_and_refuses_what_it_cannot(
    tmp_path, labelled_frames, foundation_file, foundation_pretraining
):
    """``--foundation``: the file is named as a pickle before it is read, its sha256 goes into the
    model's provenance; a pin that differs, an element it lacks and foundation options without a
    foundation are refused before any work (exit 2, no model file)."""
    from ionflow.platform.model.foundation import file_sha256

    data = write_dataset(tmp_path / "data.extxyz", labelled_frames)
    replay = tmp_path / "replay.extxyz"
    write(str(replay), foundation_pretraining[::6], format="extxyz")
    model = tmp_path / "model.pt"
    base = ["train", str(data), "-o", str(model), "--epochs", "2", "--ensemble-size", "2"]
    result = runner.invoke(
        app, [*base, "--foundation", str(foundation_file), "--replay", str(replay), "--frozen-layers", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "Python pickle" in result.output
    sha = file_sha256(foundation_file)
    shown = runner.invoke(app, ["lineage", str(model)])
    assert shown.exit_code == 0 and f"foundation_sha256      {sha}" in shown.output, shown.output
    model.unlink()

    refused = {
        "pinned to": [*base, "--foundation", str(foundation_file), "--foundation-sha256", "ab" * 32],
        "needs model.foundation": [*base, "--frozen-layers", "1"],
        "no such file": [*base, "--foundation", str(tmp_path / "absent.model")],
    }
    ammonia = rattled(hydronium(), n=2, stdev=0.05, seed=1)
    for atoms in ammonia:
        atoms.numbers[0] = 7  # N in place of O: NH3+, not in the foundation's table
        atoms.info.update(charge=1, multiplicity=2)
    nitrogen = tmp_path / "nitrogen.extxyz"
    write(str(nitrogen), [labelled_copy(a, -1.0, np.zeros((4, 3))) for a in ammonia], format="extxyz")
    refused["hold N, which the foundation model"] = [
        "train",
        str(nitrogen),
        "-o",
        str(model),
        "--foundation",
        str(foundation_file),
    ]
    for words, args in refused.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and words in " ".join(result.output.split()), (words, result.output)
        assert not model.exists()
