"""The committee model: forces and stress are energy derivatives, E(3)/permutation symmetry,
batching, the model file and the ASE calculator."""

from __future__ import annotations

import copy
import os
import pickle

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError

from ionflow.platform.model import Committee, EnsembleCalculator, build_batch, load_model, save_model
from ionflow.platform.model.files import FORMAT, FORMAT_VERSION
from ionflow.platform.structures import rattled, with_charge_state


def members(committee: Committee, frames: list[Atoms]) -> tuple[np.ndarray, np.ndarray]:
    """Per-member energies (K, g) eV and forces (K, n, 3) eV/Å."""
    batch = build_batch(frames, committee.z_table, committee.r_max, dtype=committee.spec.dtype)
    out = committee(batch)
    return out["energy"].detach().numpy(), out["forces"].detach().numpy()


def random_rotation(rng: np.random.Generator, proper: bool = True) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    if proper and np.linalg.det(q) < 0:
        q[:, 0] *= -1
    if not proper and np.linalg.det(q) > 0:
        q[:, 0] *= -1
    return q


def water_box() -> Atoms:
    """One water in a small triclinic cell, 3D periodic: many images within r_max = 4 Å."""
    atoms = Atoms(
        "OH2",
        positions=[[0.1, 0.0, 0.1], [0.85, 0.55, 0.0], [-0.6, 0.6, 0.1]],
        cell=[[3.2, 0.0, 0.0], [0.2, 3.1, 0.0], [0.1, -0.15, 3.3]],
        pbc=True,
    )
    return with_charge_state(atoms, 0, 1)


# --- derivatives ------------------------------------------------------------------------------


@pytest.mark.parametrize("periodic", [False, True], ids=["H3O+ cluster", "water box"])
def test_forces_are_minus_energy_gradient(untrained_committee, h3o, periodic):
    committee = untrained_committee
    atoms = water_box() if periodic else rattled(h3o, 1, 0.05, seed=5)[0]
    _, f = members(committee, [atoms])
    f_mean = f.mean(0)
    assert np.abs(f).max() > 1e-2, "forces are trivially zero: the check would prove nothing"

    h = 1e-4  # Å; central differences err by ~h^2 f'''/6 ~ 1e-8 eV/Å
    for i in range(len(atoms)):
        for a in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, a] += h
            minus.positions[i, a] -= h
            e_pm, _ = members(committee, [plus, minus])
            fd = -(e_pm[:, 0] - e_pm[:, 1]) / (2 * h)  # (K,) one per member
            np.testing.assert_allclose(f[:, i, a], fd, rtol=1e-6, atol=1e-6, err_msg=f"atom {i} axis {a}")
            assert f_mean[i, a] == pytest.approx(fd.mean(), rel=1e-6, abs=1e-6)


def test_stress_is_strain_derivative(untrained_committee):
    """ASE's sign: stress = (1/V) dE/dε for a symmetric strain ε applied to cell and positions."""
    atoms = water_box()
    atoms.calc = EnsembleCalculator(untrained_committee)
    stress = atoms.get_stress(voigt=False)
    volume = atoms.get_volume()

    def energy(eps: np.ndarray) -> float:
        strained = atoms.copy()
        deform = np.eye(3) + eps
        strained.set_cell(atoms.cell.array @ deform, scale_atoms=False)
        strained.positions = atoms.positions @ deform
        strained.calc = EnsembleCalculator(untrained_committee)
        return strained.get_potential_energy()

    h = 1e-5
    numeric = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            eps = np.zeros((3, 3))
            eps[i, j] += h / 2
            eps[j, i] += h / 2
            numeric[i, j] = (energy(eps) - energy(-eps)) / (2 * h) / volume
    assert np.abs(numeric).max() > 1e-4, "stress is trivially zero: the check would prove nothing"
    np.testing.assert_allclose(stress, numeric, atol=1e-5 * np.abs(numeric).max() + 1e-9)
    np.testing.assert_allclose(stress, stress.T, atol=1e-12)
    voigt = atoms.get_stress()
    xx, yy, zz, yz, xz, xy = stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]
    np.testing.assert_allclose(voigt, [xx, yy, zz, yz, xz, xy])


def test_no_stress_for_a_cluster(untrained_committee, h3o):
    h3o.calc = EnsembleCalculator(untrained_committee)
    with pytest.raises(PropertyNotImplementedError):
        h3o.get_stress()


# --- symmetry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("proper", [True, False], ids=["rotation", "rotoreflection"])
def test_energy_invariant_forces_covariant_under_orthogonal_maps(untrained_committee, h3o, rng, proper):
    atoms = rattled(h3o, 1, 0.05, seed=9)[0]
    q = random_rotation(rng, proper=proper)
    moved = atoms.copy()
    moved.positions = atoms.positions @ q.T + rng.normal(size=3) * 3.0
    (e, f), (e_m, f_m) = members(untrained_committee, [atoms]), members(untrained_committee, [moved])
    np.testing.assert_allclose(e_m, e, rtol=0, atol=1e-8)
    np.testing.assert_allclose(f_m, f @ q.T, rtol=0, atol=1e-8)


def test_energy_invariant_under_translation(untrained_committee, h3o):
    e, f = members(untrained_committee, [h3o])
    shifted = h3o.copy()
    shifted.positions += [12.3, -4.5, 0.7]
    e_s, f_s = members(untrained_committee, [shifted])
    np.testing.assert_allclose(e_s, e, rtol=0, atol=1e-8)
    np.testing.assert_allclose(f_s, f, rtol=0, atol=1e-8)


def test_periodic_energy_invariant_under_translation_and_wrapping(untrained_committee):
    atoms = water_box()
    e, f = members(untrained_committee, [atoms])
    moved = atoms.copy()
    moved.positions += [1.7, -2.9, 0.4]
    moved.wrap()
    e_m, f_m = members(untrained_committee, [moved])
    np.testing.assert_allclose(e_m, e, rtol=0, atol=1e-8)
    np.testing.assert_allclose(f_m, f, rtol=0, atol=1e-8)


def test_energy_invariant_under_permutation_of_like_atoms(untrained_committee, h3o):
    atoms = rattled(h3o, 1, 0.05, seed=2)[0]
    order = [0, 3, 1, 2]  # O stays, the three H are cycled
    permuted = atoms[order]
    e, f = members(untrained_committee, [atoms])
    e_p, f_p = members(untrained_committee, [permuted])
    np.testing.assert_allclose(e_p, e, rtol=0, atol=1e-8)
    np.testing.assert_allclose(f_p, f[:, order], rtol=0, atol=1e-8)


def test_swapping_unlike_atoms_changes_energy(untrained_committee, h3o):
    """Control for the permutation test: the model does see the elements."""
    swapped = h3o.copy()
    swapped.numbers = [1, 8, 1, 1]
    e, _ = members(untrained_committee, [h3o])
    e_s, _ = members(untrained_committee, [swapped])
    assert np.abs(e_s - e).max() > 1e-4


# --- batching ---------------------------------------------------------------------------------


def test_batch_equals_one_structure_at_a_time(untrained_committee, h3o):
    water = with_charge_state(Atoms("OH2", positions=[[5.0, 5.0, 5.0], [5.96, 5.0, 5.0], [4.76, 5.93, 5.0]]), 0, 1)
    frames = [rattled(h3o, 1, 0.05, seed=4)[0], water, water_box()]
    e_batch, f_batch = members(untrained_committee, frames)
    offsets = np.cumsum([0] + [len(a) for a in frames])
    for g, atoms in enumerate(frames):
        e_one, f_one = members(untrained_committee, [atoms])
        np.testing.assert_allclose(e_batch[:, g], e_one[:, 0], rtol=0, atol=1e-10)
        np.testing.assert_allclose(f_batch[:, offsets[g] : offsets[g + 1]], f_one, rtol=0, atol=1e-10)


def test_build_batch_layout(untrained_committee, h3o):
    frames = [h3o, water_box()]
    batch = build_batch(frames, untrained_committee.z_table, untrained_committee.r_max)
    assert batch["positions"].shape == (7, 3) and batch["positions"].dtype == torch.float64
    assert batch["node_attrs"].shape == (7, 2)
    np.testing.assert_array_equal(batch["node_attrs"].argmax(1).numpy(), [1, 0, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(batch["batch"].numpy(), [0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(batch["ptr"].numpy(), [0, 4, 7])
    np.testing.assert_array_equal(batch["total_charge"].numpy(), [1, 0])
    assert batch["cell"].shape == (6, 3)
    sender, receiver = batch["edge_index"].numpy()
    assert np.all(batch["batch"].numpy()[sender] == batch["batch"].numpy()[receiver]), "edges cross structures"
    # every edge of the cluster is a real pair within r_max, each pair both ways, no self edge
    cluster = (sender < 4) & (receiver < 4)
    assert cluster.sum() == 12
    vec = batch["positions"][receiver] - batch["positions"][sender] + batch["shifts"]
    assert torch.all(vec.norm(dim=1) <= untrained_committee.r_max)
    assert torch.all(vec.norm(dim=1) > 0.1)


def test_build_batch_rejects_unknown_element(untrained_committee):
    with pytest.raises(ValueError, match=r"\[7\]"):
        build_batch([Atoms("NH3", positions=np.eye(4, 3))], untrained_committee.z_table, 4.0)


# --- model file -------------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_predictions(untrained_committee, h3o, tmp_path):
    path = save_model(untrained_committee, tmp_path / "models" / "m.pt")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    loaded = load_model(path)
    assert loaded.spec.to_dict() == untrained_committee.spec.to_dict()
    assert not loaded.training
    frames = [h3o, water_box()]
    e, f = members(untrained_committee, frames)
    e_l, f_l = members(loaded, frames)
    np.testing.assert_array_equal(e_l, e)
    np.testing.assert_array_equal(f_l, f)


class _Payload:
    """Unpickling this runs os.mkdir: what a booby-trapped model file could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _hook() -> None:  # a function in a model file is code, not weights
    raise AssertionError("never called")


@pytest.mark.parametrize("kind", ["object", "function"])
def test_load_model_refuses_pickled_code(untrained_committee, tmp_path, kind):
    marker = tmp_path / "pwned"
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": untrained_committee.spec.to_dict(),
        "state_dict": untrained_committee.state_dict(),
        "extra": _Payload(str(marker)) if kind == "object" else _hook,
    }
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    # Sanity: an unrestricted unpickle of this file would indeed run the payload.
    if kind == "object":
        assert pickle.loads(pickle.dumps(_Payload(str(marker)))) is None and marker.exists()
        marker.rmdir()
    with pytest.raises(ValueError, match="not a readable ionflow model file"):
        load_model(path)
    assert not marker.exists(), "loading the model file ran code"


def test_load_model_refuses_other_files(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else", "weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not an ionflow model file"):
        load_model(other)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")


# --- ASE calculator and committee spread ------------------------------------------------------


def test_calculator_results_and_shapes(untrained_committee, h3o):
    h3o.calc = EnsembleCalculator(untrained_committee)
    energy = h3o.get_potential_energy()
    forces = h3o.get_forces()
    e_unc = h3o.calc.get_property("energy_uncertainty")
    f_unc = h3o.calc.get_property("forces_uncertainty")
    assert isinstance(energy, float) and np.isfinite(energy)
    assert forces.shape == (4, 3)
    assert np.ndim(e_unc) == 0 and e_unc > 0
    assert f_unc.shape == (4,) and np.all(f_unc > 0)

    e_k, f_k = members(untrained_committee, [h3o])
    assert energy == pytest.approx(e_k[:, 0].mean(), abs=1e-10)
    np.testing.assert_allclose(forces, f_k.mean(0), atol=1e-10)
    assert e_unc == pytest.approx(e_k[:, 0].std(), abs=1e-10)
    spread = np.sqrt(((f_k - f_k.mean(0)) ** 2).sum(-1).mean(0))
    np.testing.assert_allclose(f_unc, spread, atol=1e-10)


def test_spread_vanishes_for_identical_members(untrained_committee, h3o):
    twins = copy.deepcopy(untrained_committee)
    twins.members[1].load_state_dict(twins.members[0].state_dict())
    batch = build_batch([h3o], twins.z_table, twins.r_max)
    pred = twins.predict(batch)
    assert torch.all(pred["force_std"] < 1e-12)
    assert torch.all(pred["energy_std"] < 1e-12)

    different = untrained_committee.predict(batch)
    assert torch.all(different["force_std"] > 1e-6)
    assert torch.all(different["energy_std"] > 1e-6)


def test_committee_members_differ_by_seed_and_rebuild_identically(untrained_committee, tiny_spec, h3o):
    rebuilt = Committee(copy.deepcopy(tiny_spec))
    for pa, pb in zip(rebuilt.parameters(), untrained_committee.parameters()):
        assert torch.equal(pa, pb)
    e, _ = members(rebuilt, [h3o])
    assert abs(e[0, 0] - e[1, 0]) > 1e-6
    with pytest.raises(ValueError, match="ensemble_size"):
        Committee(copy.deepcopy(tiny_spec), seeds=[1, 2, 3])


def test_spreads_follow_their_definitions_for_three_members(tiny_spec, h3o):
    """With two members every definition of spread agrees; three tell RMS from mean norm."""
    spec = copy.deepcopy(tiny_spec)
    spec.hyper.update(ensemble_size=3, num_interactions=1)
    committee = Committee(spec, seeds=[1, 2, 3]).eval()
    batch = build_batch([h3o], committee.z_table, committee.r_max)
    pred = committee.predict(batch)
    e_k, f_k = members(committee, [h3o])
    np.testing.assert_allclose(pred["energy"].numpy(), e_k.mean(0), atol=1e-10)
    np.testing.assert_allclose(pred["energy_std"].numpy(), e_k.std(0), atol=1e-10)  # population std
    deviation = np.linalg.norm(f_k - f_k.mean(0), axis=-1)  # (K, n)
    np.testing.assert_allclose(pred["force_std"].numpy(), np.sqrt((deviation**2).mean(0)), atol=1e-10)
    assert np.abs(deviation.mean(0) - np.sqrt((deviation**2).mean(0))).max() > 1e-6, "definitions coincide here"
