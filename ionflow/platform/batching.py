"""Batches balanced by size: frames packed so that each optimiser step sees about the same number
of atoms, whether the data holds small molecules, large cells or both.

With ``batch_size`` frames per step, a batch of 32 periodic cells of 1,000 atoms costs 100x one of
32 ten-atom molecules, and a mixed dataset gives steps of wildly different cost, memory and
gradient noise. :func:`pack_by_atoms` fills batches up to ``max_atoms`` atoms instead (best-fit
decreasing: frames from the largest down, each into the batch it fills most), so every batch
but the last few is nearly full; a frame larger than ``max_atoms`` makes a batch of its own.
Each epoch visits every frame exactly once; which frames share a batch, and the batches' order,
change from epoch to epoch with the random generator.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np


def pack_by_atoms(sizes: Sequence[int], max_atoms: int, rng: np.random.Generator | None = None) -> list[list[int]]:
    """Indexes of ``sizes`` grouped into batches of at most ``max_atoms`` atoms (a frame above it
    alone); every index exactly once. With ``rng`` equal sizes are taken in a random order and the
    batches come out shuffled, so that the batches differ between epochs."""
    if max_atoms < 1:
        raise ValueError(f"max_atoms must be at least 1, not {max_atoms}")
    sizes = np.asarray(sizes, dtype=np.int64)
    if np.any(sizes < 1):
        raise ValueError("every frame needs at least one atom")
    order = rng.permutation(len(sizes)) if rng is not None else np.arange(len(sizes))
    order = order[np.argsort(-sizes[order], kind="stable")]  # largest first; ties in the shuffled order
    batches: list[list[int]] = []
    open_: list[tuple[int, int]] = []  # (room left, batch) of batches with room, sorted
    for i in order.tolist():
        n = int(sizes[i])
        k = bisect.bisect_left(open_, (n, -1))  # the fullest batch that still takes n atoms
        if k < len(open_):
            free, b = open_.pop(k)
            batches[b].append(i)
            if free - n > 0:
                bisect.insort(open_, (free - n, b))
        else:
            batches.append([i])
            if max_atoms - n > 0:
                bisect.insort(open_, (max_atoms - n, len(batches) - 1))
    if rng is not None:
        batches = [batches[k] for k in rng.permutation(len(batches))]
    return batches
