"""Selection: which explored frames get a reference calculation, and why the rest do not.

A frame is a candidate when its largest per-atom force spread lies in the trust
window [threshold, ceiling): below it the model is trusted, above it the frame
is most likely unphysical (DP-GEN's trust levels). Candidates are taken most
uncertain first, skipping any within ``min_distance`` (Å, in a
permutation-invariant distance descriptor) of a frame already chosen or
already labelled. Every frame gets a decision with its reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms

from ionflow.platform.structures import structure_hash


@dataclass
class Decision:
    """The verdict on one frame; ``score`` is its largest per-atom force spread (eV/Å)."""

    index: int
    score: float
    chosen: bool
    reason: str


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
    if not decisions:
        return "stopped: exploration produced no candidate frame"
    kinds = {"trusted": 0, "above ceiling": 0, "other": 0}
    for d in decisions:
        kind = (
            "trusted"
            if d.reason.startswith("trusted")
            else "above ceiling"
            if d.reason.startswith("above")
            else "other"
        )
        kinds[kind] += 1
    if kinds["trusted"] == len(decisions):
        return "converged: no explored frame was uncertain enough to label"
    parts = [f"{kinds['above ceiling']} above the ceiling (likely unphysical)"] if kinds["above ceiling"] else []
    parts += [f"{kinds['trusted']} trusted"] if kinds["trusted"] else []
    parts += [f"{kinds['other']} already labelled or near-duplicates"] if kinds["other"] else []
    hint = "; raise selection.ceiling or lower the temperature" if kinds["above ceiling"] else ""
    return f"stopped: no frame to label ({', '.join(parts)}){hint}"


def select(
    frames: Sequence[Atoms],
    scores: Sequence[float],
    threshold: float,
    ceiling: float,
    per_iteration: int,
    min_distance: float,
    labelled: Sequence[Atoms] = (),
) -> list[Decision]:
    """Decide for every frame whether to label it (see the module docstring)."""
    scores = np.asarray(scores, dtype=float)
    if len(scores) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(scores)} scores")
    decisions: dict[int, Decision] = {}
    known_hashes = {structure_hash(a) for a in labelled}
    references = [descriptor(a) for a in labelled]
    chosen_refs: list[tuple[str, np.ndarray]] = []
    n_chosen = 0
    for i in np.argsort(-scores, kind="stable"):
        s = float(scores[i])
        if s < threshold:
            decisions[i] = Decision(int(i), s, False, f"trusted: spread {s:.3f} < threshold {threshold} eV/Å")
            continue
        if s >= ceiling:
            decisions[i] = Decision(int(i), s, False, f"above ceiling {ceiling} eV/Å: likely unphysical")
            continue
        if structure_hash(frames[i]) in known_hashes:
            decisions[i] = Decision(int(i), s, False, "already labelled (same structure hash)")
            continue
        desc = descriptor(frames[i])
        nearest = min((descriptor_distance(desc, r) for r in references + chosen_refs), default=float("inf"))
        if nearest < min_distance:
            decisions[i] = Decision(
                int(i), s, False, f"near-duplicate: {nearest:.3f} Å from a labelled or chosen frame"
            )
            continue
        if n_chosen >= per_iteration:
            decisions[i] = Decision(int(i), s, False, f"budget: {per_iteration} frames already chosen")
            continue
        decisions[i] = Decision(int(i), s, True, f"uncertain: spread {s:.3f} >= threshold {threshold} eV/Å")
        chosen_refs.append(desc)
        n_chosen += 1
    return [decisions[i] for i in range(len(frames))]
