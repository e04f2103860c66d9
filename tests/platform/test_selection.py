"""Selection: the trust window, the budget, most uncertain first, duplicates rejected with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms

from ionflow.platform.selection import Decision, descriptor, descriptor_distance, nothing_chosen, select
from ionflow.platform.structures import rattled

WINDOW = dict(threshold=0.1, ceiling=1.0, min_distance=0.02)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    return q if np.linalg.det(q) > 0 else -q


@pytest.fixture
def frames(h3o) -> list[Atoms]:
    """Six clearly different H3O+ geometries (0.1 Å rattles are ~0.1 Å apart in the descriptor)."""
    return rattled(h3o, 6, 0.1, seed=3)


def test_trust_window_budget_and_order(frames):
    scores = [0.05, 1.5, 0.3, 0.9, 0.5, 0.2]
    decisions = select(frames, scores, per_iteration=2, **WINDOW)
    assert [d.index for d in decisions] == list(range(6))
    assert [d.score for d in decisions] == scores
    assert [d.chosen for d in decisions] == [False, False, False, True, True, False]
    assert decisions[0].reason.startswith("trusted")
    assert "ceiling" in decisions[1].reason and "unphysical" in decisions[1].reason
    assert decisions[2].reason.startswith("budget") and decisions[5].reason.startswith("budget")
    assert all(d.reason.startswith("uncertain") for d in decisions if d.chosen)


def test_window_is_closed_below_open_above(frames):
    decisions = select(frames[:3], [0.1, 1.0, 0.0999], per_iteration=5, **WINDOW)
    assert [d.chosen for d in decisions] == [True, False, False]
    assert "ceiling" in decisions[1].reason
    assert decisions[2].reason.startswith("trusted")


@pytest.mark.parametrize("seed", range(5))
def test_at_most_budget_and_most_uncertain_first(h3o, seed):
    rng = np.random.default_rng(seed)
    frames = rattled(h3o, 12, 0.1, seed=seed)
    scores = rng.uniform(0.0, 1.5, size=12)
    decisions = select(frames, scores, per_iteration=3, **WINDOW)
    chosen = [d.score for d in decisions if d.chosen]
    in_window = [s for s in scores if WINDOW["threshold"] <= s < WINDOW["ceiling"]]
    assert len(chosen) == min(3, len(in_window))
    budget = [d.score for d in decisions if d.reason.startswith("budget")]
    assert all(c >= b for c in chosen for b in budget)
    assert len(budget) == len(in_window) - len(chosen)


def test_same_frame_twice_is_chosen_once(frames):
    twice = [frames[0], frames[0].copy(), frames[1]]
    decisions = select(twice, [0.5, 0.4, 0.3], per_iteration=3, **WINDOW)
    assert [d.chosen for d in decisions] == [True, False, True]
    assert decisions[1].reason.startswith("near-duplicate")


def test_frame_equal_to_a_labelled_one_is_rejected(frames, rng):
    labelled = [frames[0].copy(), frames[1].copy()]
    # frames[1] rotated, translated and with H relabelled: a new hash, the same geometry
    moved = frames[1][[0, 2, 3, 1]]
    moved.positions = moved.positions @ random_rotation(rng).T + [1.0, -2.0, 0.5]
    # a small, real displacement survives the duplicate check
    nudged = frames[2].copy()
    nudged.positions[1] += [0.2, 0.0, 0.0]
    candidates = [frames[0], moved, frames[2], nudged]
    decisions = select(candidates, [0.5, 0.5, 0.5, 0.5], per_iteration=4, labelled=labelled, **WINDOW)
    assert decisions[0].reason.startswith("already labelled")
    assert decisions[1].reason.startswith("near-duplicate")
    assert [d.chosen for d in decisions] == [False, False, True, True]


def test_scores_must_match_frames(frames):
    with pytest.raises(ValueError, match="6 frames but 5 scores"):
        select(frames, [0.5] * 5, per_iteration=2, **WINDOW)


def test_descriptor_invariant_to_rotation_translation_permutation(h3o, rng):
    atoms = rattled(h3o, 1, 0.1, seed=8)[0]
    moved = atoms[[0, 3, 1, 2]]
    moved.positions = moved.positions @ random_rotation(rng).T + rng.normal(size=3) * 5
    assert descriptor(moved)[0] == descriptor(atoms)[0]
    assert descriptor_distance(descriptor(atoms), descriptor(moved)) < 1e-12

    stretched = atoms.copy()
    stretched.positions[1] += 0.05 * (stretched.positions[1] - stretched.positions[0])
    assert descriptor_distance(descriptor(atoms), descriptor(stretched)) > 1e-3


def test_descriptor_separates_compositions(h3o):
    key, values = descriptor(h3o)
    assert key == "1-1:3|1-8:3"
    assert values.shape == (6,)
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    assert descriptor_distance(descriptor(h3o), descriptor(water)) == float("inf")
    swapped = h3o.copy()
    swapped.numbers = [1, 8, 1, 1]  # same formula, different bonding: 1-8 distances change
    assert descriptor_distance(descriptor(h3o), descriptor(swapped)) > 0.1


def test_nothing_chosen_says_why():
    trusted = Decision(0, 0.01, False, "trusted: spread 0.010 < threshold 0.05 eV/Å")
    wild = Decision(1, 9.0, False, "above ceiling 2.0 eV/Å: likely unphysical")
    dup = Decision(2, 0.3, False, "already labelled (same structure hash)")
    assert nothing_chosen([trusted, trusted]).startswith("converged")
    reason = nothing_chosen([wild, trusted, dup])
    assert reason.startswith("stopped") and "1 above the ceiling" in reason and "selection.ceiling" in reason
    assert "1 trusted" in reason and "1 already labelled" in reason
    assert "no candidate" in nothing_chosen([])
