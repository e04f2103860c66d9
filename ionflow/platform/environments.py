"""Atomic environments in a model's own feature space, and how novel a frame's are.

An atom's environment is the vector of invariant (0e) channels of the MACE node features of an
ensemble's first member (committee) or shared backbone (shallow ensemble),
:meth:`~ionflow.platform.model.Ensemble.environments`: invariant to rotation, translation and
permutation of like atoms, in the units of the features (arbitrary, but the model's own, so the
notion of "similar" is the one the model learned). One forward pass without forces: the cost is
linear in atoms, as for a model evaluation.

Novelty of an atom i of element z against reference environments R_z of the SAME element:

    ν_i = min_{r ∈ R_z} |f_i − r| / s_z            (dimensionless; ∞ when R_z is empty)

where s_z, the element's typical distance, is the median over reference environments of the
distance to the nearest one of the same element in another reference frame (ν = 1: as far as
labelled frames are from each other). A frame's novelty is the largest ν_i of its atoms: one
atom in a new environment (a proton that hopped, a stretched bond) makes the frame new, whatever
the other 999 atoms do. Comparing within an element only, an H environment is never "covered" by
an O environment that happens to lie near it in feature space.

Reference sets are subsampled per element by farthest-point sampling to at most
``max_per_element`` environments (deterministic, and it keeps the outliers, which random
sampling would drop), and distances are taken in blocks (``torch.cdist``), so memory and time
stay linear in the atoms of the frames compared; a very large labelled set is thinned to
``MAX_REFERENCE_ATOMS`` atoms of whole frames first (:func:`thinned`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms

from ionflow.platform.model import Ensemble, build_batch

#: Atoms per forward pass when computing environments (a batch holds whole frames, at least one).
BATCH_ATOMS = 4096

#: Reference environments kept per element: farthest-point samples beyond this. 2048 x 2048
#: distances (the typical-distance estimate) take a fraction of a second on a laptop core.
MAX_PER_ELEMENT = 2048

#: Labelled atoms whose environments are computed per selection: beyond it every k-th labelled frame
#: (evenly over the campaign) stands for the rest. At ~0.5 ms per atom on one CPU core (a small
#: MACE, no forces; far less on a GPU) that bounds the reference's cost to a couple of minutes,
#: whatever the campaign's size: little next to one reference calculation of a frame that size
#: (200 labelled 1,000-atom cells). Farthest-point sampling keeps at most MAX_PER_ELEMENT per element.
MAX_REFERENCE_ATOMS = 200_000

#: Entries of one block of a distance matrix (float64: 32 MiB).
_BLOCK = 1 << 22


@dataclass
class Environments:
    """One frame's atomic environments: ``numbers`` (n,) atomic numbers, ``features`` (n, d)
    invariant features (model units, float64, CPU)."""

    numbers: np.ndarray
    features: torch.Tensor


def environments(ensemble: Ensemble, frames: Sequence[Atoms], batch_atoms: int = BATCH_ATOMS) -> list[Environments]:
    """The environments of every atom of each frame, in order, computed in batches of whole
    frames of at most ``batch_atoms`` atoms (one frame may exceed it alone)."""
    groups: list[list[int]] = []
    for g, atoms in enumerate(frames):
        if groups and sum(len(frames[k]) for k in groups[-1]) + len(atoms) <= batch_atoms:
            groups[-1].append(g)
        else:
            groups.append([g])
    dtype = next(ensemble.parameters()).dtype
    out: list[Environments] = []
    for group in groups:
        batch = build_batch([frames[g] for g in group], ensemble.z_table, ensemble.r_max, dtype, ensemble.device)
        features = ensemble.environments(batch).to("cpu", torch.float64)  # [atoms of the group, d]
        bounds = batch["ptr"].tolist()
        for k, g in enumerate(group):
            out.append(Environments(np.asarray(frames[g].numbers), features[bounds[k] : bounds[k + 1]]))
    return out


def thinned(frames: Sequence[Atoms], max_atoms: int = MAX_REFERENCE_ATOMS) -> list[Atoms]:
    """``frames``, or every k-th of them (the smallest k that brings them to at most ``max_atoms``
    atoms, as far as whole frames allow)."""
    total = sum(len(a) for a in frames)
    step = max(1, -(-total // max_atoms))
    return list(frames)[::step]


def nearest_distances(
    x: torch.Tensor,
    reference: torch.Tensor,
    x_frames: torch.Tensor | None = None,
    reference_frames: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance (n,) from each row of ``x`` (n, d) to its nearest row of ``reference`` (m, d), in
    blocks of rows; ∞ when there is none. With frame indices of both (``x_frames`` (n,),
    ``reference_frames`` (m,)), rows of the same frame do not count."""
    if reference.shape[0] == 0:
        return torch.full((x.shape[0],), float("inf"), dtype=x.dtype)
    rows = max(1, _BLOCK // reference.shape[0])
    parts = []
    for start in range(0, x.shape[0], rows):
        # exact differences, not the matrix-product shortcut: copies must come out at exactly 0
        d = torch.cdist(x[start : start + rows], reference, compute_mode="donot_use_mm_for_euclid_dist")
        if x_frames is not None and reference_frames is not None:
            d = d.masked_fill(x_frames[start : start + rows, None] == reference_frames[None, :], float("inf"))
        parts.append(d.min(dim=1).values)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=x.dtype)


def farthest_points(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of at most ``k`` rows of ``x`` (n, d) by farthest-point sampling from row 0; stops
    early once every row has a chosen copy (no exact duplicates are chosen)."""
    n = x.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    chosen = [0]
    nearest = torch.linalg.vector_norm(x - x[0], dim=1)  # [n] distance to the chosen set
    while len(chosen) < min(k, n):
        far = int(torch.argmax(nearest))
        if nearest[far] <= 0:
            break
        chosen.append(far)
        nearest = torch.minimum(nearest, torch.linalg.vector_norm(x - x[far], dim=1))
    return torch.tensor(chosen, dtype=torch.long)


@dataclass
class Pool:
    """Reference environments of one element: ``features`` (m, d) and the frame of each, ``frames`` (m,)."""

    features: torch.Tensor
    frames: torch.Tensor


def by_element(envs: Sequence[Environments], max_per_element: int = MAX_PER_ELEMENT) -> dict[int, Pool]:
    """The environments of ``envs`` pooled per element, each pool farthest-point sampled to at
    most ``max_per_element`` rows: {Z: Pool}; frames are numbered by their place in ``envs``."""
    if not envs:
        return {}
    numbers = np.concatenate([e.numbers for e in envs])
    features = torch.cat([e.features for e in envs])
    frames = torch.cat([torch.full((len(e.numbers),), k, dtype=torch.long) for k, e in enumerate(envs)])
    pools = {}
    for z in np.unique(numbers):
        mask = torch.from_numpy(numbers == z)
        keep = farthest_points(features[mask], max_per_element)
        pools[int(z)] = Pool(features[mask][keep], frames[mask][keep])
    return pools


def typical_distances(pools: dict[int, Pool]) -> dict[int, float]:
    """Per element, the median distance (feature units) from an environment to the nearest one of
    the same element in ANOTHER frame: how densely the reference samples that element's
    environments. Other frames only: the like atoms of one frame (the three H of H3O+) are often
    near copies of each other and would make the scale, and so every novelty, too small by far.
    Elements found in fewer than two frames are left out."""
    scales = {}
    for z, pool in pools.items():
        d = nearest_distances(pool.features, pool.features, pool.frames, pool.frames)
        d = d[torch.isfinite(d)]
        if d.numel():
            scales[z] = float(d.median())
    return scales


def novelty(env: Environments, pools: dict[int, Pool], scales: dict[int, float]) -> torch.Tensor:
    """Per-atom novelty ν (n,) of a frame against reference ``pools`` (see the module docstring);
    ``scales`` must hold every element of the frame."""
    out = torch.full((len(env.numbers),), float("inf"), dtype=torch.float64)
    for z in np.unique(env.numbers):
        mask = torch.from_numpy(env.numbers == z)
        pool = pools.get(int(z))
        if pool is not None:
            out[mask] = nearest_distances(env.features[mask], pool.features) / scales[int(z)]
    return out
