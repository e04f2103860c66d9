"""The training loss of an ensemble, and the gradients of one batch.

For a committee the loss is

    L = w_E * mean_g ((E_pred - E_ref) / N_g)^2 + w_F * mean_i |F_pred - F_ref|^2
      + w_q * mean_{i labelled} (q_pred - q_ref)^2
      + w_mu * mean_{g labelled, finite} |mu_pred - mu_ref|^2 / 3

summed over the committee's members, which share nothing but the data: the sum
of independent losses trains each member as if it were alone. Energies in eV per atom, forces
in eV/Å per Cartesian component, charges in e per atom, dipoles in e·Å per Cartesian component
about the centre of mass; each weight has the inverse squared unit of its term. The charge and
dipole terms apply only to models with an electrostatic head, and only to the frames that carry
those labels (dipoles only for non-periodic frames).

A shallow ensemble's K heads share one backbone. Its loss is the same squared error of the
heads' mean (E and F above) plus w_nll times the Gaussian negative log-likelihood of the labels
under the heads' mean and variance, per atom for energies and per component for forces:

    NLL = mean ½ [ (y − sg(μ))² / σ² + log σ² ],   μ, σ² = mean and variance over the K heads

with the mean held fixed in the NLL (sg: stop-gradient) so that accuracy comes from the squared
error and the NLL shapes only the spread; w_nll is dimensionless, and the energy and force NLLs
are weighted by w_E and w_F as their squared errors are.

Every mean above divides by a count of the batch: structures (energy), atoms x 3 (forces),
labelled atoms (charges), labelled structures (dipole). In data-parallel training
(:mod:`ionflow.platform.distributed`) each rank evaluates a shard of a batch with the whole
batch's counts (:class:`LossCounts`), so that the shards' losses, and their gradients, sum to
the loss of the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ionflow.platform.model.ensemble import Ensemble
from ionflow.platform.settings import ModelSettings, TrainingSettings


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms: energy (eV/atom)^-2, forces (eV/Å)^-2, charges e^-2, dipole (e·Å)^-2,
    NLL (shallow ensembles only; dimensionless). A term left at 0 is off."""

    energy: float
    forces: float
    charges: float = 0.0
    dipole: float = 0.0
    nll: float = 0.0


def loss_weights(training: TrainingSettings, model: ModelSettings) -> LossWeights:
    """The weights ``training`` asks for, with the terms ``model`` cannot fit off: charges and
    dipole without an electrostatic head, the NLL for a committee."""
    return LossWeights(
        energy=training.energy_weight,
        forces=training.forces_weight,
        charges=training.charges_weight if model.has_electrostatics else 0.0,
        dipole=training.dipole_weight if model.has_electrostatics else 0.0,
        nll=training.nll_weight if model.shallow else 0.0,
    )


@dataclass(frozen=True)
class LossCounts:
    """The counts a batch's loss terms divide by. Given for a shard of a batch, they are the whole
    batch's, so that the shards' losses sum to the batch's (data-parallel training)."""

    structures: int  # g: the energy term and the energy NLL are means over structures
    atoms: int  # n: the force term and the force NLL are means over 3n components
    charge_atoms: int  # atoms with a reference charge
    dipole_structures: int  # structures with a reference dipole (non-periodic ones)


def batch_counts(batch: dict[str, torch.Tensor]) -> LossCounts:
    """A batch's own counts: what :func:`batch_loss` divides by when given none."""
    return LossCounts(
        structures=int(batch["n_atoms"].numel()),
        atoms=int(batch["ref_forces"].shape[0]),
        charge_atoms=int(batch["charges_mask"].sum()),
        dipole_structures=int(batch["dipole_mask"].sum()),
    )


def _mean(values: torch.Tensor, dims: int | tuple[int, ...] | None, count: float | None) -> torch.Tensor:
    """``values.mean(dims)`` (all axes for None), or the sum over them divided by ``count`` when given."""
    if count is None:
        return values.mean() if dims is None else values.mean(dims)
    return (values.sum() if dims is None else values.sum(dims)) / count


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, count: float | None = None) -> torch.Tensor:
    """Mean over the last axis of the entries where ``mask`` is true ([K, m] -> [K]); 0 when none is.
    With ``count``, the masked sum divided by it (at least 1) instead of by the mask's count."""
    mask = mask.to(values.dtype)
    if count is not None:
        return (values * mask).sum(-1) / max(float(count), 1.0)
    return (values * mask).sum(-1) / mask.sum().clamp(min=1.0)


#: Floor added to the heads' energy variance in the NLL, (eV/atom)^2: far below any useful spread;
#: it keeps log σ² finite while the heads still agree.
ENERGY_VARIANCE_FLOOR = 1e-8
#: Floor added to the heads' force variance in the NLL, (eV/Å)^2, for the same reason.
FORCES_VARIANCE_FLOOR = 1e-6


def gaussian_nll(
    pred: torch.Tensor,
    ref: torch.Tensor,
    floor: float,
    count: float | None = None,
    deviation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean ½[(y − sg(μ))²/σ² + log σ²] with μ, σ² the mean and variance over the leading (heads) axis;
    with ``count``, the sum over the entries divided by it. ``deviation``, when given, is ``pred``
    less its mean, computed apart: σ² is taken from it, so that the gradient does not run back
    through the mean's own graph (a variance does not depend on the mean)."""
    mean = pred.mean(0).detach()
    variance = (pred if deviation is None else deviation).var(0) + floor
    return 0.5 * _mean(((ref - mean) ** 2) / variance + variance.log(), None, count)


def batch_loss(
    ensemble: Ensemble,
    batch: dict[str, torch.Tensor],
    weights: LossWeights,
    training: bool,
    counts: LossCounts | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The squared-error loss of a batch from :func:`~ionflow.platform.dataset.label_batches` and,
    for a shallow ensemble with ``weights.nll > 0``, its weighted NLL (else None). The means divide
    by ``counts`` when given (a shard of a larger batch), else by the batch's own."""
    out = ensemble(batch, training=training, head_forces=weights.nll > 0)  # the squared error needs only the mean
    nll = None
    n_e = None if counts is None else counts.structures
    n_f = None if counts is None else 3 * counts.atoms
    energy = out["energy"] / batch["n_atoms"]  # [K, g] eV/atom
    if ensemble.spec.settings.shallow:
        de = energy.mean(0, keepdim=True) - batch["ref_energy"] / batch["n_atoms"]  # [1, g]
        # the heads' mean force: −∂Ē/∂r, whose gradient does not run through the heads' own graphs
        df = out["forces_mean"] - batch["ref_forces"]  # [1, n, 3]
        loss = weights.energy * _mean(de**2, None, n_e) + weights.forces * _mean(df**2, None, n_f)
        if weights.nll > 0:
            ref = batch["ref_energy"] / batch["n_atoms"]  # [g] eV/atom
            nll = weights.energy * gaussian_nll(energy, ref, ENERGY_VARIANCE_FLOOR, n_e)
            nll = weights.nll * (
                nll
                + weights.forces
                * gaussian_nll(
                    out["forces"], batch["ref_forces"], FORCES_VARIANCE_FLOOR, n_f, out.get("forces_deviation")
                )
            )
    else:
        de = energy - batch["ref_energy"] / batch["n_atoms"]  # [K, g] eV/atom
        df = out["forces"] - batch["ref_forces"]  # [K, n, 3] eV/Å
        loss = weights.energy * _mean(de**2, -1, n_e).sum() + weights.forces * _mean(df**2, (-2, -1), n_f).sum()
    if weights.charges > 0 and bool(batch["charges_mask"].any()):
        dq = out["charges"] - batch["ref_charges"]  # [K, n] e
        n_q = None if counts is None else counts.charge_atoms
        loss = loss + weights.charges * _masked_mean(dq**2, batch["charges_mask"], n_q).sum()
    if weights.dipole > 0 and bool(batch["dipole_mask"].any()):
        dmu = out["dipole"] - batch["ref_dipole"]  # [K, g, 3] e·Å, both about the centre of mass
        # per Cartesian component, like the forces; not divided by the atom count: a molecule has
        # one dipole but many force components, so a per-atom dipole term would vanish
        per_structure = (dmu**2).mean(-1)  # [K, g] (e·Å)^2
        n_mu = None if counts is None else counts.dipole_structures
        loss = loss + weights.dipole * _masked_mean(per_structure, batch["dipole_mask"], n_mu).sum()
    return loss, nll


def head_parameters(ensemble: Ensemble) -> list[torch.nn.Parameter]:
    """The parameters in which a shallow ensemble's heads differ: their readouts."""
    return list(ensemble.member.state.parameters())


def backward(
    ensemble: Ensemble, batch: dict[str, torch.Tensor], weights: LossWeights, counts: LossCounts | None = None
) -> float:
    """Accumulate the gradients of one batch's loss (means over ``counts`` when given, see
    :func:`batch_loss`); return the loss. The NLL reaches only the heads' own layer: left to reach
    the shared backbone, it buys spread by degrading the mean (the squared error alone sets the mean)."""
    loss, nll = batch_loss(ensemble, batch, weights, training=True, counts=counts)
    if nll is None:
        loss.backward()
        return float(loss.detach())
    heads = head_parameters(ensemble)
    loss.backward(retain_graph=True)
    for parameter, grad in zip(heads, torch.autograd.grad(nll, heads)):
        parameter.grad = grad if parameter.grad is None else parameter.grad + grad
    return float((loss + nll).detach())


def validation_loss(
    ensemble: Ensemble, batch: dict[str, torch.Tensor], weights: LossWeights, counts: LossCounts | None = None
) -> float:
    """The loss of one batch in evaluation mode, NLL included: what picks the best epoch (means
    over ``counts`` when given, see :func:`batch_loss`)."""
    loss, nll = batch_loss(ensemble, batch, weights, training=False, counts=counts)
    return float(loss.detach()) + (0.0 if nll is None else float(nll.detach()))
