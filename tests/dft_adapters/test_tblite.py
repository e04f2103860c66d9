"""tblite adapter: agrees with tblite called directly, forces and stress are energy derivatives."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
from ase import Atoms
from ase.units import Bohr, Hartree
from pydantic import ValidationError
from tblite.interface import Calculator

from ionflow.dft_adapters import get_adapter, settings_model
from ionflow.dft_adapters.tblite_adapter import TBLiteAdapter, TBLiteSettings
from tests.structures import hydronium, hydroxyl

TIGHT = {"accuracy": 0.01}  # tighter SCC, so that finite differences resolve 1e-4 eV/Å


def ice_like_cell() -> Atoms:
    """One water in a small triclinic cell (3D periodic), about liquid-water density."""
    atoms = Atoms(
        "OH2",
        positions=[[0.1, 0.0, 0.1], [0.85, 0.55, 0.0], [-0.6, 0.6, 0.1]],
        cell=[[3.2, 0.0, 0.0], [0.2, 3.1, 0.0], [0.1, -0.15, 3.3]],
        pbc=True,
    )
    atoms.info.update(charge=0, multiplicity=1)
    return atoms


def direct(atoms: Atoms) -> tuple[float, np.ndarray]:
    """Energy (eV) and forces (eV/Å) from tblite's own interface, default GFN2-xTB settings."""
    calc = Calculator(
        "GFN2-xTB",
        atoms.numbers,
        atoms.positions / Bohr,
        charge=atoms.info["charge"],
        uhf=atoms.info["multiplicity"] - 1,
    )
    calc.set("verbosity", 0)
    res = calc.singlepoint()
    return res.get("energy") * Hartree, -res.get("gradient") * Hartree / Bohr


@pytest.mark.parametrize(
    "atoms",
    [hydronium(), hydroxyl(charge=-1, multiplicity=1), hydroxyl(charge=0, multiplicity=2)],
    ids=["H3O+", "OH-", "OH-radical"],
)
def test_matches_direct_tblite(atoms):
    result = TBLiteAdapter().label([atoms])[0]
    energy, forces = direct(atoms)

    assert result.ok, result.error
    assert result.energy == pytest.approx(energy, rel=1e-6)
    np.testing.assert_allclose(result.forces, forces, rtol=1e-6, atol=1e-6 * np.abs(forces).max())
    assert result.charges.sum() == pytest.approx(atoms.info["charge"], abs=1e-6)
    assert result.charge_scheme == "tblite-mulliken"
    assert result.dipole.shape == (3,) and result.stress is None
    assert result.code == "tblite" and result.code_version and result.host
    assert 0 < result.cpu_time_s < 60


def test_dipole_of_an_ion_is_about_the_frame_origin():
    atoms = hydronium()
    moved = atoms.copy()
    moved.positions += [1.0, 0.0, 0.0]
    before, after = TBLiteAdapter().label([atoms, moved])
    np.testing.assert_allclose(after.dipole - before.dipole, [1.0, 0.0, 0.0], atol=1e-6)  # charge x shift


def test_forces_are_minus_energy_derivative():
    adapter = TBLiteAdapter(TIGHT)
    atoms = hydronium()
    forces = adapter.label([atoms])[0].forces
    h = 1e-3  # Å
    for atom, axis in [(0, 2), (1, 1), (2, 0), (3, 2)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += h
        minus.positions[atom, axis] -= h
        e_plus, e_minus = (r.energy for r in adapter.label([plus, minus]))
        assert forces[atom, axis] == pytest.approx(-(e_plus - e_minus) / (2 * h), abs=1e-4)


def test_stress_is_strain_derivative_with_ase_sign():
    adapter = TBLiteAdapter(TIGHT)
    atoms = ice_like_cell()
    result = adapter.label([atoms])[0]
    assert result.ok and result.dipole is None and result.stress.shape == (6,)

    # ASE's stress: sigma_ij = (1/V) dE/d(eps_ij) under a symmetric strain of cell and atoms.
    h, volume = 1e-4, atoms.get_volume()
    for voigt, (i, j) in [(0, (0, 0)), (2, (2, 2)), (3, (1, 2)), (5, (0, 1))]:
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * h / 2
            strain[j, i] += sign * h / 2
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            energies.append(adapter.label([strained])[0].energy)
        assert result.stress[voigt] == pytest.approx((energies[0] - energies[1]) / (2 * h) / volume, abs=1e-5)

    # ... and the same as tblite's own ASE calculator.
    from tblite.ase import TBLite

    reference = atoms.copy()
    reference.calc = TBLite(method="GFN2-xTB", accuracy=0.01, verbosity=0)
    np.testing.assert_allclose(result.stress, reference.get_stress(), atol=1e-8)


def test_inconsistent_charge_state_raises_before_computing(record_compute):
    adapter = TBLiteAdapter()
    calls = record_compute(adapter)
    with pytest.raises(ValueError, match="structure 1"):
        adapter.label([hydronium(), hydroxyl(charge=0, multiplicity=1)])
    assert calls == [], "computed despite bad input"
    assert adapter.label([hydronium()])[0].status == "failed" and len(calls) == 1, "the stub stands in"


def test_unconverged_scc_is_a_status_not_an_exception():
    result = TBLiteAdapter({"max_iterations": 2}).label([hydronium()])[0]
    assert result.status == "unconverged" and "not converged" in result.error
    assert result.energy is None and result.forces is None


def test_every_method_the_settings_allow_runs():
    methods = get_args(TBLiteSettings.model_fields["method"].annotation)
    assert set(methods) == {"GFN2-xTB", "GFN1-xTB", "IPEA1-xTB"}
    for method in methods:
        assert TBLiteAdapter({"method": method}).label([hydronium()])[0].ok, method


def test_settings_hash_is_stable_and_tracks_the_method():
    assert TBLiteAdapter().settings_hash == TBLiteAdapter({}).settings_hash
    assert TBLiteAdapter({"method": "GFN1-xTB"}).settings_hash != TBLiteAdapter().settings_hash
    assert TBLiteAdapter({"verbosity": 1}).settings_hash == TBLiteAdapter().settings_hash


def test_settings_reject_unknown_keys():
    with pytest.raises(ValidationError, match="temperature"):
        TBLiteSettings(temperature=300.0)
    with pytest.raises(ValidationError):
        TBLiteSettings(method="GFN0-xTB")
    for key, value in [("accuracy", float("nan")), ("accuracy", 1e300), ("electronic_temperature", -1.0)]:
        with pytest.raises(ValidationError, match=key):
            TBLiteSettings(**{key: value})
    assert settings_model("tblite") is TBLiteSettings
    assert isinstance(get_adapter("tblite"), TBLiteAdapter)
