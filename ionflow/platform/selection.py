"""Selection: which explored frames get a reference calculation, and why the rest do not.

Three strategies (``selection.strategy``), each giving every frame a :class:`Decision` with its
reason; the score recorded is always the frame's largest per-atom force spread (eV/Å).

uncertainty (:func:`select`)
    A frame is a candidate when its largest per-atom force spread lies in the trust window
    [threshold, ceiling): below it the model is trusted, above it the frame is most likely
    unphysical (DP-GEN's trust levels). Candidates are taken most uncertain first, skipping any
    within ``min_distance`` (Å, in a permutation-invariant distance descriptor) of a frame
    already chosen or already labelled.
random (:func:`select_random`)
    Uniform among the frames not yet labelled, from a seed: the baseline that any claim of
    active learning is measured against. The spread is recorded, never used.
diverse (:func:`select_diverse`)
    Candidates as for uncertainty (the trust window), then a greedy batch: each step takes the
    candidate with the largest spread x novelty, where novelty is how far the frame's most
    unusual atomic environment lies from the labelled ones and from those of the frames already
    taken, per element, in the model's own invariant features (:mod:`ionflow.platform.environments`).
    A product rather than a novelty floor: an uncertain frame still needs to be new, but a new
    frame that the model is sure of is not worth a label either. The batch stops at the budget or
    when every remaining candidate's novelty is at most ``min_novelty`` ("covered"). Cost is
    linear in atoms: no per-frame all-pairs descriptor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols

from ionflow.platform.environments import (
    MAX_PER_ELEMENT,
    Environments,
    Pool,
    by_element,
    environments,
    novelty,
    thinned,
    typical_distances,
)
from ionflow.platform.model import Ensemble
from ionflow.platform.structures import structure_hash


@dataclass
class Decision:
    """The verdict on one frame; ``score`` is its largest per-atom force spread (eV/Å); ``code``
    one of :data:`ionflow.db.models.REASON_CODES`, ``reason`` the same as a sentence with its
    numbers; ``rank`` the frame's place (1 = first) in the order the strategy considered the frames."""

    index: int
    score: float
    chosen: bool
    reason: str
    code: str
    rank: int | None = None


def descriptor(atoms: Atoms) -> tuple[str, np.ndarray]:
    """Sorted interatomic distances (Å) grouped by element pair: invariant to rotation,
    translation and permutation of like atoms. The key says which frames are comparable."""
    numbers = atoms.numbers
    d = atoms.get_all_distances(mic=bool(np.any(atoms.pbc)))
    iu = np.triu_indices(len(atoms), k=1)
    pairs = np.stack([np.minimum(numbers[iu[0]], numbers[iu[1]]), np.maximum(numbers[iu[0]], numbers[iu[1]])], 1)
    parts, keys = [], []
    for pair in sorted({tuple(p) for p in pairs.tolist()}):
        mask = (pairs == pair).all(1)
        parts.append(np.sort(d[iu][mask]))
        keys.append(f"{pair[0]}-{pair[1]}:{mask.sum()}")
    return "|".join(keys), np.concatenate(parts) if parts else np.zeros(0)


def descriptor_distance(a: tuple[str, np.ndarray], b: tuple[str, np.ndarray]) -> float:
    """RMS difference (Å) of two descriptors; infinite for different compositions."""
    if a[0] != b[0]:
        return float("inf")
    if a[1].size == 0:
        return 0.0
    return float(np.sqrt(np.mean((a[1] - b[1]) ** 2)))


def nothing_chosen(decisions: Sequence[Decision]) -> str:
    """Why a campaign stops when an iteration chose no frame, from that iteration's decisions."""
    decisions = [d for d in decisions if d.code != "held_out"]
    if not decisions:
        return "stopped: exploration produced no candidate frame"
    kinds = {"trusted": 0, "above ceiling": 0, "other": 0}
    for d in decisions:
        kind = {"trusted": "trusted", "above_ceiling": "above ceiling"}.get(d.code, "other")
        kinds[kind] += 1
    if kinds["trusted"] == len(decisions):
        return "converged: no explored frame was uncertain enough to label"
    parts = [f"{kinds['above ceiling']} above the ceiling (likely unphysical)"] if kinds["above ceiling"] else []
    parts += [f"{kinds['trusted']} trusted"] if kinds["trusted"] else []
    parts += [f"{kinds['other']} already labelled, near-duplicates or covered"] if kinds["other"] else []
    hint = "; raise selection.ceiling or lower the temperature" if kinds["above ceiling"] else ""
    return f"stopped: no frame to label ({', '.join(parts)}){hint}"


LABELLED = "already labelled (same structure hash)"

#: Reason of a frame held out for the test set before selection (see :func:`hold_out`).
HELD_OUT = "held out for the test set (drawn uniformly before selection; never trained on)"


def hold_out(frames: Sequence[Atoms], n: int, seed: int, labelled: Sequence[Atoms] = ()) -> list[int]:
    """Indices of ``n`` frames drawn uniformly, from ``seed``, among those not yet labelled (same
    structure hash), in increasing order: the test set's share of an iteration's explored frames,
    taken before any strategy looks at them, so it represents what the MD met, not what a
    strategy prefers."""
    known = {structure_hash(a) for a in labelled}
    fresh = [i for i, a in enumerate(frames) if structure_hash(a) not in known]
    drawn = np.random.default_rng(seed).permutation(len(fresh))[:n]
    return sorted(fresh[int(k)] for k in drawn)


def _outside_window(score: float, threshold: float, ceiling: float) -> tuple[str, str] | None:
    """Why a frame with this spread is not a candidate (trusted, above the ceiling) as (code,
    sentence), or None."""
    if score < threshold:
        return "trusted", f"trusted: spread {score:.3f} < threshold {threshold} eV/Å"
    if score >= ceiling:
        return "above_ceiling", f"above ceiling {ceiling} eV/Å: likely unphysical"
    return None


def _checked_scores(frames: Sequence[Atoms], scores: Sequence[float]) -> np.ndarray:
    scores = np.asarray(scores, dtype=float)
    if len(scores) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(scores)} scores")
    return scores


def select(
    frames: Sequence[Atoms],
    scores: Sequence[float],
    threshold: float,
    ceiling: float,
    per_iteration: int,
    min_distance: float,
    labelled: Sequence[Atoms] = (),
) -> list[Decision]:
    """Decide for every frame whether to label it: the uncertainty strategy (module docstring)."""
    scores = _checked_scores(frames, scores)
    decisions: dict[int, Decision] = {}
    known_hashes = {structure_hash(a) for a in labelled}
    references = [descriptor(a) for a in labelled]
    chosen_refs: list[tuple[str, np.ndarray]] = []
    n_chosen = 0
    for rank, i in enumerate(np.argsort(-scores, kind="stable"), start=1):
        s = float(scores[i])
        why = _outside_window(s, threshold, ceiling)
        if why is None and structure_hash(frames[i]) in known_hashes:
            why = "already_labelled", LABELLED
        if why is not None:
            decisions[i] = Decision(int(i), s, False, why[1], why[0], rank)
            continue
        desc = descriptor(frames[i])
        nearest = min((descriptor_distance(desc, r) for r in references + chosen_refs), default=float("inf"))
        if nearest < min_distance:
            reason = f"near-duplicate: {nearest:.3f} Å from a labelled or chosen frame"
            decisions[i] = Decision(int(i), s, False, reason, "near_duplicate", rank)
            continue
        if n_chosen >= per_iteration:
            decisions[i] = Decision(int(i), s, False, f"budget: {per_iteration} frames already chosen", "budget", rank)
            continue
        reason = f"uncertain: spread {s:.3f} >= threshold {threshold} eV/Å"
        decisions[i] = Decision(int(i), s, True, reason, "uncertain", rank)
        chosen_refs.append(desc)
        n_chosen += 1
    return [decisions[i] for i in range(len(frames))]


def select_random(
    frames: Sequence[Atoms],
    scores: Sequence[float],
    per_iteration: int,
    seed: int,
    labelled: Sequence[Atoms] = (),
) -> list[Decision]:
    """The random strategy: ``per_iteration`` frames drawn uniformly, from ``seed``, among those
    not yet labelled (same structure hash). ``scores`` are recorded, never used."""
    scores = _checked_scores(frames, scores)
    known = {structure_hash(a) for a in labelled}
    decisions: dict[int, Decision] = {}
    n_chosen = 0
    for rank, i in enumerate(np.random.default_rng(seed).permutation(len(frames)), start=1):
        s, key = float(scores[i]), structure_hash(frames[i])
        if key in known:
            decisions[i] = Decision(int(i), s, False, LABELLED, "already_labelled", rank)
        elif n_chosen < per_iteration:
            reason = f"random pick (spread {s:.3f} eV/Å, not used)"
            decisions[i] = Decision(int(i), s, True, reason, "random_pick", rank)
            known.add(key)
            n_chosen += 1
        else:
            reason = f"random: not drawn ({per_iteration} frames drawn)"
            decisions[i] = Decision(int(i), s, False, reason, "not_drawn", rank)
    return [decisions[i] for i in range(len(frames))]


def select_diverse(
    frames: Sequence[Atoms],
    scores: Sequence[float],
    ensemble: Ensemble,
    threshold: float,
    ceiling: float,
    per_iteration: int,
    min_novelty: float,
    labelled: Sequence[Atoms] = (),
    reference: Sequence[Atoms] | None = None,
    max_per_element: int = MAX_PER_ELEMENT,
) -> list[Decision]:
    """The diverse strategy (module docstring): environments from ``ensemble``; novelty against
    ``reference`` (default: ``labelled``; pass the training frames to leave the test set out),
    frames already ``labelled`` skipped by structure hash."""
    scores = _checked_scores(frames, scores)
    decisions, open_ = _candidates(frames, scores, threshold, ceiling, labelled)
    envs = dict(zip(open_, environments(ensemble, [frames[i] for i in open_])))
    reference_frames = thinned(labelled if reference is None else reference)
    pools = by_element(environments(ensemble, reference_frames), max_per_element)
    scales = _scales(pools, envs, max_per_element)
    atom_novelty = {i: novelty(envs[i], pools, scales) for i in open_}  # [atoms] each, dimensionless

    def frame_novelty(i: int) -> float:
        return float(atom_novelty[i].max()) if atom_novelty[i].numel() else 0.0

    def covered(i: int) -> str:
        return f"diverse: covered (novelty {frame_novelty(i):.2f} <= min_novelty {min_novelty})"

    n_chosen = 0
    while open_ and n_chosen < per_iteration:
        for i in [i for i in open_ if frame_novelty(i) <= min_novelty]:
            decisions[i] = Decision(i, float(scores[i]), False, covered(i), "covered")
            open_.remove(i)
        if not open_:
            break
        best = max(open_, key=lambda i: (_gain(float(scores[i]), frame_novelty(i)), float(scores[i])))
        s, nu = float(scores[best]), frame_novelty(best)
        symbol = chemical_symbols[int(envs[best].numbers[int(atom_novelty[best].argmax())])]
        reason = f"diverse: spread {s:.3f} eV/Å, novelty {nu:.2f} ({symbol})"
        decisions[best] = Decision(best, s, True, reason, "diverse", n_chosen + 1)
        open_.remove(best)
        n_chosen += 1
        added = by_element([envs[best]], max_per_element)  # the batch so far joins the reference
        for i in open_:
            atom_novelty[i] = torch.minimum(atom_novelty[i], novelty(envs[i], added, scales))
    for i in open_:
        s, nu = float(scores[i]), frame_novelty(i)
        if nu <= min_novelty:
            decisions[i] = Decision(i, s, False, covered(i), "covered")
        else:
            reason = f"budget: {per_iteration} frames already chosen (novelty {nu:.2f})"
            decisions[i] = Decision(i, s, False, reason, "budget")
    # the picks in the order taken, then every other frame by spread, high to low
    rest = sorted((i for i, d in decisions.items() if not d.chosen), key=lambda i: (-float(scores[i]), i))
    for rank, i in enumerate(rest, start=n_chosen + 1):
        decisions[i].rank = rank
    return [decisions[i] for i in range(len(frames))]


def _candidates(
    frames: Sequence[Atoms], scores: np.ndarray, threshold: float, ceiling: float, labelled: Sequence[Atoms]
) -> tuple[dict[int, Decision], list[int]]:
    """The decisions on frames outside the trust window or already labelled, and the indices of
    the rest (the candidates), most uncertain first."""
    known = {structure_hash(a) for a in labelled}
    decisions: dict[int, Decision] = {}
    candidates: list[int] = []
    for i in map(int, np.argsort(-scores, kind="stable")):
        s = float(scores[i])
        why = _outside_window(s, threshold, ceiling)
        if why is None and structure_hash(frames[i]) in known:
            why = "already_labelled", LABELLED
        if why is not None:
            decisions[i] = Decision(i, s, False, why[1], why[0])
        else:
            candidates.append(i)
    return decisions, candidates


def _gain(score: float, nu: float) -> float:
    """spread x novelty; an environment of an element never seen (novelty ∞) comes first."""
    return math.inf if math.isinf(nu) else score * nu


def _scales(pools: dict[int, Pool], envs: dict[int, Environments], max_per_element: int) -> dict[int, float]:
    """Each element's typical distance in the reference; for an element found in fewer than two
    reference frames, among the candidates instead; else 1 (feature units)."""
    elements = {int(z) for e in envs.values() for z in e.numbers}
    fallback = typical_distances(by_element(list(envs.values()), max_per_element)) if envs else {}
    return {z: 1.0 for z in elements} | fallback | typical_distances(pools)
