"""The model file's format versions: files of version 3 ("ionflow-committee") still load and predict
what they predicted when they were written; new files are version 4 ("ionflow-ensemble").

``tests/data/model-format-v3.pt`` was written by ionflow's version-3 code: an untrained committee
for H and O (ensemble_size 2, hidden_irreps 4x0e+4x1o, mlp_irreps 4x0e, one interaction, r_max 3 Å,
equilibrated charges, float64, seeds 21 and 22), every weight then moved by 0.1 x N(0, 1) (torch
seed 0) so that no head is zero, and calibration factors 1.25 (energy) and 0.75 (forces).
``model-format-v3.json`` holds what that code predicted for H3O+ (charge +1, singlet).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms

from ionflow.platform.model import (
    Committee,
    CommitteeCalculator,
    EnsembleCalculator,
    build_batch,
    load_calculator,
    load_model,
    save_model,
)
from ionflow.platform.model.files import FORMAT, FORMAT_VERSION

DATA = Path(__file__).resolve().parents[1] / "data"
V3_FILE = DATA / "model-format-v3.pt"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((DATA / "model-format-v3.json").read_text())


def hydronium_of(reference: dict) -> Atoms:
    atoms = Atoms(numbers=reference["numbers"], positions=reference["positions"])
    atoms.info.update(charge=reference["charge"], multiplicity=reference["multiplicity"])
    return atoms


def predict(model, atoms: Atoms) -> dict[str, np.ndarray]:
    batch = build_batch([atoms], model.z_table, model.r_max, dtype=model.spec.dtype)
    return {k: v.numpy() for k, v in model.predict(batch).items()}


def test_a_version_3_file_predicts_what_it_did(reference):
    payload = torch.load(V3_FILE, weights_only=True)
    assert (payload["format"], payload["format_version"]) == ("ionflow-committee", 3)
    assert V3_FILE.stat().st_size < 200_000
    model = load_model(V3_FILE)
    assert isinstance(model, Committee) and model.size == 2
    assert model.spec.calibration == {"energy": 1.25, "forces": 0.75}
    pred = predict(model, hydronium_of(reference))
    forces = np.asarray(reference["forces_members"])
    assert np.abs(forces).max() > 0.1, "the reference forces must not be trivially zero"
    np.testing.assert_allclose(pred["energies"][:, 0], reference["energies"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(pred["forces_members"], forces, rtol=0, atol=1e-10)
    np.testing.assert_allclose(pred["energy_std"][0], reference["energy_std"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(pred["charges"], reference["charges"], rtol=0, atol=1e-10)
    assert pred["charges"].sum() == pytest.approx(1.0, abs=1e-10)


def test_new_files_without_a_foundation_are_version_4_and_round_trip(reference, tmp_path):
    """Version 5 only adds a foundation backbone: a model without one is written as version 4,
    with no key an ionflow release before 5 would not know."""
    model = load_model(V3_FILE)
    path = save_model(model, tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    assert (payload["format"], payload["format_version"]) == (FORMAT, 4) and FORMAT_VERSION == 5
    assert "backbone" not in payload["spec"] and "foundation" not in payload["spec"]
    again = load_model(path)
    assert again.spec.to_dict() == model.spec.to_dict()
    atoms = hydronium_of(reference)
    a, b = predict(model, atoms), predict(again, atoms)
    for key in ("energies", "forces_members", "energy_std", "force_std", "charges", "dipole"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize(("name", "version"), [("ionflow-committee", 2), ("ionflow-committee", 4), (FORMAT, 3)])
def test_other_versions_are_refused(tmp_path, name, version):
    payload = torch.load(V3_FILE, weights_only=True)
    payload.update(format=name, format_version=version)
    path = tmp_path / "old.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=f"version {version} of format '{name}' is not supported"):
        load_model(path)


def test_the_calculator_keeps_its_old_name(reference):
    """Users' scripts import CommitteeCalculator and read ``calc.committee``: both still work."""
    assert CommitteeCalculator is EnsembleCalculator
    calc = load_calculator(V3_FILE)
    assert isinstance(calc, EnsembleCalculator) and calc.committee is calc.ensemble
    atoms = hydronium_of(reference)
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(np.mean(reference["energies"]), abs=1e-10)
