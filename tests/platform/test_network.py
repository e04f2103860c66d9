"""The electrostatic members: exact charge and spin totals, conservative forces, symmetry,
the long-range tail a local model cannot have, stress and the field term."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from ionflow.config import ModelConfig
from ionflow.platform.model import Ensemble, ModelSpec, build_batch, build_ensemble
from ionflow.platform.model.electrostatics import COULOMB_CONSTANT
from ionflow.platform.model.network import _HeadForces, _helmert

MODES = ["none", "latent", "equilibrated", "polarisable", "qeq"]


KINDS = ["committee", "shallow"]


def ensemble(
    mode: str, dtype: str = "float64", z_table=(1, 8, 11, 17), r_max=4.0, uncertainty: str = "committee"
) -> Ensemble:
    """Two members, or three heads (two contrasts) of a shallow ensemble."""
    hyper = ModelConfig(
        electrostatics=mode,
        ensemble_size=2 if uncertainty == "committee" else 3,
        hidden_irreps="8x0e+8x1o",
        mlp_irreps="8x0e",
        num_interactions=1,
        dtype=dtype,
        r_max=r_max,
        uncertainty=uncertainty,
    ).hyper()
    spec = ModelSpec(hyper=hyper, z_table=list(z_table), atomic_energies=[-1.0] * len(z_table), scale=2.0)
    torch.manual_seed(0)
    c = build_ensemble(spec)
    with torch.no_grad():  # random, clearly non-zero heads: a test of the plumbing, not of training
        for p in c.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return c


def hydroxide(charge=-1, multiplicity=1, shift=(0.0, 0.0, 0.0)) -> Atoms:
    atoms = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]])
    atoms.positions += shift
    atoms.info.update(charge=charge, multiplicity=multiplicity)
    return atoms


def water_cation() -> Atoms:
    atoms = molecule("H2O")
    atoms.info.update(charge=1, multiplicity=2)
    return atoms


def energy_and_forces(c: Ensemble, frames, stress=False):
    return c.forward(build_batch(frames, c.z_table, c.r_max, dtype=c.spec.dtype), compute_stress=stress)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mode", MODES[1:])
def test_charges_and_spins_add_up_exactly(mode, dtype, kind):
    c = ensemble(mode, dtype, uncertainty=kind)
    frames = [hydroxide(-1, 1), water_cation(), hydroxide(0, 2)]
    out = energy_and_forces(c, frames)
    batch = build_batch(frames, c.z_table, c.r_max)["batch"]
    for k in range(out["charges"].shape[0]):
        q = torch.zeros(3, dtype=torch.float64).index_add_(0, batch, out["charges"][k].double())
        s = torch.zeros(3, dtype=torch.float64).index_add_(0, batch, out["spins"][k].double())
        assert torch.allclose(q, torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64), atol=1e-6)
        assert torch.allclose(s, torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_forces_are_minus_the_finite_difference_gradient(mode, kind):
    # for the shallow ensemble: every head's forces, built from the batched contrast gradients
    c = ensemble(mode, uncertainty=kind)
    atoms = water_cation()
    forces = energy_and_forces(c, [atoms])["forces"].detach().numpy()
    assert np.abs(forces[1:] - forces[:1]).max() > 1e-3, "members/heads agree: the check would prove little"
    h = 1e-5
    for atom, axis in [(0, 0), (1, 2), (2, 1)]:
        e = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[atom, axis] += sign * h
            e.append(energy_and_forces(c, [moved])["energy"][:, 0].detach().numpy())
        fd = -(e[0] - e[1]) / (2 * h)  # per member or head
        assert np.allclose(forces[:, atom, axis], fd, atol=1e-6), (mode, atom, axis)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_energy_invariant_under_rotation_translation_permutation(mode, kind):
    c = ensemble(mode, uncertainty=kind)
    atoms = water_cation()
    e0 = energy_and_forces(c, [atoms])["energy"].detach()
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    moved = atoms.copy()
    moved.positions = atoms.positions @ q.T + np.array([1.0, -2.0, 0.5])
    permuted = atoms[[0, 2, 1]]
    for other in (moved, permuted):
        assert torch.allclose(energy_and_forces(c, [other])["energy"].detach(), e0, atol=1e-8)


@pytest.mark.parametrize("mode", [m for m in MODES if m != "qeq"])  # qeq's charges follow r: test_qeq.py
def test_ions_far_beyond_the_cutoff_interact_as_charges(mode):
    # Na and Cl 12 and 24 Å apart, far beyond the 4 Å cutoff: only the Coulomb term can tell.
    c = ensemble(mode)
    frames = []
    for r in (12.0, 24.0):
        atoms = Atoms("NaCl", positions=[[0, 0, 0], [r, 0, 0]])
        atoms.info.update(charge=0, multiplicity=1)
        frames.append(atoms)
    out = energy_and_forces(c, frames)
    de = (out["energy"][:, 0] - out["energy"][:, 1]).detach()
    if mode == "none":
        assert torch.allclose(de, torch.zeros_like(de), atol=1e-10)
        return
    near, far = out["charges"][:, :2].detach(), out["charges"][:, 2:].detach()
    assert torch.all(near[:, 0].abs() > 1e-3)
    if mode != "polarisable":  # same local environments: the same charges at both separations
        assert torch.allclose(near, far, atol=1e-10)
    else:  # polarised by the other ion's potential, which falls off with distance
        assert not torch.allclose(near, far, atol=1e-6)
    # the local energy does not depend on the separation: all of it is k q_a q_b / r (erf(r/2σ) = 1 here)
    expected = COULOMB_CONSTANT * (near[:, 0] * near[:, 1] / 12.0 - far[:, 0] * far[:, 1] / 24.0)
    assert torch.allclose(de, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["equilibrated", "polarisable", "qeq"])
def test_periodic_stress_is_the_strain_derivative(mode, kind):
    # a shallow ensemble's stress is that of the heads' mean energy
    c = ensemble(mode, r_max=3.5, uncertainty=kind)
    rng = np.random.default_rng(2)
    atoms = Atoms("NaClNaCl", positions=rng.random((4, 3)) * 4.5, cell=np.diag([5.0, 5.5, 6.0]) + 0.3, pbc=True)
    atoms.info.update(charge=0, multiplicity=1)
    stress = energy_and_forces(c, [atoms], stress=True)["stress"][:, 0].detach().numpy()  # [K, 3, 3]
    h = 1e-5
    volume = atoms.get_volume()
    for i, j in [(0, 0), (1, 2), (2, 2)]:
        e = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * h / 2
            strain[j, i] += sign * h / 2
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            e.append(energy_and_forces(c, [strained])["energy"][:, 0].detach().numpy())
        fd = (e[0] - e[1]) / (2 * h) / volume  # per member or head
        assert np.allclose(stress[:, i, j], fd if kind == "committee" else fd.mean(), atol=1e-6)


def test_uniform_field_adds_minus_dipole_dot_field():
    c = ensemble("equilibrated")
    atoms = water_cation()
    batch = build_batch([atoms], c.z_table, c.r_max)
    plain = c.forward(batch)
    field = torch.tensor([[0.0, 0.2, -0.1]], dtype=torch.float64)
    in_field = c.forward({**build_batch([atoms], c.z_table, c.r_max), "field": field})
    expected = plain["energy"] - (plain["dipole"] * field).sum(-1)
    assert torch.allclose(in_field["energy"], expected.detach(), atol=1e-10)


@pytest.mark.parametrize("stress", [False, True])
@pytest.mark.parametrize("mode", ["none", "equilibrated", "qeq"])
def test_mean_only_forces_are_the_mean_of_the_heads_forces(mode, stress):
    # head_forces=False: one backward pass of the mean energy instead of one per head
    c = ensemble(mode, r_max=3.5, uncertainty="shallow")
    rng = np.random.default_rng(3)
    periodic = Atoms("NaClNaCl", positions=rng.random((4, 3)) * 4.5, cell=np.diag([5.0, 5.5, 6.0]) + 0.3, pbc=True)
    periodic.info.update(charge=0, multiplicity=1)
    batch = build_batch([water_cation(), hydroxide(), periodic], c.z_table, c.r_max)
    every = c.member(batch, compute_stress=stress)
    mean = c.member(batch, compute_stress=stress, head_forces=False)
    assert every["forces_heads"].shape == (3, 9, 3) and mean["forces_heads"].shape == (1, 9, 3)
    assert np.abs((every["forces_heads"] - every["forces"]).detach().numpy()).max() > 1e-3, "the heads agree"
    assert torch.allclose(mean["forces_heads"][0], every["forces_heads"].mean(0), rtol=1e-12, atol=1e-12)
    for key in ("energy", "forces", "energy_heads", "charges", "dipole") + (("stress",) if stress else ()):
        assert torch.allclose(mean[key], every[key], rtol=1e-12, atol=1e-12), key


def test_mean_only_forces_are_minus_the_finite_difference_gradient_of_the_mean_energy():
    c = ensemble("equilibrated", uncertainty="shallow")
    atoms = water_cation()
    forces = c.member(build_batch([atoms], c.z_table, c.r_max), head_forces=False)["forces_heads"][0].detach()
    h = 1e-5
    for atom, axis in [(0, 0), (1, 2), (2, 1)]:
        e = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[atom, axis] += sign * h
            e.append(float(energy_and_forces(c, [moved])["energy"][:, 0].mean()))
        assert abs(float(forces[atom, axis]) + (e[0] - e[1]) / (2 * h)) < 1e-6, (atom, axis)


def _parameter_gradients(c: Ensemble, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in c.parameters() if p.requires_grad]
    return [
        torch.zeros_like(p) if g is None else g
        for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))
    ]


@pytest.mark.parametrize("mode", ["none", "equilibrated"])
def test_training_gradients_through_mean_only_and_per_head_forces(mode):
    # the squared error of the mean forces has the same parameter gradients whether the heads'
    # forces are computed (and their contrasts skipped in the backward pass) or only their mean;
    # a loss of the heads' spread gets the gradients of the heads' own autograd forces
    c = ensemble(mode, uncertainty="shallow")
    batch = build_batch([water_cation(), hydroxide()], c.z_table, c.r_max)
    ref = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    every = c.member(batch, training=True)["forces_heads"]
    mean = c.member(batch, training=True, head_forces=False)["forces_heads"]
    for a, b in zip(
        _parameter_gradients(c, ((every.mean(0) - ref) ** 2).mean()),
        _parameter_gradients(c, ((mean.mean(0) - ref) ** 2).mean()),
    ):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    energies = c.member(batch, training=True)["energy_heads"].sum(-1)  # [K]
    direct = torch.stack(
        [-torch.autograd.grad(e, batch["positions"], create_graph=True, retain_graph=True)[0] for e in energies]
    )
    spread = c.member(batch, training=True)["forces_heads"]
    assert torch.allclose(spread, direct, rtol=1e-10, atol=1e-12)
    weights = torch.randn(3, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for a, b in zip(
        _parameter_gradients(c, (spread.var(0) + weights * spread).sum()),
        _parameter_gradients(c, (direct.var(0) + weights * direct).sum()),
    ):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_a_loss_of_the_mean_head_forces_skips_the_contrasts_in_backward():
    mean = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    grads = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    contrasts = _helmert(3)
    _HeadForces.apply(mean, grads, contrasts).mean(0).square().sum().backward()
    assert grads.grad is None and torch.allclose(mean.grad, 2 * mean.detach())
    mean.grad = None
    heads = _HeadForces.apply(mean, grads, contrasts)
    assert torch.allclose(heads, mean[None] - torch.einsum("jk,jna->kna", contrasts, grads))
    heads.var(0).sum().backward()
    assert grads.grad is not None and grads.grad.abs().max() > 0
