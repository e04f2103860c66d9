"""Structures: content ids survive files and dtypes, charge states are checked by electron count."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from ionflow.platform.structures import (
    REF_PREFIX,
    charge_state_problem,
    closest_contact,
    electron_count,
    labelled_copy,
    overlap_problem,
    rattled,
    read_structures,
    structure_hash,
    with_charge_state,
    write_extxyz,
)
from tests.structures import hydronium, water

# --- content hash -----------------------------------------------------------------------------


def test_hash_survives_extxyz_round_trip(tmp_path):
    # 40 frames: about 1 in 25 has a coordinate within 5e-9 Å (ASE writes 8 decimals) of a 1e-6 Å rounding boundary.
    frames = rattled(hydronium(), n=40, stdev=0.1, seed=0)
    frames.append(with_charge_state(Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.98]]), 0, 2))
    cell = water()
    cell.set_cell([[3.2, 0.0, 0.0], [0.2, 3.1, 0.0], [0.1, -0.15, 3.3]])
    cell.pbc = True
    frames.append(cell)
    labelled = [labelled_copy(a, energy=-1.5 * i, forces=np.full((len(a), 3), 0.1 * i)) for i, a in enumerate(frames)]

    path = write_extxyz(tmp_path / "sub" / "frames.extxyz", labelled)
    back = read_structures(path)

    assert [structure_hash(a) for a in back] == [structure_hash(a) for a in frames]
    assert not list(path.parent.glob("*.tmp")), "atomic write left its temporary file behind"
    for orig, read in zip(labelled, back):
        assert read.info["charge"] == orig.info["charge"]
        assert read.info["multiplicity"] == orig.info["multiplicity"]
        assert read.info[REF_PREFIX + "energy"] == pytest.approx(orig.info[REF_PREFIX + "energy"], abs=1e-12)
        np.testing.assert_allclose(read.arrays[REF_PREFIX + "forces"], orig.arrays[REF_PREFIX + "forces"])
        assert read.calc is None, "REF_ labels must not be turned into a calculator"


@pytest.mark.parametrize(
    "change",
    [
        lambda a: a.info.update(charge=a.info["charge"] + 1),
        lambda a: a.info.update(multiplicity=3),
        lambda a: a.positions.__setitem__((1, 2), a.positions[1, 2] + 2e-6),
        lambda a: a.positions.__setitem__((0, 0), a.positions[0, 0] - 1e-5),
        lambda a: a.numbers.__setitem__(1, 9),
        lambda a: a.set_cell([5.0, 5.0, 5.0]),
        lambda a: a.set_pbc([True, False, False]),
    ],
    ids=["charge", "multiplicity", "position+2e-6", "position-1e-5", "element", "cell", "pbc"],
)
def test_hash_changes_with_content(change):
    atoms = hydronium()
    atoms.positions = np.round(atoms.positions, 3)  # away from a rounding boundary at 1e-6 Å
    before = structure_hash(atoms)
    changed = atoms.copy()
    change(changed)
    assert structure_hash(changed) != before
    assert structure_hash(atoms) == before, "hashing must not modify the structure"


def test_hash_default_charge_state_equals_explicit_neutral_singlet():
    bare = molecule("H2O")
    assert structure_hash(bare) == structure_hash(water(0, 1))
    assert structure_hash(bare) != structure_hash(water(1, 2))


def test_hash_ignores_sub_resolution_noise_and_negative_zero():
    atoms = hydronium()
    atoms.positions = np.round(atoms.positions, 3)
    atoms.positions[0] = [0.0, 0.0, 0.125]
    noisy = atoms.copy()
    noisy.positions = noisy.positions + 1e-9
    flipped = atoms.copy()
    flipped.positions[0, :2] = [-0.0, -1e-12]  # rounds to -0.0; must hash like +0.0
    assert structure_hash(noisy) == structure_hash(atoms)
    assert structure_hash(flipped) == structure_hash(atoms)


def test_hash_same_for_float32_and_float64_positions():
    atoms = hydronium()
    pos64 = np.round(atoms.positions, 4)
    atoms.positions = pos64
    as32 = atoms.copy()
    as32.arrays["positions"] = pos64.astype(np.float32)  # as read by a float32 code
    assert as32.positions.dtype == np.float32
    # float32 keeps these 4-decimal positions to < 1e-7 Å, well inside the 1e-6 Å rounding.
    assert np.abs(as32.positions.astype(float) - pos64).max() < 1e-7
    assert structure_hash(as32) == structure_hash(atoms)

    big = as32.copy()
    big.arrays["numbers"] = big.numbers.astype(np.int32)
    assert structure_hash(big) == structure_hash(atoms), "integer width of numbers must not matter"


# --- charge states ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("symbols", "charge", "multiplicity"),
    [("OH2", 0, 1), ("OH3", 1, 1), ("OH", 0, 2), ("OH", -1, 1), ("O2", 0, 3), ("H", 0, 2), ("H", 1, 1)],
    ids=["H2O 0/1", "H3O+ 1/1", "OH radical 0/2", "OH- -1/1", "O2 triplet", "H atom", "bare proton"],
)
def test_consistent_charge_states_accepted(symbols, charge, multiplicity):
    numbers = Atoms(symbols).numbers
    assert charge_state_problem(numbers, charge, multiplicity) is None


@pytest.mark.parametrize(
    ("symbols", "charge", "multiplicity", "n_electrons"),
    [("OH2", 0, 2, 10), ("OH", 0, 1, 9), ("OH3", 0, 1, 11), ("OH2", 1, 1, 9)],
    ids=["H2O 0/2", "OH 0/1", "H3O 0/1", "H2O+ 1/1"],
)
def test_inconsistent_parity_rejected_with_electron_count(symbols, charge, multiplicity, n_electrons):
    numbers = Atoms(symbols).numbers
    assert electron_count(numbers, charge) == n_electrons
    problem = charge_state_problem(numbers, charge, multiplicity)
    assert problem is not None
    assert "electrons" in problem
    assert str(n_electrons) in problem
    assert f"multiplicity {multiplicity}" in problem


def test_too_many_unpaired_or_negative_electrons_rejected():
    h = Atoms("H").numbers
    assert "electrons" in charge_state_problem(h, 0, 4)  # 3 unpaired, 1 electron
    assert "electrons" in charge_state_problem(h, 2, 1)  # -1 electrons
    assert "multiplicity" in charge_state_problem(h, 0, 0)


# --- overlaps ---------------------------------------------------------------------------------


def test_overlap_names_the_two_atoms():
    atoms = hydronium()
    atoms.positions[2] = atoms.positions[0] + [0.1, 0.0, 0.0]
    problem = overlap_problem(atoms)
    assert problem is not None
    assert "atoms 0 (O) and 2 (H)" in problem
    assert "0.100" in problem
    assert closest_contact(atoms)[1:] == (0, 2)


def test_no_overlap_for_sane_molecules_and_single_atoms():
    assert overlap_problem(hydronium()) is None
    assert overlap_problem(water()) is None
    assert overlap_problem(Atoms("H")) is None


def test_overlap_uses_minimum_image_in_periodic_cells():
    atoms = Atoms("H2", positions=[[0.05, 1.0, 1.0], [2.95, 1.0, 1.0]], cell=[3.0, 3.0, 3.0], pbc=True)
    assert closest_contact(atoms)[0] == pytest.approx(0.1)
    assert "atoms 0 (H) and 1 (H)" in overlap_problem(atoms)
    atoms.pbc = False
    assert overlap_problem(atoms) is None


def _all_pairs_contact(atoms):
    d = atoms.get_all_distances(mic=bool(np.any(atoms.pbc)))
    d[np.diag_indices(len(atoms))] = np.inf
    return float(d.min())


@pytest.mark.parametrize(
    "cell, pbc",
    [
        (np.diag([9.0, 10.0, 11.0]), True),  # cubic-ish
        ([[8.0, 0.0, 0.0], [3.0, 8.0, 0.0], [1.0, 2.0, 9.0]], True),  # triclinic
        (np.diag([2.5, 2.5, 40.0]), [True, True, False]),  # a slab thinner than the search radius
        (np.zeros((3, 3)), False),  # a cluster
    ],
)
def test_closest_contact_of_large_structures_is_the_all_pairs_minimum(cell, pbc):
    """Above a few dozen atoms the closest contact comes from neighbour lists (O(n), once per MD
    step): the same distance as all minimum-image pairs, an atom's own images excluded."""
    rng = np.random.default_rng(7)
    for n, spread in ((40, 1.0), (120, 1.0), (60, 25.0)):  # dense, denser, sparse (beyond the radii)
        box = np.asarray(cell, dtype=float)
        frac = rng.random((n, 3)) * spread
        positions = frac @ box if np.any(box) else rng.random((n, 3)) * 6.0 * spread
        atoms = Atoms(f"H{n}", positions=positions, cell=cell, pbc=pbc)
        dmin, i, j = closest_contact(atoms)
        assert dmin == pytest.approx(_all_pairs_contact(atoms), abs=1e-9)
        assert i < j and atoms.get_distance(i, j, mic=bool(np.any(atoms.pbc))) == pytest.approx(dmin, abs=1e-9)


def test_an_atoms_own_periodic_images_are_not_its_closest_contact():
    """A cell 1 Å along x, 42 atoms 2 Å apart in y and z: each atom's image is 1 Å away, another atom 2 Å."""
    grid = np.array([[0.0, 2.0 * a, 2.0 * b] for a in range(6) for b in range(7)])
    atoms = Atoms("H42", positions=grid, cell=[1.0, 12.0, 14.0], pbc=True)
    assert closest_contact(atoms)[0] == pytest.approx(2.0)


# --- rattled / labelled_copy -------------------------------------------------------------------


def test_rattled_reproducible_by_seed_and_keeps_charge_state():
    start = hydronium()
    a = rattled(start, n=4, stdev=0.05, seed=42)
    b = rattled(start, n=4, stdev=0.05, seed=42)
    c = rattled(start, n=4, stdev=0.05, seed=43)
    assert [structure_hash(x) for x in a] == [structure_hash(x) for x in b]
    assert not any(np.allclose(x.positions, y.positions) for x, y in zip(a, c))
    assert len({structure_hash(x) for x in a}) == 4, "frames of one call must differ"
    for frame in a:
        assert frame.info["charge"] == 1 and frame.info["multiplicity"] == 1
        assert frame.calc is None
    np.testing.assert_array_equal(start.positions, hydronium().positions)


def test_rattled_displacements_have_requested_stdev():
    start = hydronium()
    frames = rattled(start, n=400, stdev=0.08, seed=1)
    disp = np.stack([f.positions - start.positions for f in frames])
    assert abs(disp.mean()) < 0.005
    assert disp.std() == pytest.approx(0.08, rel=0.05)


def test_labelled_copy_stores_ref_keys_and_leaves_original_alone():
    atoms = hydronium()
    forces = np.arange(12.0).reshape(4, 3)
    out = labelled_copy(atoms, -123.4, forces, dipole=[0.1, 0.2, 0.3], charges=[0.4, 0.2, 0.2, 0.2], stress=None)
    assert out.info["REF_energy"] == -123.4
    np.testing.assert_array_equal(out.arrays["REF_forces"], forces)
    np.testing.assert_array_equal(out.info["REF_dipole"], [0.1, 0.2, 0.3])
    np.testing.assert_array_equal(out.arrays["REF_charges"], [0.4, 0.2, 0.2, 0.2])
    assert "REF_stress" not in out.info
    assert out.info["charge"] == 1
    assert not any(k.startswith(REF_PREFIX) for k in list(atoms.info) + list(atoms.arrays))
    with pytest.raises(ValueError):
        labelled_copy(atoms, 0.0, np.zeros((3, 3)))  # wrong number of atoms
