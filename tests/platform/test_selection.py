"""Selection: the trust window, the budget, most uncertain first, duplicates rejected with a reason;
the random baseline; diverse batches in the model's own (invariant, per-element) feature space."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from ionflow.platform import environments as env_module
from ionflow.platform.environments import (
    Environments,
    by_element,
    environments,
    farthest_points,
    nearest_distances,
    novelty,
    typical_distances,
)
from ionflow.platform.selection import (
    Decision,
    descriptor,
    descriptor_distance,
    nothing_chosen,
    select,
    select_diverse,
    select_random,
)
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
    trusted = Decision(0, 0.01, False, "trusted: spread 0.010 < threshold 0.05 eV/Å", "trusted")
    wild = Decision(1, 9.0, False, "above ceiling 2.0 eV/Å: likely unphysical", "above_ceiling")
    dup = Decision(2, 0.3, False, "already labelled (same structure hash)", "already_labelled")
    assert nothing_chosen([trusted, trusted]).startswith("converged")
    reason = nothing_chosen([wild, trusted, dup])
    assert reason.startswith("stopped") and "1 above the ceiling" in reason and "selection.ceiling" in reason
    assert "1 trusted" in reason and "1 already labelled" in reason
    assert "no candidate" in nothing_chosen([])


def chosen(decisions: list[Decision]) -> list[int]:
    return [d.index for d in decisions if d.chosen]


def test_random_is_seeded_and_ignores_the_spread(h3o):
    frames = rattled(h3o, 20, 0.1, seed=4)
    scores = np.linspace(0.0, 50.0, 20)  # trusted, in the window and far above any ceiling alike
    first = select_random(frames, scores, per_iteration=5, seed=7)
    assert len(chosen(first)) == 5
    assert [d.score for d in first] == list(scores)  # recorded, never used
    assert chosen(select_random(frames, scores[::-1], per_iteration=5, seed=7)) == chosen(first)
    assert chosen(select_random(frames, np.zeros(20), per_iteration=5, seed=7)) == chosen(first)
    assert chosen(select_random(frames, scores, per_iteration=5, seed=8)) != chosen(first)
    assert all(d.reason.startswith("random pick") for d in first if d.chosen)
    assert all(d.reason.startswith("random: not drawn") for d in first if not d.chosen)


def test_random_skips_labelled_frames_and_respects_the_budget(h3o):
    frames = rattled(h3o, 8, 0.1, seed=5)
    labelled = [frames[1].copy(), frames[6].copy()]
    everything = select_random(frames, [0.5] * 8, per_iteration=100, seed=1, labelled=labelled)
    assert chosen(everything) == [0, 2, 3, 4, 5, 7]
    assert everything[1].reason.startswith("already labelled") and everything[6].reason.startswith("already")
    for budget in (1, 3):
        assert len(chosen(select_random(frames, [0.5] * 8, per_iteration=budget, seed=2, labelled=labelled))) == budget


def test_diverse_spreads_a_batch_that_uncertainty_spends_on_copies(h3o, untrained_committee):
    """Five near copies of one geometry (2 mÅ apart, beyond the descriptor's min_distance) with the
    highest spreads, and four other geometries: uncertainty takes the copies, diverse one of them."""
    groups = rattled(h3o, 5, 0.1, seed=1)
    frames = rattled(groups[0], 5, 0.002, seed=2) + groups[1:]
    scores = [0.9, 0.89, 0.88, 0.87, 0.86, 0.5, 0.49, 0.48, 0.47]
    labelled = rattled(h3o, 8, 0.1, seed=3)
    window = dict(threshold=0.1, ceiling=1.0, per_iteration=4, labelled=labelled)
    assert chosen(select(frames, scores, min_distance=0.001, **window)) == [0, 1, 2, 3]
    decisions = select_diverse(frames, scores, untrained_committee, min_novelty=0.1, **window)
    picks = chosen(decisions)
    assert len(picks) == 4 and sum(i < 5 for i in picks) == 1 and picks[0] == 0  # one copy: the most uncertain
    assert all(d.reason.startswith("diverse: spread") and "novelty" in d.reason for d in decisions if d.chosen)
    not_chosen = [d.reason for d in decisions if not d.chosen]
    assert all(r.startswith(("diverse: covered", "budget")) for r in not_chosen)


def test_diverse_takes_the_frame_with_one_novel_environment(h3o, untrained_committee):
    """Equal spreads: the frame whose one H sits 1.6 Å from its O is new to the labelled frames."""
    frames = rattled(h3o, 4, 0.05, seed=300)
    odd = rattled(h3o, 1, 0.05, seed=400)[0]
    bond = odd.positions[1] - odd.positions[0]
    odd.positions[1] = odd.positions[0] + 1.6 * bond / np.linalg.norm(bond)
    labelled = rattled(h3o, 8, 0.05, seed=500)
    window = dict(threshold=0.1, ceiling=1.0, min_novelty=0.1)
    decisions = select_diverse(
        [*frames, odd], [0.5] * 5, untrained_committee, per_iteration=1, labelled=labelled, **window
    )
    assert chosen(decisions) == [4]
    assert decisions[4].reason.endswith("(H)")


def test_diverse_reasons_outside_the_window_and_covered(h3o, untrained_committee):
    frames = rattled(h3o, 4, 0.1, seed=6)
    frames.append(frames[2].copy())  # an exact copy of a candidate: novelty 0 once that one is taken
    labelled = [frames[3].copy(), *rattled(h3o, 3, 0.1, seed=9)]
    window = dict(threshold=0.1, ceiling=1.0, min_novelty=0.1, labelled=labelled)
    decisions = select_diverse(frames, [0.05, 1.5, 0.5, 0.5, 0.4], untrained_committee, per_iteration=3, **window)
    assert decisions[0].reason.startswith("trusted") and "ceiling" in decisions[1].reason
    assert decisions[3].reason.startswith("already labelled")
    assert chosen(decisions) == [2]
    assert decisions[4].reason.startswith("diverse: covered (novelty 0.00")


def test_novelty_compares_environments_of_one_element_only():
    """An H whose features equal a labelled O's is still new; an O there is not."""
    f = torch.tensor
    reference = [
        Environments(np.array([1, 8]), f([[0.0, 0.0], [5.0, 0.0]], dtype=torch.float64)),
        Environments(np.array([1, 8]), f([[0.0, 1.0], [5.0, 1.0]], dtype=torch.float64)),
    ]
    pools = by_element(reference)
    scales = typical_distances(pools)
    assert scales == {1: 1.0, 8: 1.0}
    frame = Environments(np.array([1, 8]), f([[5.0, 0.5], [5.0, 0.5]], dtype=torch.float64))
    assert novelty(frame, pools, scales).tolist() == pytest.approx([np.hypot(5.0, 0.5), 0.5])
    unseen = Environments(np.array([17]), f([[0.0, 0.0]], dtype=torch.float64))
    assert novelty(unseen, pools, {17: 1.0}).tolist() == [float("inf")]


def test_novelty_invariant_to_rotation_translation_permutation(h3o, untrained_committee, rng):
    frame = rattled(h3o, 1, 0.1, seed=8)[0]
    moved = frame[[0, 3, 1, 2]]
    moved.positions = moved.positions @ random_rotation(rng).T + rng.normal(size=3) * 5
    pools = by_element(environments(untrained_committee, rattled(h3o, 4, 0.1, seed=10)))
    scales = typical_distances(pools)
    before, after = (novelty(e, pools, scales) for e in environments(untrained_committee, [frame, moved]))
    assert float(before.max()) > 0.1  # not trivially 0
    assert after.tolist() == pytest.approx(before[[0, 3, 1, 2]].tolist(), rel=1e-9)


def test_distances_in_blocks_and_farthest_points(monkeypatch, rng):
    x, ref = torch.from_numpy(rng.normal(size=(50, 4))), torch.from_numpy(rng.normal(size=(30, 4)))
    whole = torch.cdist(x, ref).min(1).values
    monkeypatch.setattr(env_module, "_BLOCK", 64)  # two rows per block
    assert torch.allclose(nearest_distances(x, ref), whole)
    points = torch.cat([torch.zeros(5, 2), torch.tensor([[10.0, 0.0], [0.0, 10.0]])])  # 5 copies, 2 outliers
    assert farthest_points(points, 10).tolist() == [0, 5, 6]  # the outliers, and no copy twice
