"""Ensembles of MACE models, whose spread is the uncertainty that drives selection.

Two kinds, chosen by ``ModelSettings.uncertainty``, with one interface:
  committee  K independently initialised and trained members (K backbones);
  shallow    one backbone whose last readout layer has K heads (Kellner & Ceriotti's
             shallow ensemble), trained with a Gaussian negative log-likelihood: one
             forward pass, and the heads' force deviations in one batched backward pass.
Forces are always autograd derivatives of an energy (MACE's own ``get_outputs``), never a
separate head; an ensemble's forces are the mean of its K forces, the derivative of the
mean energy. The spreads are multiplied by calibration factors fitted on validation data
(:func:`ionflow.platform.evaluation.calibrate`) and stored in the spec.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ionflow.platform.model.foundation import build_backbone
from ionflow.platform.model.mace_blocks import ScaleShiftMACE, interaction_classes, o3
from ionflow.platform.model.network import Member
from ionflow.platform.settings import ModelSettings

# MACE's defaults for the interaction blocks of its "MACE" model type.
_INTERACTION = interaction_classes["RealAgnosticResidualInteractionBlock"]
_INTERACTION_FIRST = interaction_classes["RealAgnosticInteractionBlock"]


@dataclass
class ModelSpec:
    """Everything needed to rebuild an ensemble's architecture (no weights).

    ``hyper`` holds the :class:`~ionflow.platform.settings.ModelSettings` fields as a plain dict
    (what the model file stores), read through :attr:`settings`; ``atomic_energies``
    (eV) are the per-element reference energies E0 in the order of ``z_table``;
    ``scale`` (eV) and ``shift`` (eV) map the readout to interaction energies;
    ``avg_num_neighbors`` normalises messages; ``calibration`` holds the factors that turn the
    raw spreads into predicted errors: ``energy`` (for the energy spread) and ``forces`` (for the
    per-atom force spread), 1.0 until fitted. A model fine-tuned from a foundation model has the
    foundation's architecture in ``backbone`` (:func:`~ionflow.platform.model.foundation.backbone_config`,
    plain data; ``None``: ionflow's own MACE from ``hyper``) and in ``foundation`` the file it came
    from: path, sha256 and the foundation's own E0 (eV, ``z_table`` order).
    """

    hyper: dict[str, Any]
    z_table: list[int]
    atomic_energies: list[float]
    scale: float = 1.0
    shift: float = 0.0
    avg_num_neighbors: float = 4.0
    seeds: list[int] = field(default_factory=list)
    calibration: dict[str, float] = field(default_factory=lambda: {"energy": 1.0, "forces": 1.0})
    backbone: dict[str, Any] | None = None
    foundation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data; ``backbone`` and ``foundation`` only when set (files of models without a
        foundation stay readable by ionflow releases that predate them)."""
        data = asdict(self)
        for key in ("backbone", "foundation"):
            if data[key] is None:
                del data[key]
        return data

    @property
    def settings(self) -> ModelSettings:
        """The architecture, typed."""
        return ModelSettings(**self.hyper)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64 if self.settings.dtype == "float64" else torch.float32


def build_member(spec: ModelSpec, seed: int, heads: int = 1) -> Member:
    """One member (MACE backbone + electrostatic head, ``heads`` readout heads), initialised from ``seed``."""
    h = spec.settings
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if spec.backbone is not None:  # a foundation's architecture (its weights are loaded by the caller)
            model = build_backbone(spec.backbone, spec.atomic_energies).to(spec.dtype)
            return Member(model, h, list(spec.z_table), heads=heads)
        model = ScaleShiftMACE(
            r_max=float(h.r_max),
            num_bessel=int(h.num_bessel),
            num_polynomial_cutoff=int(h.num_polynomial_cutoff),
            max_ell=int(h.max_ell),
            interaction_cls=_INTERACTION,
            interaction_cls_first=_INTERACTION_FIRST,
            num_interactions=int(h.num_interactions),
            num_elements=len(spec.z_table),
            hidden_irreps=o3.Irreps(h.hidden_irreps),
            MLP_irreps=o3.Irreps(h.mlp_irreps),
            atomic_energies=np.asarray(spec.atomic_energies, dtype=float),
            avg_num_neighbors=float(spec.avg_num_neighbors),
            atomic_numbers=list(spec.z_table),
            correlation=int(h.correlation),
            gate=torch.nn.functional.silu,
            atomic_inter_scale=float(spec.scale),
            atomic_inter_shift=float(spec.shift),
            use_reduced_cg=False,  # the layout of every ionflow model file, whether cuequivariance is installed or not
        ).to(spec.dtype)
        return Member(model, h, list(spec.z_table), heads=heads)


class Ensemble(torch.nn.Module):
    """What both kinds share: ``spec``, the cutoff, the element table, and :meth:`predict`.

    ``forward`` returns energy (K, g) eV and forces (K, n, 3) eV/Å of the K members or heads, and
    charges, dipole and stress with a leading axis of K (committee) or 1 (shallow: shared).
    """

    spec: ModelSpec

    @property
    def r_max(self) -> float:
        return float(self.spec.settings.r_max)

    @property
    def z_table(self) -> list[int]:
        return list(self.spec.z_table)

    @property
    def size(self) -> int:
        return int(self.spec.settings.ensemble_size)

    @property
    def device(self) -> torch.device:
        """Where the ensemble's weights are (batches must be built there)."""
        return next(self.parameters()).device

    @property
    def first_member(self) -> Member:
        """The committee's first member, or the shallow ensemble's one backbone: the first
        :class:`Member` among the submodules, in the order they were built."""
        return next(module for module in self.modules() if isinstance(module, Member))

    @torch.no_grad()
    def environments(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-atom invariant features [n, d] of :attr:`first_member` (:meth:`Member.environments`),
        without gradients: invariant to rotation, translation and permutation of like atoms."""
        return self.first_member.environments(batch)

    def predict(self, batch: dict[str, torch.Tensor], compute_stress: bool = False) -> dict[str, torch.Tensor]:
        """Ensemble mean and calibrated spread, detached.

        energy (g,) eV; forces (n, 3) eV/Å; energy_std (g,) eV, the K energies' standard deviation
        times the energy calibration; force_std (n,) eV/Å, per atom sqrt(mean_k |F_k - F_mean|^2)
        times the force calibration; energies (K, g) and forces_members (K, n, 3) for the record;
        charges (n,) e and dipole (g, 3) e·Å, means; stress (g, 3, 3) eV/Å^3 when asked.
        """
        out = self.forward(batch, training=False, compute_stress=compute_stress)
        e, f = out["energy"].detach(), out["forces"].detach()
        f_mean = f.mean(0)
        calibration = self.spec.calibration
        result = {
            "energy": e.mean(0),
            "forces": f_mean,
            "energy_std": e.std(0, unbiased=False) * float(calibration["energy"]),
            "force_std": ((f - f_mean) ** 2).sum(-1).mean(0).sqrt() * float(calibration["forces"]),
            "energies": e,
            "forces_members": f,
            "charges": out["charges"].detach().mean(0),
            "dipole": out["dipole"].detach().mean(0),
        }
        if compute_stress:
            result["stress"] = out["stress"].detach().mean(0)
        return result


class Committee(Ensemble):
    """K MACE members evaluated on one batch, sharing nothing but the data."""

    def __init__(self, spec: ModelSpec, seeds: list[int] | None = None) -> None:
        super().__init__()
        k = int(spec.settings.ensemble_size)
        spec.seeds = list(seeds if seeds is not None else (spec.seeds or range(k)))
        if len(spec.seeds) != k:
            raise ValueError(f"ensemble_size is {k} but {len(spec.seeds)} seeds were given")
        self.spec = spec
        self.members = torch.nn.ModuleList(build_member(spec, s) for s in spec.seeds)

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        training: bool = False,
        compute_stress: bool = False,
        head_forces: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Every member's outputs stacked on a leading axis of size K: energy (K, g), forces
        (K, n, 3), charges (K, n), dipole (K, g, 3), energy_coulomb (K, g), stress (K, g, 3, 3).
        ``head_forces`` changes nothing here: each member has one head."""
        outputs = [member(batch, training=training, compute_stress=compute_stress) for member in self.members]
        return {key: torch.stack([o[key] for o in outputs]) for key in outputs[0]}


class ShallowEnsemble(Ensemble):
    """One MACE backbone and electrostatic head whose last readout layer has K heads."""

    def __init__(self, spec: ModelSpec, seeds: list[int] | None = None) -> None:
        super().__init__()
        k = int(spec.settings.ensemble_size)
        spec.seeds = list(seeds if seeds is not None else (spec.seeds or [0]))[:1]
        self.spec = spec
        self.member = build_member(spec, spec.seeds[0], heads=k)

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        training: bool = False,
        compute_stress: bool = False,
        head_forces: bool = True,
    ) -> dict[str, torch.Tensor]:
        """energy (K, g) and forces (K, n, 3) of the K heads; charges (1, n), dipole (1, g, 3),
        energy_coulomb (1, g) and stress (1, g, 3, 3), which the heads share; forces_mean (1, n, 3),
        the heads' mean force −∂Ē/∂r; forces_deviation (K, n, 3), forces − forces_mean computed without
        the mean. With ``head_forces=False`` forces is forces_mean (one backward pass instead of K) and
        there is no forces_deviation."""
        out = self.member(batch, training=training, compute_stress=compute_stress, head_forces=head_forces)
        result = {key: value[None] for key, value in out.items() if not key.endswith("_heads")}
        result["forces_mean"] = result["forces"]
        result["energy"], result["forces"] = out["energy_heads"], out["forces_heads"]
        if "forces_deviation_heads" in out:  # every head's force less the mean (K, n, 3)
            result["forces_deviation"] = out["forces_deviation_heads"]
        return result


UNCERTAINTY = {"committee": Committee, "shallow": ShallowEnsemble}


def build_ensemble(spec: ModelSpec, seeds: list[int] | None = None) -> Ensemble:
    """A committee or a shallow ensemble, as ``spec.settings.uncertainty`` says."""
    kind = spec.settings.uncertainty
    if kind not in UNCERTAINTY:
        raise ValueError(f"uncertainty must be one of {sorted(UNCERTAINTY)}, got {kind!r}")
    return UNCERTAINTY[kind](spec, seeds=seeds)
