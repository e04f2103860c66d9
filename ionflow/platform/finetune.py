"""Fine-tuning from a foundation model: the starting ensemble, which weights train at which rate,
and replay of the foundation's own data.

A fine-tuned member is the foundation's ``ScaleShiftMACE`` (architecture and weights) plus
ionflow's heads (state energy, charges), which start as they do from scratch: the state head at
zero, so the model starts as the foundation plus the Coulomb energy of its first charges. The
foundation's E0 belong to its level of theory; the campaign's labels have their own, so the E0 are
refitted: E0_z = E0_z(foundation) + δ_z, with δ the least-squares fit of the labels' residuals
from the foundation's predictions (elements absent from the labels keep the foundation's E0).

Replay (``training.replay_*``): frames at the foundation's level of theory train the backbone
through its own readout only, energy less the foundation's E0 against the backbone's interaction
energy and forces against its forces, so the shared layers keep describing the foundation's
data while ionflow's heads and the refitted E0 absorb the difference to the campaign's labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from ionflow.platform.dataset import fit_atomic_energies, label_batches, reference_energy
from ionflow.platform.loss import LossWeights
from ionflow.platform.model.ensemble import Ensemble, ModelSpec, build_ensemble
from ionflow.platform.model.foundation import Foundation, build_backbone
from ionflow.platform.model.graph import build_batch
from ionflow.platform.model.network import Member
from ionflow.platform.settings import ModelSettings, TrainingSettings

#: Frames per forward pass when the foundation predicts the labels' energies (E0 refit).
_PREDICT_CHUNK = 64


def members(ensemble: Ensemble) -> list[Member]:
    """The ensemble's backbones with their heads: K for a committee, one for a shallow ensemble."""
    return [module for module in ensemble.modules() if isinstance(module, Member)]


def check_elements(foundation: Foundation, frames: Sequence[Atoms], what: str) -> None:
    """Raise ``ValueError`` when ``frames`` hold an element the foundation has no embedding for."""
    missing = foundation.missing_elements({int(z) for a in frames for z in a.numbers})
    if missing:
        from ase.data import chemical_symbols

        names = ", ".join(chemical_symbols[z] for z in missing)
        raise ValueError(
            f"{what} hold {names}, which the foundation model {foundation.path} was not trained on (its elements: "
            f"{', '.join(chemical_symbols[z] for z in foundation.z_table)})"
        )


def _architecture(model: ModelSettings, foundation: Foundation) -> ModelSettings:
    """``model`` with the backbone fields the foundation fixes replaced by the foundation's."""
    config = foundation.config
    correlation = config["correlation"]
    return dataclasses.replace(
        model,
        r_max=float(config["r_max"]),
        num_interactions=int(config["num_interactions"]),
        hidden_irreps=str(config["hidden_irreps"]),
        mlp_irreps=str(config["MLP_irreps"]),
        max_ell=int(config["max_ell"]),
        correlation=int(correlation[0] if isinstance(correlation, list) else correlation),
        num_bessel=int(config["num_bessel"]),
        num_polynomial_cutoff=int(config["num_polynomial_cutoff"]),
    )


@torch.no_grad()
def _foundation_energies(foundation: Foundation, frames: Sequence[Atoms]) -> np.ndarray:
    """The foundation's own energies (eV, with its E0) of ``frames``, in float64."""
    backbone = build_backbone(foundation.config).to(torch.float64)
    backbone.load_state_dict(foundation.state_dict)
    backbone.eval()
    energies = []
    for start in range(0, len(frames), _PREDICT_CHUNK):
        chunk = frames[start : start + _PREDICT_CHUNK]
        batch = build_batch(chunk, foundation.z_table, foundation.r_max, dtype=torch.float64)
        with torch.enable_grad():
            out = backbone(batch, training=False, compute_force=False)
        energies.append(out["energy"].detach().numpy())
    return np.concatenate(energies)


def foundation_spec(
    frames: Sequence[Atoms], model: ModelSettings, seed_base: list[int], foundation: Foundation
) -> ModelSpec:
    """The spec of an ensemble fine-tuned from ``foundation`` on labelled ``frames``: the
    foundation's architecture, elements, scale, shift and neighbour count, E0 refitted (module
    docstring), ``model``'s heads, ensemble and dtype."""
    check_elements(foundation, frames, "the labels")
    z_table = foundation.z_table
    present = sorted({int(z) for a in frames for z in a.numbers})
    residual = np.array([reference_energy(a) for a in frames]) - _foundation_energies(foundation, frames)
    shifted = [a.copy() for a in frames]
    for atoms, r in zip(shifted, residual):
        atoms.info["REF_energy"] = float(r)
    delta = dict(zip(present, fit_atomic_energies(shifted, present)))
    e0 = [e + float(delta.get(z, 0.0)) for z, e in zip(z_table, foundation.atomic_energies)]
    config = foundation.config
    return ModelSpec(
        hyper=dataclasses.asdict(_architecture(model, foundation)),
        z_table=z_table,
        atomic_energies=e0,
        scale=float(np.ravel(config["atomic_inter_scale"])[0]),
        shift=float(np.ravel(config["atomic_inter_shift"])[0]),
        avg_num_neighbors=float(config["avg_num_neighbors"]),
        seeds=list(seed_base),
        backbone=config,
        foundation=foundation.record(),
    )


def from_foundation(
    frames: Sequence[Atoms], model: ModelSettings, seeds: list[int], foundation: Foundation
) -> Ensemble:
    """An ensemble whose every backbone holds the foundation's weights (E0 refitted) and whose
    heads start from ``seeds`` as from scratch."""
    spec = foundation_spec(frames, model, seeds, foundation)
    ensemble = build_ensemble(spec)
    e0 = torch.tensor(spec.atomic_energies)
    for member in members(ensemble):
        member.backbone.load_state_dict(foundation.state_dict)
        table = member.backbone.atomic_energies_fn.atomic_energies
        table.copy_(e0.to(table.dtype).expand_as(table))  # every head's row: the campaign's E0
    return ensemble


def zero_shot(foundation: Foundation, model: ModelSettings) -> Ensemble:
    """The foundation model alone, as a one-member ensemble with its own E0 and no electrostatic
    head (``electrostatics: none``; the state head starts at zero): what a campaign explores with
    before its first label. Its spreads are zero: nothing stops its walkers but contact."""
    spec = ModelSpec(
        hyper=dataclasses.asdict(
            dataclasses.replace(
                _architecture(model, foundation), electrostatics="none", uncertainty="committee", ensemble_size=1
            )
        ),
        z_table=foundation.z_table,
        atomic_energies=foundation.atomic_energies,
        scale=float(np.ravel(foundation.config["atomic_inter_scale"])[0]),
        shift=float(np.ravel(foundation.config["atomic_inter_shift"])[0]),
        avg_num_neighbors=float(foundation.config["avg_num_neighbors"]),
        seeds=[0],
        backbone=foundation.config,
        foundation=foundation.record(),
    )
    ensemble = build_ensemble(spec)
    for member in members(ensemble):
        member.backbone.load_state_dict(foundation.state_dict)
    return ensemble.eval()


def parameter_groups(ensemble: Ensemble, training: TrainingSettings, learning_rate: float) -> list[dict]:
    """Adam's parameter groups: everything at ``learning_rate`` for a model of ionflow's own; for
    one fine-tuned from a foundation, ionflow's heads at ``learning_rate``, the backbone at
    ``learning_rate x foundation_lr_factor``, and its embeddings and first ``frozen_layers``
    message-passing layers frozen (``requires_grad`` off, in no group)."""
    if ensemble.spec.foundation is None:
        return [{"params": [p for p in ensemble.parameters() if p.requires_grad], "lr": learning_rate}]
    n_frozen = int(training.frozen_layers)
    layers = int(ensemble.spec.settings.num_interactions)
    if n_frozen > layers:
        raise ValueError(f"training.frozen_layers is {n_frozen} but the foundation has {layers} message-passing layers")
    backbone: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for member in members(ensemble):
        bb = member.backbone
        frozen_modules = [bb.node_embedding, bb.radial_embedding, *bb.interactions[:n_frozen], *bb.products[:n_frozen]]
        frozen = {id(p) for module in (frozen_modules if n_frozen else []) for p in module.parameters()}
        for p in bb.parameters():
            seen.add(id(p))
            p.requires_grad_(id(p) not in frozen)
            if id(p) not in frozen:
                backbone.append(p)
    heads = [p for p in ensemble.parameters() if id(p) not in seen]
    return [
        {"params": heads, "lr": learning_rate},
        {"params": backbone, "lr": learning_rate * float(training.foundation_lr_factor)},
    ]


def read_replay(path: str | Path, foundation_elements: Sequence[int] | None = None) -> list[Atoms]:
    """The labelled frames of a replay file (energies and forces at the foundation's level of
    theory, as ``REF_*`` keys or a calculator's results). Replay trains only the backbone, which
    knows no spin: a frame without a ``multiplicity`` gets the lowest its electron count allows.
    Raises ``ValueError`` naming the file and the problem."""
    from ionflow.platform.dataset import dataset_problem
    from ionflow.platform.structures import read_structures, with_reference_labels

    try:
        frames = [with_reference_labels(a) for a in read_structures(path)]
    except Exception as exc:  # ASE raises many types for unreadable files
        raise ValueError(f"replay file {path}: cannot read structures: {exc}") from None
    for atoms in frames:
        if "multiplicity" not in atoms.info:
            electrons = int(atoms.numbers.sum()) - int(round(float(atoms.info.get("charge", 0))))
            atoms.info["multiplicity"] = 1 + electrons % 2
    problem = dataset_problem(frames)
    if problem is None and foundation_elements is not None:
        missing = sorted({int(z) for a in frames for z in a.numbers} - set(foundation_elements))
        if missing:
            from ase.data import chemical_symbols

            problem = f"it holds {', '.join(chemical_symbols[z] for z in missing)}, outside the foundation's elements"
    if problem:
        raise ValueError(f"replay file {path}: {problem}")
    return frames


def replay_batches(
    replay: Sequence[Atoms],
    spec: ModelSpec,
    count: int,
    steps: int,
    rng: np.random.Generator,
    device: torch.device,
) -> list[dict[str, torch.Tensor]]:
    """``count`` replay frames drawn without replacement (all, when fewer), in ``steps`` batches."""
    if not replay or steps < 1:
        return []
    pick = rng.choice(len(replay), size=min(count, len(replay)), replace=False)
    groups = [g.tolist() for g in np.array_split(pick, min(steps, len(pick)))]
    return label_batches(replay, spec, 0, device, groups)


def replay_backward(ensemble: Ensemble, batch: dict[str, torch.Tensor], weights: LossWeights, factor: float) -> float:
    """Accumulate the gradients of the replay loss of one batch (each backbone through its own
    readout, against the foundation's energies less its E0 and its forces); return the loss."""
    e0 = torch.tensor(ensemble.spec.foundation["atomic_energies"], dtype=batch["ref_energy"].dtype)
    e0 = e0.to(batch["ref_energy"].device)
    per_atom = batch["node_attrs"].to(e0.dtype) @ e0  # [n] eV
    reference = batch["ref_energy"] - torch.zeros_like(batch["ref_energy"]).index_add(0, batch["batch"], per_atom)
    total = torch.zeros((), dtype=e0.dtype, device=e0.device)
    for member in members(ensemble):
        out = member.backbone(dict(batch), training=True, compute_force=True)
        de = (out["interaction_energy"] - reference) / batch["n_atoms"]  # [g] eV/atom
        df = out["forces"] - batch["ref_forces"]  # [n, 3] eV/Å
        total = total + weights.energy * (de**2).mean() + weights.forces * (df**2).mean()
    loss = factor * total
    loss.backward()
    return float(loss.detach())
