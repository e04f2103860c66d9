"""Atomic charges that add up: Fukui-weighted equilibration, per spin channel.

Raw charges q⁰ (from the model's features) are shifted so that each structure's
charges sum exactly to its total charge Q:

    q_i = q⁰_i + f̃_i · (Q − Σ_j q⁰_j),     f̃_i = softplus(f_i) / Σ_j softplus(f_j)

with f_i a learned, environment-dependent weight ("Fukui function": where extra
charge goes). With spin, each channel is equilibrated on its own, to targets

    Q_α + Q_β = Q,   Q_α − Q_β = M − 1      (M the multiplicity)

and the atomic charge is q = q_α + q_β, the spin population s = q_α − q_β.
Uniform weights (f = 0) give the "latent" design point: a uniform shift.
All operations are differentiable, so forces stay exact autograd derivatives.
"""

from __future__ import annotations

import torch
from torch.nn.functional import softplus


def _per_structure_sum(values: torch.Tensor, batch: torch.Tensor, n_structures: int) -> torch.Tensor:
    out = torch.zeros((n_structures,) + values.shape[1:], dtype=values.dtype, device=values.device)
    return out.index_add_(0, batch, values)


def equilibrate(
    raw: torch.Tensor, weights: torch.Tensor | None, batch: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Shift ``raw`` charges (n,) or (n, c) so that each structure sums to ``targets`` (g,) or (g, c).

    ``weights`` (same shape as ``raw``) are the unnormalised Fukui weights; None means
    uniform. ``batch`` (n,) says which structure each atom belongs to.
    """
    n_structures = targets.shape[0]
    excess = targets - _per_structure_sum(raw, batch, n_structures)  # [g, (c)]
    if weights is None:
        weights = torch.ones_like(raw)
    else:
        weights = softplus(weights)
    norm = _per_structure_sum(weights, batch, n_structures)  # [g, (c)]
    return raw + weights / norm[batch] * excess[batch]


def spin_targets(total_charge: torch.Tensor, multiplicity: torch.Tensor) -> torch.Tensor:
    """Per-channel charge targets (g, 2): Q_α = (Q + M − 1)/2, Q_β = (Q − M + 1)/2."""
    unpaired = multiplicity - 1
    return torch.stack([(total_charge + unpaired) / 2, (total_charge - unpaired) / 2], dim=-1)


def equilibrate_spin(
    raw: torch.Tensor,
    weights: torch.Tensor | None,
    batch: torch.Tensor,
    total_charge: torch.Tensor,
    multiplicity: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Equilibrate two channels (n, 2); return atomic charges q (n,) and spin populations s (n,)."""
    channels = equilibrate(raw, weights, batch, spin_targets(total_charge, multiplicity))
    return channels.sum(-1), channels[:, 0] - channels[:, 1]


def dipole(
    charges: torch.Tensor, positions: torch.Tensor, masses: torch.Tensor, batch: torch.Tensor, n_structures: int
) -> torch.Tensor:
    """Dipole moments (g, 3) in e·Å about each structure's centre of mass (origin-free only when Q = 0)."""
    total_mass = _per_structure_sum(masses, batch, n_structures)
    centre = _per_structure_sum(masses[:, None] * positions, batch, n_structures) / total_mass[:, None]
    return _per_structure_sum(charges[:, None] * (positions - centre[batch]), batch, n_structures)
