"""Charge equilibration (electrostatics "qeq"): the analytic two-atom solution, exact totals, the
constrained minimum against coulomb_energy (finite and periodic), conservative forces, symmetry,
and ions beyond the cutoff that interact as k_e q₁q₂/r while their charges follow the distance.
(The shared suite of tests/platform/test_network.py also runs "qeq".)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms

from ionflow.config import ModelConfig
from ionflow.platform.model import Ensemble, ModelSpec, build_batch, build_ensemble, qeq
from ionflow.platform.model.electrostatics import COULOMB_CONSTANT, coulomb_energy
from ionflow.platform.model.qeq import equilibrate_charges, self_hardness

K = COULOMB_CONSTANT


def solve(
    chi, hardness, positions, sizes, charges, width=1.0, cells=None, periodic=None, dtype=torch.float64, reference=None
):
    """equilibrate_charges on plain lists: structures of ``sizes`` atoms, concatenated."""
    sizes = list(sizes)
    periodic = periodic or [False] * len(sizes)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    ptr = torch.tensor([0, *np.cumsum(sizes)])
    cells = torch.zeros(len(sizes), 3, 3, dtype=dtype) if cells is None else torch.as_tensor(cells, dtype=dtype)
    return equilibrate_charges(
        torch.as_tensor(chi, dtype=dtype),
        torch.as_tensor(hardness, dtype=dtype),
        torch.as_tensor(positions, dtype=dtype),
        batch,
        ptr,
        torch.as_tensor(charges, dtype=dtype),
        width,
        cells,
        periodic,
        reference_charges=None if reference is None else torch.as_tensor(reference, dtype=dtype),
    )


@pytest.mark.parametrize(("total", "reference"), [(0.0, None), (1.0, None), (-2.0, None), (1.0, (0.7, 0.3))])
def test_two_atoms_match_the_analytic_solution(total, reference):
    # minimise χ₁q₁ + χ₂q₂ + ½J₁(q₁ − q⁰₁)² + ½J₂(q₂ − q⁰₂)² + ½J_σ(q₁² + q₂²) + k q₁q₂ with q₂ = Q − q₁;
    # with J' = J + J_σ, χ' = χ − J q⁰ and k = k_e erf(r/2σ)/r: q₁ = (χ'₂ − χ'₁ + (J'₂ − k) Q) / (J'₁ + J'₂ − 2k)
    chi, hardness, r, width = (1.2, -0.5), (3.0, 5.0), 2.0, 0.9
    q0 = reference or (0.0, 0.0)
    j_self = K / (math.sqrt(math.pi) * width)
    j1, j2 = (h + j_self for h in hardness)
    c1, c2 = (x - h * q for x, h, q in zip(chi, hardness, q0))
    k = K * math.erf(r / (2 * width)) / r
    q1 = (c2 - c1 + (j2 - k) * total) / (j1 + j2 - 2 * k)
    q2 = total - q1
    energy = (
        chi[0] * q1
        + chi[1] * q2
        + 0.5 * (hardness[0] * (q1 - q0[0]) ** 2 + hardness[1] * (q2 - q0[1]) ** 2)
        + 0.5 * j_self * (q1**2 + q2**2)
        + k * q1 * q2
    )
    q, _, e_qeq, e_coulomb = solve(
        chi, hardness, [[0, 0, 0], [0, r, 0]], [2], [total], width=width, reference=reference
    )
    assert q.tolist() == pytest.approx([q1, q2], abs=1e-12)
    assert float(e_qeq[0]) == pytest.approx(energy, abs=1e-12)
    assert float(e_coulomb[0]) == pytest.approx(k * q1 * q2, abs=1e-12)
    assert abs(q1) > 0.05, "a trivial solution would prove little"


def test_dipole_interactions_are_those_of_close_charge_pairs():
    # a Gaussian dipole μ is the limit of charges ±|μ|/ε at ±ε μ̂/2: the 4x4 pair blocks of the charge
    # and dipole unknowns against coulomb_energy of such pairs (cross terms only), to O(ε²)
    rng = np.random.default_rng(5)
    positions = rng.random((2, 3)) * 3
    x = rng.normal(size=(2, 4))  # [atom, (q, μx, μy, μz)]
    matrix = qeq._finite_matrices(torch.tensor(positions)[None], torch.ones(1, 2, dtype=torch.bool), 1.0, dipoles=True)[
        0
    ]  # [8, 8]
    model_energy = 0.5 * float(torch.tensor(x.reshape(-1)) @ matrix @ torch.tensor(x.reshape(-1)))
    eps = 1e-4

    def cloud(atom):  # the charge, then the dipole as two charges
        mu = x[atom, 1:]
        shift = 0.5 * eps * mu / np.linalg.norm(mu)
        p = positions[atom]
        return [p, p + shift, p - shift], [x[atom, 0], np.linalg.norm(mu) / eps, -np.linalg.norm(mu) / eps]

    (pa, qa), (pb, qb) = cloud(0), cloud(1)
    cross = sum(
        float(coulomb_energy(np.array([u, v]), [s, t], sigma=1.0)) for u, s in zip(pa, qa) for v, t in zip(pb, qb)
    )
    assert model_energy == pytest.approx(cross, rel=1e-6)
    assert abs(x[0, 1:] @ x[1, 1:]) > 0.1


def mixed_batch(dtype):
    """A charged cluster (4 atoms), a neutral one (3) and a charged periodic cell (5): random χ and J."""
    rng = np.random.default_rng(3)
    positions = np.concatenate([rng.random((4, 3)) * 4, rng.random((3, 3)) * 3 + 10, rng.random((5, 3)) * 4.5])
    cells = np.zeros((3, 3, 3))
    cells[2] = np.diag([5.0, 5.5, 6.0]) + 0.3
    chi, hardness = rng.normal(size=12) * 2, rng.random(12) * 4
    out = solve(
        chi, hardness, positions, [4, 3, 5], [-1.0, 0.0, 2.0], cells=cells, periodic=[False, False, True], dtype=dtype
    )
    return out, chi, hardness, positions, cells


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_charges_add_up_exactly_in_a_mixed_batch(dtype):
    (q, _, _, _), *_ = mixed_batch(dtype)
    sums = [float(q[lo:hi].double().sum()) for lo, hi in [(0, 4), (4, 7), (7, 12)]]
    assert sums == pytest.approx([-1.0, 0.0, 2.0], abs=1e-6)
    assert q.abs().min() > 1e-3, "charges must move away from zero for the test to mean anything"


def test_the_charges_are_the_constrained_minimum_of_the_qeq_energy():
    # at the minimum under Σq = Q, the chemical potential ∂E_qeq/∂q_i is the same on every atom of a
    # structure; E_coulomb from coulomb_energy, independent of the matrices the solve builds
    (q, _, e_qeq, e_coulomb), chi, hardness, positions, cells = mixed_batch(torch.float64)
    for s, (lo, hi) in enumerate([(0, 4), (4, 7), (7, 12)]):
        qs = q[lo:hi].detach().clone().requires_grad_(True)
        periodic = s == 2
        e_c = coulomb_energy(positions[lo:hi], qs, cells[s] if periodic else None, pbc=periodic, sigma=1.0)
        (potential,) = torch.autograd.grad(e_c, qs)
        mu = torch.as_tensor(chi[lo:hi]) + (torch.as_tensor(hardness[lo:hi]) + self_hardness(1.0)) * qs + potential
        assert torch.allclose(mu, mu.mean().expand_as(mu), atol=1e-8), s
        assert float(e_coulomb[s]) == pytest.approx(float(e_c), abs=1e-9)
        site = (
            torch.as_tensor(chi[lo:hi]) * qs + 0.5 * (torch.as_tensor(hardness[lo:hi]) + self_hardness(1.0)) * qs**2
        ).sum()
        assert float(e_qeq[s]) == pytest.approx(float(site + e_c), abs=1e-9)


def test_a_periodic_cell_beyond_the_dense_limit_is_refused(monkeypatch):
    monkeypatch.setattr(qeq, "MAX_PERIODIC_ATOMS", 4)
    with pytest.raises(ValueError, match="up to 4 atoms"):
        mixed_batch(torch.float64)


@pytest.fixture(scope="module")
def c() -> Ensemble:
    """An untrained qeq committee of two (r_max 3 Å), shared by the tests below, which do not modify it."""
    return model()


def model(r_max: float = 3.0) -> Ensemble:
    hyper = ModelConfig(
        electrostatics="qeq",
        ensemble_size=2,
        hidden_irreps="8x0e+8x1o",
        mlp_irreps="8x0e",
        num_interactions=1,
        r_max=r_max,
    ).hyper()
    spec = ModelSpec(hyper=hyper, z_table=[1, 8, 11, 17], atomic_energies=[-1.0] * 4, scale=2.0)
    torch.manual_seed(0)
    c = build_ensemble(spec)
    with torch.no_grad():  # random, clearly non-zero heads
        for p in c.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return c


def predict(c: Ensemble, frames: list[Atoms]) -> dict[str, torch.Tensor]:
    return c.forward(build_batch(frames, c.z_table, c.r_max, dtype=c.spec.dtype))


def sodium_water(distance: float) -> Atoms:
    """Na+ ``distance`` Å from a water's O, beyond the 3 Å cutoff of every water atom when distance > 4."""
    atoms = Atoms("OHHNa", positions=[[0, 0, 0.119], [0, 0.763, -0.477], [0, -0.763, -0.477], [0.3, 0.2, distance]])
    atoms.info.update(charge=1, multiplicity=1)
    return atoms


def test_forces_are_finite_differences_across_the_gap(c):
    atoms = sodium_water(6.0)  # no edge between Na and the water
    forces = predict(c, [atoms])["forces"].detach().numpy()
    assert np.linalg.norm(forces[:, 3], axis=-1).min() > 1e-4, "the lone Na feels the water only through the charges"
    h = 1e-5
    for atom, axis in [(3, 2), (3, 0), (0, 1), (1, 2)]:
        e = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[atom, axis] += sign * h
            e.append(predict(c, [moved])["energy"][:, 0].detach().numpy())
        assert np.allclose(forces[:, atom, axis], -(e[0] - e[1]) / (2 * h), atol=1e-6), (atom, axis)


def test_energy_invariant_under_rotation_translation_permutation(c):
    atoms = sodium_water(5.0)
    e0 = predict(c, [atoms])["energy"].detach()
    rotation, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    moved = atoms.copy()
    moved.positions = atoms.positions @ rotation.T + np.array([1.0, -2.0, 0.5])
    for other in (moved, atoms[[3, 0, 2, 1]]):
        assert torch.allclose(predict(c, [other])["energy"].detach(), e0, atol=1e-9)


def test_ions_beyond_the_cutoff_interact_as_charges_that_follow_the_distance(c):
    frames = []
    for r in (12.0, 24.0, 48.0):
        atoms = Atoms("NaCl", positions=[[0, 0, 0], [r, 0, 0]])
        atoms.info.update(charge=0, multiplicity=1)
        frames.append(atoms)
    out = predict(c, frames)
    q = out["charges"].detach().view(2, 3, 2)  # [member, frame, atom]
    energy = out["energy"].detach()  # [member, frame]
    # the local energy is flat out here: all that changes is k_e q_Na q_Cl / r (erf(r/2σ) = 1), with the
    # charges of each separation
    coulomb = torch.stack([K * q[:, f, 0] * q[:, f, 1] / r for f, r in enumerate((12.0, 24.0, 48.0))], dim=1)
    local = energy - coulomb  # [member, frame]: the same at every separation
    assert torch.allclose(local, local[:, :1].expand_as(local), rtol=0, atol=1e-10)
    assert torch.all(q[:, :, 0].abs() > 0.05), "the ions must carry charge"
    # charge transfer between the ions changes with distance, as two-site QEq says: with Q = 0,
    # q_Na = Δ/(S − 2k_e/r) for constants Δ and S (the ions' electronegativities and hardnesses), so 1/q_Na
    # is exactly linear in 1/r
    inverse = 1.0 / q[:, :, 0].double()  # [member, frame]
    slope_near = (inverse[:, 0] - inverse[:, 1]) / (1 / 12.0 - 1 / 24.0)
    slope_far = (inverse[:, 1] - inverse[:, 2]) / (1 / 24.0 - 1 / 48.0)
    assert torch.all((q[:, 0, 0] - q[:, 1, 0]).abs() > 1e-4), "the charges must follow the distance"
    assert torch.allclose(slope_near, slope_far, rtol=1e-8)


def test_a_model_file_round_trips(c, tmp_path):
    from ionflow.platform.model import load_model, save_model

    again = load_model(save_model(c, tmp_path / "qeq.pt"))
    frames = [sodium_water(5.0)]
    a, b = predict(c, frames), predict(again, frames)
    for key in ("energy", "forces", "charges"):
        assert torch.equal(a[key].detach(), b[key].detach()), key
