"""A small foundation model made here with mace-torch itself (nothing is downloaded): a
``ScaleShiftMACE`` trained at GFN2-xTB on water, H3O+, OH- and the water dimer, and saved as
mace-torch saves its models (``torch.save`` of the module: a pickle)."""

from __future__ import annotations

from pathlib import Path

import mace  # noqa: F401  (before e3nn: mace sets up its constants)
import numpy as np
import torch
from ase.build import molecule
from e3nn import o3
from mace.modules import RealAgnosticInteractionBlock, RealAgnosticResidualInteractionBlock, ScaleShiftMACE

from ionflow.dft_adapters import get_adapter
from ionflow.platform.model.graph import build_batch
from ionflow.platform.structures import labelled_copy, rattled, with_charge_state
from tests.structures import hydronium

#: The foundation's elements: H, C, O (carbon is in the table but in no data).
Z_TABLE = [1, 6, 8]


def label(frames, method: str) -> list:
    """``frames`` with REF_energy/REF_forces from tblite's ``method``."""
    results = get_adapter("tblite", {"method": method}).label(frames)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    return [labelled_copy(a, r.energy, r.forces) for a, r in zip(frames, results)]


def water_dimer():
    dimer, other = molecule("H2O"), molecule("H2O")
    other.translate([0.0, 0.0, 2.9])
    return with_charge_state(dimer + other, 0, 1)


def pretraining_frames() -> list:
    """120 GFN2-xTB frames: water, H3O+, OH- and the water dimer, rattled by 0.12 Å."""
    bases = [with_charge_state(molecule("H2O"), 0, 1), hydronium(), with_charge_state(molecule("H2O")[:2], -1, 1)]
    frames = [
        a for k, base in enumerate([*bases, water_dimer()]) for a in rattled(base, n=30, stdev=0.12, seed=100 + k)
    ]
    return label(frames, "GFN2-xTB")


def make_foundation(path: Path, frames: list, epochs: int = 40, reduced_cg: bool = False) -> Path:
    """Train a mace-torch ScaleShiftMACE (2 layers, 8x0e+8x1o, float64) on ``frames`` for ``epochs``
    epochs (about 10 s) and write it to ``path`` as mace-torch does. ``reduced_cg``: the product
    weights in mace's reduced layout, as mace-torch writes them where cuequivariance is installed."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # mace builds its layers in torch's default dtype
    try:
        energies = np.array([a.info["REF_energy"] for a in frames])
        counts = np.array([[np.sum(a.numbers == z) for z in Z_TABLE] for a in frames])
        e0 = np.linalg.lstsq(counts, energies, rcond=None)[0]
        e0[1] = -50.0  # carbon (no data)
        torch.manual_seed(0)
        model = ScaleShiftMACE(
            r_max=4.0,
            num_bessel=8,
            num_polynomial_cutoff=5,
            max_ell=2,
            interaction_cls=RealAgnosticResidualInteractionBlock,
            interaction_cls_first=RealAgnosticInteractionBlock,
            num_interactions=2,
            num_elements=len(Z_TABLE),
            hidden_irreps=o3.Irreps("8x0e+8x1o"),
            MLP_irreps=o3.Irreps("8x0e"),
            atomic_energies=e0,
            avg_num_neighbors=3.0,
            atomic_numbers=Z_TABLE,
            correlation=2,
            gate=torch.nn.functional.silu,
            atomic_inter_scale=1.0,
            atomic_inter_shift=0.0,
            use_reduced_cg=reduced_cg,  # False: the same weights whether cuequivariance is installed or not
        )
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
        rng = np.random.default_rng(0)
        for _ in range(epochs):
            order = rng.permutation(len(frames))
            for start in range(0, len(order), 16):
                chunk = [frames[i] for i in order[start : start + 16]]
                out = model(build_batch(chunk, Z_TABLE, 4.0, dtype=torch.float64), training=True, compute_force=True)
                n = torch.tensor([len(a) for a in chunk], dtype=torch.float64)
                ref_e = torch.tensor([a.info["REF_energy"] for a in chunk])
                ref_f = torch.tensor(np.concatenate([a.arrays["REF_forces"] for a in chunk]))
                loss = 10 * (((out["energy"] - ref_e) / n) ** 2).mean() + ((out["forces"] - ref_f) ** 2).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
    finally:
        torch.set_default_dtype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, path)
    return path
