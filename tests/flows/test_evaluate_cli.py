"""``ionflow evaluate``: a model's errors on a labelled file as tables, JSON and plots; refusals
before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from typer.testing import CliRunner

import ionflow.platform.evaluation
from ionflow.cli import app
from ionflow.config import ModelConfig
from ionflow.platform.evaluation import evaluate
from ionflow.platform.model import build_ensemble, load_model, save_model
from ionflow.platform.structures import labelled_copy, rattled, read_structures, with_reference_labels
from ionflow.platform.training import new_spec
from tests.structures import hydronium

runner = CliRunner()

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def labelled(n: int = 5, seed: int = 3) -> list[Atoms]:
    """Rattled H3O+ with random labels: REF_ keys (charges, dipole) for the first three, ASE's plain
    energy/forces (a calculator, as other tools write them) for the rest."""
    rng = np.random.default_rng(seed)
    out = []
    for k, atoms in enumerate(rattled(hydronium(), n=n, stdev=0.05, seed=seed)):
        energy, forces = -146.1 + rng.normal(0, 0.3), rng.normal(0, 0.3, (4, 3))
        if k < 3:
            out.append(
                labelled_copy(atoms, energy, forces, charges=rng.normal(0.25, 0.2, 4), dipole=rng.normal(0, 1, 3))
            )
        else:
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
            out.append(atoms)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(model file, data file): an untrained committee of 2 (H, O; equilibrated charges) and 5 labelled frames."""
    folder = tmp_path_factory.mktemp("evaluate")
    frames = labelled()
    settings = ModelConfig(ensemble_size=2, hidden_irreps="4x0e+4x1o", mlp_irreps="4x0e", num_interactions=1).settings()
    spec = new_spec([with_reference_labels(a) for a in frames], settings, seed=1)
    model = save_model(build_ensemble(spec, seeds=spec.seeds).eval(), folder / "model.pt")
    data = folder / "data.extxyz"
    write(str(data), frames, format="extxyz")
    return model, data


def flat(metrics: dict) -> dict:
    """One level of keys: ``forces_rmse_per_element.H`` and so on."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def test_json_holds_the_numbers_of_evaluate(files):
    model, data = files
    result = runner.invoke(app, ["evaluate", str(model), str(data), "--json", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    printed = flat(json.loads(result.stdout))
    expected = flat(evaluate(load_model(model), [with_reference_labels(a) for a in read_structures(data)]))
    assert printed.keys() == expected.keys()
    for key, value in expected.items():
        assert printed[key] == pytest.approx(value, rel=1e-10), key
    assert {"charges_rmse", "dipole_rmse", "forces_rmse_per_element.H", "forces_spearman"} <= printed.keys()
    assert printed["n"] == 5 and printed["n_charges"] == 3


def test_tables_and_plot(files, tmp_path):
    model, data = files
    plot = tmp_path / "errors.png"
    result = runner.invoke(app, ["evaluate", str(model), str(data), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    for words in (
        "energy (meV/atom)",
        "forces (eV/Å)",
        "charges (e)",
        "dipole (e·Å)",
        "force errors per element",
        "uncertainty calibration",
        "error/spread",
        "5 frames, 20 atoms",
    ):
        assert words in result.stdout, result.stdout
    content = plot.read_bytes()
    assert content.startswith(PNG_SIGNATURE) and len(content) > 20_000


def _junk_model(tmp_path, files):
    path = tmp_path / "junk.pt"
    path.write_text("not a model\n")
    return path, files[1]


def _unlabelled(tmp_path, files):
    path = tmp_path / "bare.extxyz"
    write(str(path), [hydronium()], format="extxyz")
    return files[0], path


def _unknown_element(tmp_path, files):
    path = tmp_path / "salty.extxyz"
    frames = labelled(n=3)
    salt = Atoms("NaCl", positions=[[0, 0, 0], [0, 0, 2.4]])
    frames.append(labelled_copy(salt, -10.0, np.zeros((2, 3))))
    write(str(path), frames, format="extxyz")
    return files[0], path


@pytest.mark.parametrize(
    ("case", "extra", "words"),
    [
        ("missing model", [], ["nothing.pt", "no such model file"]),
        ("junk model", [], ["junk.pt", "not a readable ionflow model file"]),
        ("missing data", [], ["nothing.extxyz", "no such data file"]),
        ("unlabelled data", [], ["frame 0", "REF_energy"]),
        ("unknown element", [], ["Na, Cl", "frame 3", "model's elements (H, O)"]),
        ("plot folder", ["--plot", "{tmp}/no/such/errors.png"], ["no such folder"]),
        ("plot format", ["--plot", "{tmp}/errors.jpg"], [".png"]),
        ("batch size", ["--batch-size", "0"], ["--batch-size"]),
    ],
)
def test_bad_input_is_refused_before_any_work(tmp_path, files, monkeypatch, case, extra, words):
    def no_work(*args, **kwargs):
        raise AssertionError("evaluated although the input is bad")

    monkeypatch.setattr(ionflow.platform.evaluation, "compare", no_work)
    model, data = files
    if case == "missing model":
        model = tmp_path / "nothing.pt"
    elif case == "missing data":
        data = tmp_path / "nothing.extxyz"
    elif case == "junk model":
        model, data = _junk_model(tmp_path, files)
    elif case == "unlabelled data":
        model, data = _unlabelled(tmp_path, files)
    elif case == "unknown element":
        model, data = _unknown_element(tmp_path, files)
    args = [a.format(tmp=tmp_path) for a in extra]
    result = runner.invoke(app, ["evaluate", str(model), str(data), *args])
    assert result.exit_code == 2, result.output
    for word in words:
        assert word in result.output, result.output
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.jpg"))
