"""coulomb_energy against lattice sums with known answers, pymatgen, analytic pairs and finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase.build import bulk
from scipy.special import erf

from ionflow.platform.model.electrostatics import COULOMB_CONSTANT, coulomb_energy

K = COULOMB_CONSTANT


@pytest.mark.parametrize("method", ["ewald", "pme"])
@pytest.mark.parametrize(
    ("atoms", "cation", "madelung", "r_nn"),
    [
        (bulk("NaCl", "rocksalt", a=5.64, cubic=True), 11, 1.747565, 5.64 / 2),
        (bulk("NaCl", "rocksalt", a=5.64), 11, 1.747565, 5.64 / 2),  # primitive, non-orthogonal cell
        (bulk("CsCl", "cesiumchloride", a=4.12), 55, 1.762675, 4.12 * math.sqrt(3) / 2),
        (bulk("ZnS", "zincblende", a=5.41, cubic=True), 30, 1.638055, 5.41 * math.sqrt(3) / 4),
    ],
    ids=["NaCl", "NaCl-primitive", "CsCl", "zincblende"],
)
def test_madelung_constants(atoms, cation, madelung, r_nn, method):
    charges = np.where(atoms.numbers == cation, 1.0, -1.0)
    energy = float(coulomb_energy(atoms.positions, charges, atoms.cell.array, method=method, accuracy=1e-7))
    per_formula_unit = energy / (len(atoms) / 2)
    expected = -madelung * K / r_nn
    assert per_formula_unit == pytest.approx(expected, rel=2e-6)


def test_nacl_value_from_the_reference_sheet():
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    charges = np.where(atoms.numbers == 11, 1.0, -1.0)
    assert float(coulomb_energy(atoms.positions, charges, atoms.cell.array)) / 4 == pytest.approx(-8.9235, abs=2e-4)


@pytest.mark.parametrize("method", ["ewald", "pme"])
def test_matches_pymatgen_ewald_on_a_random_triclinic_ionic_cell(method):
    from pymatgen.analysis.ewald import EwaldSummation
    from pymatgen.core import Lattice, Structure

    rng = np.random.default_rng(7)
    lattice = Lattice.from_parameters(6.1, 6.7, 7.3, 81.0, 97.0, 104.0)
    species = ["Mg", "Mg", "O", "O", "Na", "Cl", "Na", "Cl"]
    charges = np.array([2, 2, -2, -2, 1, -1, 1, -1], dtype=float)
    frac = rng.random((8, 3))
    structure = Structure(lattice, species, frac)
    structure.add_oxidation_state_by_element({"Mg": 2, "O": -2, "Na": 1, "Cl": -1})
    reference = EwaldSummation(structure, acc_factor=14.0).total_energy
    energy = coulomb_energy(structure.cart_coords, charges, lattice.matrix, method=method, accuracy=1e-8)
    assert float(energy) == pytest.approx(reference, rel=1e-6)


@pytest.mark.parametrize("r", [0.3, 1.0, 2.5, 6.0])
def test_gaussian_pair_in_vacuum_is_erf_screened(r):
    sigma = np.array([0.8, 1.1])
    positions = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, r]])
    charges = np.array([1.3, -0.7])
    s12 = math.hypot(*sigma)
    expected = K * charges[0] * charges[1] * erf(r / (math.sqrt(2) * s12)) / r
    assert float(coulomb_energy(positions, charges, sigma=sigma)) == pytest.approx(expected, rel=1e-12)


def test_two_ions_far_apart_interact_as_point_charges():
    for r in (20.0, 50.0):
        positions = np.array([[0.0, 0.0, 0.0], [r, 0.0, 0.0]])
        e = float(coulomb_energy(positions, [1.0, -1.0], sigma=1.0))
        assert e == pytest.approx(-K / r, rel=1e-12)


def test_periodic_gaussian_charges_match_the_isolated_pair_in_a_large_box():
    # A neutral Gaussian dimer in a 40 Å box: images add only a dipole-dipole term ~ k p²/L³.
    box = 40.0
    positions = np.array([[20.0, 20.0, 19.0], [20.0, 20.0, 21.0]])
    charges = np.array([0.6, -0.6])
    isolated = float(coulomb_energy(positions, charges, sigma=0.9))
    periodic = float(coulomb_energy(positions, charges, np.eye(3) * box, sigma=0.9, accuracy=1e-8))
    dipole_image_scale = K * (0.6 * 2.0) ** 2 / box**3
    assert abs(periodic - isolated) < 5 * dipole_image_scale
    # and the widths matter: the point-charge answer is clearly different
    point = float(coulomb_energy(positions, charges, np.eye(3) * box, accuracy=1e-8))
    assert abs(point - periodic) > 100 * dipole_image_scale


@pytest.mark.parametrize("periodic", [False, True], ids=["finite", "periodic"])
def test_forces_are_minus_the_finite_difference_gradient(periodic):
    rng = np.random.default_rng(3)
    n = 6
    cell = np.diag([7.0, 7.5, 8.0]) if periodic else None
    positions = rng.random((n, 3)) * 5.0
    charges = rng.normal(size=n)
    charges -= charges.mean()
    sigma = rng.uniform(0.6, 1.2, size=n)
    pos = torch.tensor(positions, requires_grad=True)
    energy = coulomb_energy(pos, torch.tensor(charges), cell, sigma=sigma, accuracy=1e-10)
    forces = -torch.autograd.grad(energy, pos)[0].numpy()
    h = 1e-5
    for atom, axis in [(0, 0), (2, 1), (5, 2), (3, 0)]:
        plus, minus = positions.copy(), positions.copy()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        e_plus = float(coulomb_energy(plus, charges, cell, sigma=sigma, accuracy=1e-10))
        e_minus = float(coulomb_energy(minus, charges, cell, sigma=sigma, accuracy=1e-10))
        assert forces[atom, axis] == pytest.approx(-(e_plus - e_minus) / (2 * h), abs=1e-6)


def test_periodic_energy_is_translation_invariant_also_for_a_charged_cell():
    rng = np.random.default_rng(5)
    positions = rng.random((5, 3)) * 6.0
    charges = np.array([1.0, -0.5, 0.7, -0.2, 0.4])  # net +1.4 e: neutralising background
    cell = np.diag([6.0, 6.5, 7.0])
    e0 = float(coulomb_energy(positions, charges, cell, sigma=0.8))
    e1 = float(coulomb_energy(positions + np.array([1.3, -2.1, 0.4]), charges, cell, sigma=0.8))
    assert e1 == pytest.approx(e0, abs=1e-6)


def test_bad_input_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="positions"):
        coulomb_energy(np.zeros((3, 2)), [1, -1, 0])
    with pytest.raises(ValueError, match="charges"):
        coulomb_energy(np.zeros((3, 3)), [1, -1])
    with pytest.raises(ValueError, match="positive"):
        coulomb_energy(np.eye(3), [1, -1, 0], sigma=0.0)
    with pytest.raises(ValueError, match="periodic"):
        coulomb_energy(np.eye(3), [1, -1, 0], method="ewald")
    with pytest.raises(ValueError, match="volume"):
        coulomb_energy(np.eye(3), [1, -1, 0], cell=np.zeros((3, 3)), pbc=True)
