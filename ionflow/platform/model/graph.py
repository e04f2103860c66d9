"""Atoms -> the batched graph dict that the MACE backbone reads.

Keys and shapes (n = atoms in the batch, e = edges, g = structures):
    positions    (n, 3)      Å
    node_attrs   (n, n_elements) one-hot element of each atom
    edge_index   (2, e)      sender, receiver
    shifts       (e, 3)      Å, periodic image offset of each edge
    unit_shifts  (e, 3)      integer image offset of each edge
    cell         (3 g, 3)    Å, stacked cells
    batch        (n,)        structure of each atom
    ptr          (g + 1,)    first atom of each structure
    total_charge (g,)        e
    multiplicity (g,)        2S+1
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms

from ionflow.platform.structures import charge_of, multiplicity_of, neighbour_pairs


def element_index(z_table: Sequence[int]) -> dict[int, int]:
    return {int(z): k for k, z in enumerate(z_table)}


def build_batch(
    frames: Sequence[Atoms],
    z_table: Sequence[int],
    r_max: float,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Batch ``frames`` into one disconnected graph (see module docstring for the keys)."""
    index = element_index(z_table)
    pos, attrs, senders, receivers, shifts, unit_shifts, cells, batch = [], [], [], [], [], [], [], []
    ptr = [0]
    for g, atoms in enumerate(frames):
        unknown = sorted({int(z) for z in atoms.numbers} - set(index))
        if unknown:
            raise ValueError(f"structure {g} has elements {unknown} the model was not trained on {list(z_table)}")
        n = len(atoms)
        i, j, S = neighbour_pairs(atoms, r_max, "ijS")  # edges: sender, receiver, image shifts
        cell = atoms.cell.array if np.any(atoms.pbc) else np.zeros((3, 3))
        pos.append(atoms.positions)
        onehot = np.zeros((n, len(z_table)))
        onehot[np.arange(n), [index[int(z)] for z in atoms.numbers]] = 1.0
        attrs.append(onehot)
        senders.append(i + ptr[-1])
        receivers.append(j + ptr[-1])
        unit_shifts.append(S)
        shifts.append(S @ atoms.cell.array)
        cells.append(cell)
        batch.append(np.full(n, g))
        ptr.append(ptr[-1] + n)

    def t(x: np.ndarray, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x), dtype=dt, device=device)

    return {
        "positions": t(np.concatenate(pos)),
        "node_attrs": t(np.concatenate(attrs)),
        "edge_index": t(np.stack([np.concatenate(senders), np.concatenate(receivers)]), torch.long),
        "shifts": t(np.concatenate(shifts)),
        "unit_shifts": t(np.concatenate(unit_shifts)),
        "cell": t(np.concatenate(cells)),
        "batch": t(np.concatenate(batch), torch.long),
        "ptr": t(np.asarray(ptr), torch.long),
        "total_charge": t([charge_of(a) for a in frames]),
        "multiplicity": t([multiplicity_of(a) for a in frames]),
    }
