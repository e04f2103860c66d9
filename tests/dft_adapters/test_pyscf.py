"""PySCF adapter: agrees with a direct PySCF call, forces are -dE/dx, refuses bad input early."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.units import Bohr, Hartree
from pydantic import ValidationError
from pyscf import dft, gto, lib

from ionflow.dft_adapters import ADAPTER_NAMES, ReferenceAdapter, SettingError, get_adapter, settings_model
from ionflow.dft_adapters.pyscf_adapter import PySCFAdapter, PySCFSettings
from tests.structures import hydronium, hydroxyl, water

# One OpenMP thread: on a busy 2-core machine, spinning OpenMP threads slow tiny jobs tenfold.
FAST = {"basis": "6-31g", "conv_tol": 1e-10, "num_threads": 1}


def direct(atoms: Atoms, xc: str, basis: str, conv_tol: float) -> tuple[float, np.ndarray]:
    """Energy (eV) and forces (eV/Å) from PySCF called by hand, as a user would."""
    spin = atoms.info["multiplicity"] - 1
    mol = gto.M(
        atom=list(zip(atoms.get_chemical_symbols(), map(tuple, atoms.positions))),
        unit="Angstrom",
        basis=basis,
        charge=atoms.info["charge"],
        spin=spin,
        verbose=0,
    )
    mf = (dft.RKS if spin == 0 else dft.UKS)(mol, xc=xc).density_fit()
    mf.grids.level = 3
    mf.conv_tol = conv_tol
    with lib.with_omp_threads(1):
        mf.kernel()
        assert mf.converged
        return mf.e_tot * Hartree, -mf.nuc_grad_method().kernel() * Hartree / Bohr


def test_matches_direct_pyscf_for_a_cation():
    atoms = hydronium()
    result = PySCFAdapter(FAST).label([atoms])[0]
    energy, forces = direct(atoms, "pbe", "6-31g", 1e-10)

    assert result.ok and result.extra["scf"] == "RKS"
    assert result.energy == pytest.approx(energy, rel=1e-6)
    np.testing.assert_allclose(result.forces, forces, rtol=1e-6, atol=1e-6 * np.abs(forces).max())
    assert result.charges.sum() == pytest.approx(1.0, abs=1e-6)
    assert result.charge_scheme == "meta_lowdin"
    assert result.dipole.shape == (3,)
    assert result.code == "pyscf" and result.code_version and result.host and result.wall_time_s > 0


def test_thread_setting_is_restored_afterwards():
    before = lib.num_threads()
    PySCFAdapter({**FAST, "basis": "sto-3g"}).label([hydroxyl(charge=-1, multiplicity=1)])
    assert lib.num_threads() == before


def test_forces_are_minus_energy_derivative():
    # A fine grid: PySCF's forces leave out the grid's response to moving atoms, which a
    # coarse grid makes visible at the 1e-4 eV/Å level.
    adapter = PySCFAdapter({**FAST, "basis": "sto-3g", "conv_tol": 1e-11, "grid_level": 5})
    atoms = hydronium()
    forces = adapter.label([atoms])[0].forces
    h = 1e-3  # Å
    for atom, axis in [(0, 2), (1, 1)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += h
        minus.positions[atom, axis] -= h
        e_plus, e_minus = (r.energy for r in adapter.label([plus, minus]))
        assert forces[atom, axis] == pytest.approx(-(e_plus - e_minus) / (2 * h), abs=1e-4)


def test_dipole_of_an_ion_is_about_the_frame_origin():
    atoms = hydronium()
    moved = atoms.copy()
    moved.positions += [1.0, 0.0, 0.0]
    before, after = PySCFAdapter({**FAST, "basis": "sto-3g"}).label([atoms, moved])
    np.testing.assert_allclose(after.dipole - before.dipole, [1.0, 0.0, 0.0], atol=1e-5)  # charge x shift


def test_doublet_runs_unrestricted():
    atoms = hydroxyl(charge=0, multiplicity=2)
    result = PySCFAdapter({**FAST, "charge_scheme": "mulliken"}).label([atoms])[0]
    energy, forces = direct(atoms, "pbe", "6-31g", 1e-10)

    assert result.ok and result.extra["scf"] == "UKS"
    assert result.energy == pytest.approx(energy, rel=1e-6)
    # The radical's hole is shared between two degenerate pi orbitals in a ratio set by
    # round-off (the adapter feeds Bohr, the direct call Å); the grid is not exactly symmetric
    # between them, so forces agree to ~1e-5 eV/Å here, not to 1e-6 relative.
    np.testing.assert_allclose(result.forces, forces, atol=2e-4)
    assert result.charges.sum() == pytest.approx(0.0, abs=1e-6)
    assert result.charge_scheme == "mulliken"


@pytest.mark.parametrize(
    "bad", [water(multiplicity=2), hydroxyl(charge=0, multiplicity=1)], ids=["H2O-doublet", "OH-singlet"]
)
def test_inconsistent_charge_state_raises_before_computing(bad, record_compute):
    adapter = PySCFAdapter(FAST)
    calls = record_compute(adapter)
    with pytest.raises(ValueError, match="structure 1"):
        adapter.label([hydronium(), bad])
    assert calls == [], "computed despite bad input"
    assert adapter.label([hydronium()])[0].status == "failed" and len(calls) == 1, "the stub stands in"


def test_periodic_structure_is_refused(record_compute):
    crystal = molecule("H2O", vacuum=3.0, pbc=True)
    adapter = PySCFAdapter(FAST)
    calls = record_compute(adapter)
    with pytest.raises(ValueError, match="molecules only"):
        adapter.label([hydronium(), crystal])
    assert calls == [], "computed a periodic cell"


def test_element_missing_from_the_basis_is_refused_before_computing(record_compute):
    gold = Atoms("Au", positions=[[0, 0, 0]], info={"multiplicity": 2})  # 6-31g has no Au
    adapter = PySCFAdapter(FAST)
    calls = record_compute(adapter)
    with pytest.raises(SettingError, match="'6-31g' has no functions for Au") as info:
        adapter.label([hydronium(), gold])
    assert info.value.setting == "basis"
    assert calls == []
    PySCFAdapter({**FAST, "basis": "def2-svp"}).check([gold])  # def2-svp has Au


def test_a_wrong_signature_stub_is_not_taken_for_a_failed_calculation(monkeypatch):
    adapter = PySCFAdapter(FAST)
    monkeypatch.setattr(adapter, "_compute", lambda atoms: {"status": "ok"})
    with pytest.raises(TypeError):
        adapter.label([hydronium()])


def test_unconverged_scf_is_a_status_not_an_exception():
    # max_cycle=2 bounds the retry to 2 x 2 damped cycles, far too few for 1e-8 Ha.
    settings = {**FAST, "basis": "sto-3g", "conv_tol": 1e-8, "max_cycle": 2}
    result = PySCFAdapter(settings).label([hydronium()])[0]
    assert result.status == "unconverged"
    assert result.energy is None and result.forces is None
    assert "not converged" in result.error


def test_retry_rescues_a_slow_scf_without_changing_the_answer():
    # H3O+ needs 7 cycles here: 5 fail, and the level-shifted retry (up to 10 more) converges.
    rescued, plain = (PySCFAdapter({**FAST, "max_cycle": n}).label([hydronium()])[0] for n in (5, 100))
    assert rescued.ok and rescued.extra["scf_retry"] and not plain.extra["scf_retry"]
    assert rescued.energy == pytest.approx(plain.energy, rel=1e-9)
    np.testing.assert_allclose(rescued.forces, plain.forces, atol=1e-4)


def test_one_failure_does_not_stop_the_batch():
    collapsed = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0]], info={"charge": 0, "multiplicity": 1})
    failed, ok = PySCFAdapter(FAST).label([collapsed, hydroxyl(charge=-1, multiplicity=1)])
    # PySCF refuses the geometry ("Ill geometry") or, on some builds, its overlap matrix ("singular")
    assert failed.status == "failed" and failed.energy is None
    assert "Ill geometry" in failed.error or "singular" in failed.error, failed.error
    assert ok.ok and ok.charges.sum() == pytest.approx(-1.0, abs=1e-6)


def test_the_log_goes_to_the_run_folder_not_the_console(tmp_path, capfd):
    result = PySCFAdapter({**FAST, "basis": "sto-3g"}).label([hydronium()], [tmp_path / "run"])[0]
    out, err = capfd.readouterr()
    assert result.ok
    assert "output file" not in out + err, out  # Mole.build(output=...) prints it
    log = (tmp_path / "run" / "pyscf.log").read_text()
    assert "converged SCF energy" in log  # the log is kept, at verbose 4


def test_settings_hash_is_stable_and_tracks_the_level_of_theory():
    a, b = PySCFAdapter(FAST), PySCFAdapter(dict(FAST))
    assert a.settings_hash == b.settings_hash
    assert PySCFAdapter({**FAST, "basis": "sto-3g"}).settings_hash != a.settings_hash
    # Threads change how fast, not what: same hash.
    assert PySCFAdapter({**FAST, "num_threads": None}).settings_hash == a.settings_hash


def test_settings_reject_unknown_keys_and_functionals():
    with pytest.raises(ValidationError, match="basis_set"):
        PySCFSettings(basis_set="sto-3g")
    for typo in ("not-a-functional", "pbe,,", "*", "", " , "):
        with pytest.raises(ValidationError, match="xc"):
            PySCFSettings(xc=typo)
    with pytest.raises(ValidationError, match="'def2-svq' is unknown to PySCF"):
        PySCFSettings(basis="def2-svq")
    assert PySCFSettings(xc="b3lyp", basis="cc-pvdz").basis == "cc-pvdz"


@pytest.mark.parametrize(
    ("key", "value"),
    [("conv_tol", float("nan")), ("conv_tol", 1e300), ("conv_tol", 0.0), ("max_cycle", 10**9), ("grid_level", 10)],
)
def test_settings_reject_numbers_out_of_range(key, value):
    with pytest.raises(ValidationError, match=key):
        PySCFSettings(**{key: value})


def test_registry():
    assert set(ADAPTER_NAMES) == {"pyscf", "tblite", "ase"}
    assert settings_model("pyscf") is PySCFSettings
    adapter = get_adapter("pyscf", {"basis": "sto-3g"})
    assert isinstance(adapter, PySCFAdapter) and isinstance(adapter, ReferenceAdapter)
    with pytest.raises(ValueError, match="pyscf, tblite, ase"):
        get_adapter("vasp")
