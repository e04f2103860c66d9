"""A committee of MACE models: K independently initialised and trained members.

The members' spread is the uncertainty that drives selection. Forces are the
autograd derivative of each member's energy (MACE's own ``get_outputs``), never a
separate head; the committee's forces are the mean of the members' forces,
which is the derivative of the mean energy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ionflow.platform.model._mace import ScaleShiftMACE, interaction_classes  # before e3nn
from ionflow.platform.model.network import Member

from e3nn import o3  # noqa: E402, I001

# MACE's defaults for the interaction blocks of its "MACE" model type.
_INTERACTION = interaction_classes["RealAgnosticResidualInteractionBlock"]
_INTERACTION_FIRST = interaction_classes["RealAgnosticInteractionBlock"]


@dataclass
class ModelSpec:
    """Everything needed to rebuild a committee's architecture (no weights).

    ``hyper`` holds the :class:`ionflow.config.ModelConfig` fields; ``atomic_energies``
    (eV) are the per-element reference energies E0 in the order of ``z_table``;
    ``scale`` (eV) and ``shift`` (eV) map the readout to interaction energies;
    ``avg_num_neighbors`` normalises messages.
    """

    hyper: dict[str, Any]
    z_table: list[int]
    atomic_energies: list[float]
    scale: float = 1.0
    shift: float = 0.0
    avg_num_neighbors: float = 4.0
    seeds: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64 if self.hyper.get("dtype", "float64") == "float64" else torch.float32


def build_member(spec: ModelSpec, seed: int) -> Member:
    """One member of the committee (MACE backbone + electrostatic head), initialised from ``seed``."""
    h = spec.hyper
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ScaleShiftMACE(
            r_max=float(h["r_max"]),
            num_bessel=int(h["num_bessel"]),
            num_polynomial_cutoff=int(h["num_polynomial_cutoff"]),
            max_ell=int(h["max_ell"]),
            interaction_cls=_INTERACTION,
            interaction_cls_first=_INTERACTION_FIRST,
            num_interactions=int(h["num_interactions"]),
            num_elements=len(spec.z_table),
            hidden_irreps=o3.Irreps(h["hidden_irreps"]),
            MLP_irreps=o3.Irreps(h["mlp_irreps"]),
            atomic_energies=np.asarray(spec.atomic_energies, dtype=float),
            avg_num_neighbors=float(spec.avg_num_neighbors),
            atomic_numbers=list(spec.z_table),
            correlation=int(h["correlation"]),
            gate=torch.nn.functional.silu,
            atomic_inter_scale=float(spec.scale),
            atomic_inter_shift=float(spec.shift),
        ).to(spec.dtype)
        return Member(model, h, list(spec.z_table))


class Committee(torch.nn.Module):
    """K MACE members evaluated on one batch.

    ``forward`` returns per-member energies (K, g) in eV and forces (K, n, 3) in eV/Å
    (and stress (K, g, 3, 3) in eV/Å^3 when asked); :meth:`predict` adds the mean and
    the spreads used for selection.
    """

    def __init__(self, spec: ModelSpec, seeds: list[int] | None = None) -> None:
        super().__init__()
        k = int(spec.hyper["committee_size"])
        spec.seeds = list(seeds if seeds is not None else (spec.seeds or range(k)))
        if len(spec.seeds) != k:
            raise ValueError(f"committee_size is {k} but {len(spec.seeds)} seeds were given")
        self.spec = spec
        self.members = torch.nn.ModuleList(build_member(spec, s) for s in spec.seeds)

    @property
    def r_max(self) -> float:
        return float(self.spec.hyper["r_max"])

    @property
    def z_table(self) -> list[int]:
        return list(self.spec.z_table)

    def forward(
        self, batch: dict[str, torch.Tensor], training: bool = False, compute_stress: bool = False
    ) -> dict[str, torch.Tensor]:
        """Every member's outputs stacked on a leading axis of size K: energy (K, g), forces
        (K, n, 3), charges (K, n), dipole (K, g, 3), energy_coulomb (K, g), stress (K, g, 3, 3)."""
        outputs = [member(batch, training=training, compute_stress=compute_stress) for member in self.members]
        return {key: torch.stack([o[key] for o in outputs]) for key in outputs[0]}

    def predict(self, batch: dict[str, torch.Tensor], compute_stress: bool = False) -> dict[str, torch.Tensor]:
        """Committee mean and spread, detached.

        energy (g,) eV; forces (n, 3) eV/Å; energy_std (g,) eV, the members' standard
        deviation; force_std (n,) eV/Å, per atom sqrt(mean_k |F_k - F_mean|^2);
        energies (K, g) and forces_members (K, n, 3) for the record; charges (n,) e and
        dipole (g, 3) e·Å, the members' means.
        """
        out = self.forward(batch, training=False, compute_stress=compute_stress)
        e, f = out["energy"].detach(), out["forces"].detach()
        f_mean = f.mean(0)
        result = {
            "energy": e.mean(0),
            "forces": f_mean,
            "energy_std": e.std(0, unbiased=False),
            "force_std": ((f - f_mean) ** 2).sum(-1).mean(0).sqrt(),
            "energies": e,
            "forces_members": f,
            "charges": out["charges"].detach().mean(0),
            "dipole": out["dipole"].detach().mean(0),
        }
        if compute_stress:
            result["stress"] = out["stress"].detach().mean(0)
        return result
