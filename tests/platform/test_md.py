"""Exploration: Langevin walkers record the committee's spread, stop where it is unsure or unphysical."""

from __future__ import annotations

import numpy as np
import pytest

from ionflow.platform.md import MIN_CONTACT, run_walkers
from ionflow.platform.model import build_batch
from ionflow.platform.structures import closest_contact, structure_hash

MD = dict(timestep_fs=0.5, temperature_K=300.0, friction_per_fs=0.02, sample_every=5)


@pytest.fixture(scope="module")
def two_walkers(trained, h3o_labelled):
    """Two walkers from the same start, 20 steps, never stopped by the spread."""
    committee = trained[0]
    start = h3o_labelled[0]
    runs = [run_walkers(committee, [start, start], steps=20, stop_uncertainty=1e3, seed=s, **MD) for s in (1, 1, 2)]
    return committee, start, runs


def test_walkers_complete_and_sample_every_n_steps(two_walkers):
    _, start, (results, _, _) = two_walkers
    assert [r.walker for r in results] == [0, 1]
    for r in results:
        assert r.stop_reason == "completed"
        assert r.n_steps_done == 20
        assert [f.info["md_step"] for f in r.frames] == [5, 10, 15, 20]
        for frame in r.frames:
            assert frame.info["walker"] == r.walker
            assert frame.info["force_std_max"] > 0 and frame.info["energy_std"] >= 0
            assert frame.info["charge"] == 1 and frame.info["multiplicity"] == 1
            assert len(frame) == len(start) and list(frame.numbers) == list(start.numbers)
            assert frame.constraints == []
            assert not any(k.startswith("REF_") for k in frame.info), "labels of the start leak into new frames"
        np.testing.assert_array_equal(r.last.positions, r.frames[-1].positions)
        assert closest_contact(r.last)[0] > MIN_CONTACT
        # the start moved, but by a thermal amount (10 fs at 300 K), not an explosion
        disp = np.linalg.norm(r.last.positions - start.positions, axis=1)
        assert 1e-3 < disp.max() < 0.5


def test_recorded_spread_is_the_committees_spread_on_that_frame(two_walkers):
    """Checks the split of the joint system back into walkers (atom offsets)."""
    committee, _, (results, _, _) = two_walkers
    for r in results:
        for frame in r.frames:
            batch = build_batch([frame], committee.z_table, committee.r_max)
            pred = committee.predict(batch)
            assert frame.info["force_std_max"] == pytest.approx(float(pred["force_std"].max()), rel=1e-9)
            assert frame.info["energy_std"] == pytest.approx(float(pred["energy_std"][0]), rel=1e-9, abs=1e-12)


def test_same_seed_reproduces_different_walkers_and_seeds_differ(two_walkers):
    _, _, (first, again, other) = two_walkers
    for a, b in zip(first, again):
        assert [structure_hash(f) for f in a.frames] == [structure_hash(f) for f in b.frames]
        np.testing.assert_array_equal(a.frames[-1].positions, b.frames[-1].positions)
    # same start, independent noise and velocities: the walkers' trajectories differ
    assert not np.allclose(first[0].frames[-1].positions, first[1].frames[-1].positions, atol=1e-4)
    assert not np.allclose(first[0].frames[-1].positions, other[0].frames[-1].positions, atol=1e-4)


def test_tiny_stop_uncertainty_stops_every_walker_at_step_one(trained, h3o_labelled):
    committee = trained[0]
    results = run_walkers(committee, h3o_labelled[:2], steps=20, stop_uncertainty=1e-9, seed=0, **MD)
    for r in results:
        assert r.n_steps_done == 1
        assert "force spread" in r.stop_reason and "step 1" in r.stop_reason
        assert len(r.frames) == 1, "the frame that stopped the walker is the one worth labelling"
        assert r.frames[0].info["md_step"] == 1
        assert r.frames[0].info["force_std_max"] > 1e-9


def test_unphysical_walker_stops_and_others_run_on(trained, h3o_labelled):
    committee = trained[0]
    crushed = h3o_labelled[1].copy()
    crushed.positions[2] = crushed.positions[0] + [0.0, 0.0, 0.2]  # H 0.2 Å from O
    good = h3o_labelled[2]
    results = run_walkers(committee, [crushed, good], steps=10, stop_uncertainty=1e3, seed=0, **MD)
    assert results[0].n_steps_done == 1
    assert results[0].stop_reason.startswith("unphysical")
    assert results[0].frames == [], "an unphysical frame is never offered for labelling"
    np.testing.assert_array_equal(results[0].last.positions, crushed.positions)
    assert results[1].stop_reason == "completed" and results[1].n_steps_done == 10
    assert [f.info["md_step"] for f in results[1].frames] == [5, 10]


def test_each_walker_has_its_own_temperature(trained, h3o_labelled):
    """One thermostat per walker: from the same start in the same 10 fs (strong friction, so the
    thermostat dominates), a walker at 3000 K moves several times further than one at 1 K, while two
    walkers at 1 K move alike (the start is off the model's minimum, so they move too)."""
    start = h3o_labelled[0]

    def moved(temperatures):
        md = dict(MD, temperature_K=temperatures, friction_per_fs=0.5)
        runs = run_walkers(trained[0], [start, start], steps=20, stop_uncertainty=1e3, seed=4, **md)
        return [np.linalg.norm(r.last.positions - start.positions, axis=1).mean() for r in runs]

    cold, hot = moved([1.0, 3000.0])
    assert hot > 3 * cold, (cold, hot)
    first, second = moved([1.0, 1.0])
    assert abs(first - cold) < 0.01 and abs(second - first) < 0.2 * first, (first, second)


def _water_box(seed: int = 0):
    """8 randomly turned H2O on a 2x2x2 grid of 3.1 Å: a periodic 6.2 Å cube at liquid density."""
    from ase import Atoms
    from scipy.spatial.transform import Rotation

    from ionflow.platform.structures import with_charge_state

    water = np.array([[0.0, 0.0, 0.0], [0.7572, 0.5865, 0.0], [-0.7572, 0.5865, 0.0]])
    rng = np.random.default_rng(seed)
    sites = (np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) * 3.1
    turns = Rotation.random(len(sites), random_state=seed)
    positions = np.concatenate([turns[k].apply(water) + site for k, site in enumerate(sites)])
    positions += rng.normal(scale=0.02, size=positions.shape)
    return with_charge_state(Atoms("OH2" * 8, positions=positions, cell=[6.2] * 3, pbc=True), 0, 1)


def test_verlet_list_gives_the_trajectory_of_a_fresh_neighbour_list_every_step(trained, h3o_labelled, monkeypatch):
    """The walkers' pairs within r_max + skin, rebuilt only after an atom moved skin/2, give the
    same forces, spreads and contacts as a neighbour list built afresh every step (skin 0): the
    same trajectories, for a cluster and a periodic box side by side, in far fewer rebuilds."""
    import ionflow.platform.md as md

    builds = []
    real = md.build_batch

    def counted(*args, **kwargs):
        builds.append(args[2])  # the cutoff it was built with
        return real(*args, **kwargs)

    monkeypatch.setattr(md, "build_batch", counted)
    committee = trained[0]
    starts = [h3o_labelled[0], _water_box()]
    hot = dict(MD, temperature_K=600.0, sample_every=10)
    runs = {}
    for skin in (0.5, 0.0):
        builds.clear()
        runs[skin] = run_walkers(committee, starts, steps=60, stop_uncertainty=1e3, seed=4, skin=skin, **hot)
        runs[f"builds {skin}"] = list(builds)
    assert len(runs["builds 0.0"]) == 61  # the first forces and one per step
    assert 1 < len(runs["builds 0.5"]) < 20, "the Verlet list was rebuilt too seldom or too often"
    assert runs["builds 0.5"][0] == pytest.approx(committee.r_max + 0.5)
    for a, b in zip(runs[0.5], runs[0.0]):
        assert a.stop_reason == b.stop_reason and a.n_steps_done == b.n_steps_done
        np.testing.assert_allclose(a.last.positions, b.last.positions, atol=1e-9)
        assert [f.info["force_std_max"] for f in a.frames] == pytest.approx([f.info["force_std_max"] for f in b.frames])
    with pytest.raises(ValueError, match="skin"):
        run_walkers(committee, starts, steps=1, stop_uncertainty=1e3, seed=4, skin=-0.1, **hot)
