"""Fit an ensemble (committee or shallow) to reference labels, calibrate it, and measure its errors.

Labels are read from ``REF_energy`` (eV, ``info``) and ``REF_forces`` (eV/Å,
``arrays``), the keys ionflow writes in its extxyz datasets, and where present
``REF_charges`` (e per atom, ``arrays``) and ``REF_dipole`` (e·Å, ``info``, about the
frame's origin as the adapters write it; moved to the centre of mass here). The loss is

    L = w_E * mean_g ((E_pred - E_ref) / N_g)^2 + w_F * mean_i |F_pred - F_ref|^2
      + w_q * mean_{i labelled} (q_pred - q_ref)^2
      + w_mu * mean_{g labelled, finite} |mu_pred - mu_ref|^2 / N_g

summed over the committee's members, which share nothing but the data: the sum
of independent losses trains each member as if it were alone. The charge and
dipole terms apply only to models with an electrostatic head, and only to the
frames that carry those labels (dipoles only for non-periodic frames).

A shallow ensemble's K heads share one backbone. Its loss is the same squared error of the
heads' mean (E and F above) plus w_nll times the Gaussian negative log-likelihood of the labels
under the heads' mean and variance, per atom for energies and per component for forces:

    NLL = mean ½ [ (y − sg(μ))² / σ² + log σ² ],   μ, σ² = mean and variance over the K heads

with the mean held fixed in the NLL (sg: stop-gradient) so that accuracy comes from the squared
error and the NLL shapes only the spread. It starts after a quarter of the epochs of a model
trained from scratch, when the mean has left its random start.

After training, :func:`calibrate` fits on the validation frames the factors by which the spreads
are multiplied to become predicted errors (maximum likelihood of a Gaussian error model).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from ase import Atoms

from ionflow.platform.model.committee import Ensemble, ModelSpec, build_ensemble, pick_device
from ionflow.platform.model.graph import build_batch
from ionflow.platform.structures import (
    REF_PREFIX,
    charge_of,
    charge_state_problem,
    dipole_about_centre_of_mass,
    multiplicity_of,
)

if TYPE_CHECKING:
    from ionflow.config import ModelConfig, TrainingConfig

Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class TrainReport:
    """What a training run did; errors in eV/atom and eV/Å on the validation set."""

    epochs: int
    wall_time_s: float
    train_loss: float
    valid_loss: float
    best_epoch: int
    from_parent: bool


def reference_energy(atoms: Atoms) -> float:
    return float(atoms.info[REF_PREFIX + "energy"])


def reference_forces(atoms: Atoms) -> np.ndarray:
    return np.asarray(atoms.arrays[REF_PREFIX + "forces"], dtype=float)


def reference_charges(atoms: Atoms) -> np.ndarray | None:
    """Reference atomic charges (n,) in e, or None when the frame has none."""
    value = atoms.arrays.get(REF_PREFIX + "charges")
    return None if value is None else np.asarray(value, dtype=float).reshape(len(atoms))


def reference_dipole(atoms: Atoms) -> np.ndarray | None:
    """Reference dipole (3,) in e·Å about the centre of mass (the model's convention).

    None for frames without ``REF_dipole`` and for periodic frames, whose dipole is not defined.
    """
    value = atoms.info.get(REF_PREFIX + "dipole")
    if value is None or np.any(atoms.pbc):
        return None
    return dipole_about_centre_of_mass(atoms, value)


def has_electrostatics(hyper: dict) -> bool:
    """Whether a model with these hyper-parameters predicts charges (and so a dipole)."""
    return hyper.get("electrostatics", "none") != "none"


def fit_atomic_energies(frames: Sequence[Atoms], z_table: Sequence[int]) -> np.ndarray:
    """Per-element reference energies E0 (eV) from a least-squares fit E ~ sum_z n_z E0_z.

    With one composition the system is underdetermined; lstsq then gives the
    minimum-norm solution, which still reproduces the mean energy exactly.
    """
    counts = np.array([[np.sum(a.numbers == z) for z in z_table] for a in frames], dtype=float)
    energies = np.array([reference_energy(a) for a in frames])
    e0, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return e0


def new_spec(frames: Sequence[Atoms], hyper: dict, seed: int) -> ModelSpec:
    """Architecture and data statistics (E0, force scale, neighbour count) for a fresh committee."""
    z_table = sorted({int(z) for a in frames for z in a.numbers})
    e0 = fit_atomic_energies(frames, z_table)
    forces = np.concatenate([reference_forces(a).ravel() for a in frames])
    scale = float(np.sqrt(np.mean(forces**2))) or 1.0
    batch = build_batch(frames, z_table, float(hyper["r_max"]))
    avg_neighbours = batch["edge_index"].shape[1] / max(1, batch["positions"].shape[0])
    k = int(hyper["ensemble_size"])
    return ModelSpec(
        hyper=dict(hyper),
        z_table=z_table,
        atomic_energies=[float(x) for x in e0],
        scale=scale,
        shift=0.0,
        avg_num_neighbors=max(1.0, float(avg_neighbours)),
        seeds=[seed * 1000 + i for i in range(k)],
    )


def _batches(
    frames: Sequence[Atoms], spec: ModelSpec, batch_size: int, device: torch.device | str = "cpu"
) -> list[dict[str, torch.Tensor]]:
    """Graphs are built once: positions do not change during training.

    Besides the graph, each batch holds ``ref_energy`` (g,), ``ref_forces`` (n, 3), ``n_atoms`` (g,),
    ``ref_charges`` (n,) with ``charges_mask`` (n,), and ``ref_dipole`` (g, 3, about the centre of
    mass) with ``dipole_mask`` (g,); masked-out entries hold zeros.
    """
    out = []
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size]
        batch = build_batch(chunk, spec.z_table, float(spec.hyper["r_max"]), dtype=spec.dtype)
        batch["ref_energy"] = torch.tensor([reference_energy(a) for a in chunk], dtype=spec.dtype)
        batch["ref_forces"] = torch.tensor(np.concatenate([reference_forces(a) for a in chunk]), dtype=spec.dtype)
        batch["n_atoms"] = torch.tensor([len(a) for a in chunk], dtype=spec.dtype)
        charges = [reference_charges(a) for a in chunk]
        dipoles = [reference_dipole(a) for a in chunk]
        batch["ref_charges"] = torch.tensor(
            np.concatenate([np.zeros(len(a)) if q is None else q for a, q in zip(chunk, charges)]), dtype=spec.dtype
        )
        batch["charges_mask"] = torch.tensor(
            np.concatenate([np.full(len(a), q is not None) for a, q in zip(chunk, charges)])
        )
        batch["ref_dipole"] = torch.tensor(
            np.stack([np.zeros(3) if mu is None else mu for mu in dipoles]), dtype=spec.dtype
        )
        batch["dipole_mask"] = torch.tensor([mu is not None for mu in dipoles])
        out.append({key: value.to(device) for key, value in batch.items()})
    return out


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms: energy (eV/atom)^-2, forces (eV/Å)^-2, charges e^-2, dipole (e·Å)^-2."""

    energy: float = 1.0
    forces: float = 1.0
    charges: float = 0.0
    dipole: float = 0.0
    nll: float = 0.0  # shallow ensembles only; dimensionless


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the last axis of the entries where ``mask`` is true ([K, m] -> [K]); 0 when none is."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum().clamp(min=1.0)


# Floors of the NLL's variances: (eV/atom)^2 and (eV/Å)^2, far below any useful spread.
_VARIANCE_FLOOR = {"energy": 1e-8, "forces": 1e-6}


def _gaussian_nll(pred: torch.Tensor, ref: torch.Tensor, floor: float) -> torch.Tensor:
    """Mean ½[(y − sg(μ))²/σ² + log σ²] with μ, σ² the mean and variance over the leading (heads) axis."""
    mean = pred.mean(0).detach()
    variance = pred.var(0) + floor
    return 0.5 * (((ref - mean) ** 2) / variance + variance.log()).mean()


def _loss(
    committee: Ensemble, batch: dict[str, torch.Tensor], weights: LossWeights, training: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The squared-error loss and, for a shallow ensemble with ``weights.nll > 0``, its weighted NLL."""
    out = committee(batch, training=training)
    nll = None
    energy = out["energy"] / batch["n_atoms"]  # [K, g] eV/atom
    if committee.spec.hyper.get("uncertainty", "committee") == "shallow":
        de = energy.mean(0, keepdim=True) - batch["ref_energy"] / batch["n_atoms"]  # [1, g]
        df = out["forces"].mean(0, keepdim=True) - batch["ref_forces"]  # [1, n, 3]
        loss = weights.energy * (de**2).mean() + weights.forces * (df**2).mean()
        if weights.nll > 0:
            nll = weights.energy * _gaussian_nll(
                energy, batch["ref_energy"] / batch["n_atoms"], _VARIANCE_FLOOR["energy"]
            )
            nll = weights.nll * (
                nll + weights.forces * _gaussian_nll(out["forces"], batch["ref_forces"], _VARIANCE_FLOOR["forces"])
            )
    else:
        de = energy - batch["ref_energy"] / batch["n_atoms"]  # [K, g] eV/atom
        df = out["forces"] - batch["ref_forces"]  # [K, n, 3] eV/Å
        loss = weights.energy * (de**2).mean(-1).sum() + weights.forces * (df**2).mean((-2, -1)).sum()
    if weights.charges > 0 and bool(batch["charges_mask"].any()):
        dq = out["charges"] - batch["ref_charges"]  # [K, n] e
        loss = loss + weights.charges * _masked_mean(dq**2, batch["charges_mask"]).sum()
    if weights.dipole > 0 and bool(batch["dipole_mask"].any()):
        dmu = out["dipole"] - batch["ref_dipole"]  # [K, g, 3] e·Å, both about the centre of mass
        # per Cartesian component, like the forces; not divided by the atom count: a molecule has
        # one dipole but many force components, so a per-atom dipole term would vanish
        per_structure = (dmu**2).mean(-1)  # [K, g] (e·Å)^2
        loss = loss + weights.dipole * _masked_mean(per_structure, batch["dipole_mask"]).sum()
    return loss, nll


def _head_parameters(committee: Ensemble) -> list[torch.nn.Parameter]:
    """The parameters in which a shallow ensemble's heads differ: their readouts."""
    return list(committee.member.state.parameters())


def _step(committee: Ensemble, batch: dict[str, torch.Tensor], weights: LossWeights) -> float:
    """Gradients of one batch's loss. The NLL reaches only the heads' own layer: left to reach the
    shared backbone, it buys spread by degrading the mean (the squared error alone sets the mean)."""
    loss, nll = _loss(committee, batch, weights, training=True)
    if nll is None:
        loss.backward()
        return float(loss.detach())
    heads = _head_parameters(committee)
    loss.backward(retain_graph=True)
    for parameter, grad in zip(heads, torch.autograd.grad(nll, heads)):
        parameter.grad = grad if parameter.grad is None else parameter.grad + grad
    return float((loss + nll).detach())


def _valid_loss(committee: Ensemble, batch: dict[str, torch.Tensor], weights: LossWeights) -> float:
    loss, nll = _loss(committee, batch, weights, training=False)
    return float(loss.detach()) + (0.0 if nll is None else float(nll.detach()))


def check_one_level_of_theory(frames: Sequence[Atoms]) -> None:
    """Refuse a training set that mixes levels of theory or holds labels that are not ``ok``.

    Frames labelled by ionflow carry ``info["settings_hash"]`` (the adapter's level of theory)
    and, from ``ionflow label``, ``info["label_status"]``; frames without them (labels made
    elsewhere) are taken as they are. Raises ``ValueError`` naming the frames.
    """
    bad = [i for i, a in enumerate(frames) if a.info.get("label_status", "ok") != "ok"]
    if bad:
        raise ValueError(f"frames {bad[:10]} have labels that did not end ok (label_status); they cannot be trained on")
    by_hash: dict[str, list[int]] = {}
    for i, a in enumerate(frames):
        if "settings_hash" in a.info:
            by_hash.setdefault(str(a.info["settings_hash"]), []).append(i)
    if len(by_hash) > 1:
        groups = "; ".join(f"{h[:12]}: frames {idx[:5]}{'...' if len(idx) > 5 else ''}" for h, idx in by_hash.items())
        raise ValueError(
            f"the labels come from {len(by_hash)} different levels of theory (settings_hash {groups}); "
            "train on labels of one level of theory"
        )


def train_committee(
    train: Sequence[Atoms],
    valid: Sequence[Atoms],
    hyper: dict,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    energy_weight: float,
    forces_weight: float,
    seed: int,
    parent: Ensemble | None = None,
    progress: Progress | None = None,
    charges_weight: float = 0.0,
    dipole_weight: float = 10.0,
    nll_weight: float = 1.0,
    device: torch.device | str | None = None,
) -> tuple[Ensemble, TrainReport]:
    """Train an ensemble on labelled ``train`` frames, keeping the weights best on ``valid``,
    then fit its calibration on ``valid`` (:func:`calibrate`; kept from the parent, or 1, without).

    ``charges_weight`` and ``dipole_weight`` (defaults as in :class:`ionflow.config.TrainingConfig`)
    weigh the ``REF_charges``/``REF_dipole`` terms of the loss for the frames that have them; a
    model without electrostatics predicts no charges and ignores both. ``nll_weight`` weighs a
    shallow ensemble's negative log-likelihood (see the module docstring); committees ignore it.
    ``device`` (default :func:`~ionflow.platform.model.committee.pick_device`: a GPU when there is
    one) is where training runs; the ensemble returned is on the CPU.

    With a ``parent`` whose elements cover the data the committee is refined from
    the parent's weights (the parent itself is not modified); otherwise it starts
    from scratch with E0 and force scale fitted to ``train``.
    """
    if not train:
        raise ValueError("no training frames")
    check_one_level_of_theory([*train, *valid])
    start = time.perf_counter()
    elements = {int(z) for a in train for z in a.numbers}
    from_parent = parent is not None and elements <= set(parent.z_table)
    if from_parent:
        committee = copy.deepcopy(parent)
    else:
        committee = build_ensemble(new_spec(train, hyper, seed))
    device = torch.device(device) if device is not None else pick_device()
    committee = committee.to(device)
    spec = committee.spec
    electrostatic = has_electrostatics(spec.hyper)
    shallow = spec.hyper.get("uncertainty", "committee") == "shallow"
    weights = LossWeights(
        energy=energy_weight,
        forces=forces_weight,
        charges=charges_weight if electrostatic else 0.0,
        dipole=dipole_weight if electrostatic else 0.0,
        nll=nll_weight if shallow else 0.0,
    )
    # the NLL joins once the mean has left its random start; the best weights are chosen after that
    nll_start = 0 if from_parent or not shallow else epochs // 4
    active = weights
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_batches_fixed = None if len(train) > batch_size else _batches(train, spec, batch_size, device)
    valid_batches = _batches(valid, spec, batch_size, device) if valid else []

    optimiser = torch.optim.Adam(committee.parameters(), lr=learning_rate, amsgrad=True)
    # Cosine decay to 2% of the initial rate: small data sets need the late, gentle steps.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda e: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))
    )
    best = (math.inf, -1, copy.deepcopy(committee.state_dict()))
    train_loss = math.nan
    for epoch in range(epochs):
        weights = active if epoch >= nll_start else LossWeights(**{**active.__dict__, "nll": 0.0})
        if epoch == nll_start and nll_start > 0:
            best = (math.inf, -1, best[2])  # a loss with the NLL is not comparable with one without
        committee.train()
        if train_batches_fixed is not None:
            batches = train_batches_fixed
        else:
            order = rng.permutation(len(train))
            batches = _batches([train[i] for i in order], spec, batch_size, device)
        total = 0.0
        for batch in batches:
            optimiser.zero_grad(set_to_none=True)
            total += _step(committee, batch, weights)
            optimiser.step()
        scheduler.step()
        train_loss = total / len(batches)
        committee.eval()
        if valid_batches:
            valid_loss = sum(_valid_loss(committee, b, weights) for b in valid_batches) / len(valid_batches)
        else:
            valid_loss = train_loss
        if valid_loss < best[0]:
            best = (valid_loss, epoch, copy.deepcopy(committee.state_dict()))
        if progress:
            progress(epoch + 1, epochs)
    committee.load_state_dict(best[2])
    committee.eval()
    if valid:
        committee.spec.calibration = calibrate(committee, valid)
    committee = committee.to("cpu")  # files and callers get CPU tensors; they move it where they run
    report = TrainReport(
        epochs=epochs,
        wall_time_s=time.perf_counter() - start,
        train_loss=train_loss,
        valid_loss=best[0],
        best_epoch=best[1],
        from_parent=from_parent,
    )
    return committee, report


def _errors_and_spreads(
    ensemble: Ensemble, frames: Sequence[Atoms], batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Energy errors (g,) eV and raw spreads (g,) eV; per-atom force error norms (n,) and raw spreads (n,) eV/Å."""
    de, se, df, sf = [], [], [], []
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size]
        batch = build_batch(chunk, ensemble.z_table, ensemble.r_max, dtype=ensemble.spec.dtype, device=ensemble.device)
        pred = {k: v.cpu() for k, v in ensemble.predict(batch).items()}
        energies, forces = pred["energies"].numpy(), pred["forces_members"].numpy()
        de.append(energies.mean(0) - [reference_energy(a) for a in chunk])
        se.append(energies.std(0))
        df.append(np.linalg.norm(forces.mean(0) - np.concatenate([reference_forces(a) for a in chunk]), axis=-1))
        sf.append(np.sqrt(((forces - forces.mean(0)) ** 2).sum(-1).mean(0)))
    return tuple(np.concatenate(x) for x in (de, se, df, sf))


def calibrate(ensemble: Ensemble, frames: Sequence[Atoms], batch_size: int = 64) -> dict[str, float]:
    """Calibration factors that turn the raw spreads into predicted errors, fitted on ``frames``.

    Maximum likelihood of a Gaussian error model with the spread as its scale: for energies
    s_E² = mean_g (ΔE_g / σ_g)², for forces s_F² = mean_i |ΔF_i|² / σ_i² (σ_i² the per-atom spread
    squared, summed over components). Entries whose raw spread is zero are left out; a factor
    that cannot be fitted is 1.
    """

    def factor(errors: np.ndarray, spreads: np.ndarray) -> float:
        ok = spreads > 0
        return float(np.sqrt(np.mean((errors[ok] / spreads[ok]) ** 2))) if ok.any() else 1.0

    de, se, df, sf = _errors_and_spreads(ensemble, frames, batch_size)
    return {"energy": factor(de, se), "forces": factor(df, sf)}


def evaluate(committee: Ensemble, frames: Sequence[Atoms], batch_size: int = 64) -> dict[str, float]:
    """Errors of the ensemble mean against reference labels, and its (calibrated) spreads.

    Returns energy RMSE/MAE (eV/atom), force RMSE/MAE (eV/Å, per component), mean and max
    per-atom force spread (eV/Å), mean energy spread (eV), ``force_z_rms`` (the RMS over atoms of
    |ΔF_i| / force spread_i: 1 for a calibrated model, above 1 when it is overconfident), and ``n``
    frames. For a model with
    an electrostatic head, also, when some frames carry the labels: ``charges_rmse``/``charges_mae``
    (e, over labelled atoms, ``n_charges`` frames) and ``dipole_rmse``/``dipole_mae`` (e·Å, per
    Cartesian component, about the centre of mass, over ``n_dipole`` finite labelled frames).
    """
    if not frames:
        return {"n": 0}
    electrostatic = has_electrostatics(committee.spec.hyper)
    de, df, fstd, estd, dq, dmu = [], [], [], [], [], []
    n_charges = 0
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size]
        batch = build_batch(
            chunk, committee.z_table, committee.r_max, dtype=committee.spec.dtype, device=committee.device
        )
        pred = {k: v.cpu() for k, v in committee.predict(batch).items()}
        batch = {k: v.cpu() for k, v in batch.items()}
        n_atoms = np.array([len(a) for a in chunk])
        de.append((pred["energy"].numpy() - [reference_energy(a) for a in chunk]) / n_atoms)
        df.append(pred["forces"].numpy() - np.concatenate([reference_forces(a) for a in chunk]))
        fstd.append(pred["force_std"].numpy())
        estd.append(pred["energy_std"].numpy())
        if not electrostatic:
            continue
        charges, dipoles = pred["charges"].numpy(), pred["dipole"].numpy()
        ptr = batch["ptr"].numpy()
        for g, atoms in enumerate(chunk):
            q = reference_charges(atoms)
            if q is not None:
                dq.append(charges[ptr[g] : ptr[g + 1]] - q)
                n_charges += 1
            mu = reference_dipole(atoms)
            if mu is not None:
                dmu.append(dipoles[g] - mu)
    de, df, fstd, estd = map(np.concatenate, (de, df, fstd, estd))
    metrics = {
        "n": len(frames),
        "energy_rmse": float(np.sqrt(np.mean(de**2))),
        "energy_mae": float(np.mean(np.abs(de))),
        "forces_rmse": float(np.sqrt(np.mean(df**2))),
        "forces_mae": float(np.mean(np.abs(df))),
        "force_std_mean": float(np.mean(fstd)),
        "force_std_max": float(np.max(fstd)),
        "energy_std_mean": float(np.mean(estd)),
    }
    spread = fstd > 0
    if spread.any():
        metrics["force_z_rms"] = float(np.sqrt(np.mean(np.sum(df[spread] ** 2, -1) / fstd[spread] ** 2)))
    if dq:
        dq = np.concatenate(dq)
        metrics.update(
            n_charges=n_charges,
            charges_rmse=float(np.sqrt(np.mean(dq**2))),
            charges_mae=float(np.mean(np.abs(dq))),
        )
    if dmu:
        dmu = np.stack(dmu)
        metrics.update(
            n_dipole=len(dmu),
            dipole_rmse=float(np.sqrt(np.mean(dmu**2))),
            dipole_mae=float(np.mean(np.abs(dmu))),
        )
    return metrics


def dataset_problem(frames: Sequence[Atoms]) -> str | None:
    """Say what makes ``frames`` unusable for training, naming the first bad frame (0-based), or None.

    Every frame needs ``REF_energy`` and ``REF_forces`` (n, 3) (see
    :func:`ionflow.platform.structures.with_reference_labels` for plain ASE labels), an integer
    charge and multiplicity consistent with its electron count, and ``REF_charges``/``REF_dipole``
    of the right shapes where present; all from one level of theory (:func:`check_one_level_of_theory`).
    """
    if not frames:
        return "no frames"
    try:
        check_one_level_of_theory(frames)
    except ValueError as exc:
        return str(exc)
    for k, atoms in enumerate(frames):
        where = f"frame {k} ({atoms.get_chemical_formula()})"
        if len(atoms) == 0:
            return f"{where} has no atoms"
        missing = [
            key for key, store in (("energy", atoms.info), ("forces", atoms.arrays)) if REF_PREFIX + key not in store
        ]
        if missing:
            return f"{where} has no {' or '.join(REF_PREFIX + m for m in missing)} label (nor a calculator's {'/'.join(missing)})"
        if not np.isfinite(reference_energy(atoms)):
            return f"{where}: {REF_PREFIX}energy is not finite"
        forces = np.asarray(atoms.arrays[REF_PREFIX + "forces"], dtype=float)
        if forces.shape != (len(atoms), 3) or not np.all(np.isfinite(forces)):
            return f"{where}: {REF_PREFIX}forces must be finite with shape ({len(atoms)}, 3), got {forces.shape}"
        for key in ("charge", "multiplicity"):
            value = atoms.info.get(key)
            if value is not None and (not np.isscalar(value) or float(value) != int(float(value))):
                return f"{where}: {key} must be an integer, got {value!r}"
        problem = charge_state_problem(atoms.numbers, charge_of(atoms), multiplicity_of(atoms))
        if problem:
            return f"{where}: charge/multiplicity: {problem}"
        charges = atoms.arrays.get(REF_PREFIX + "charges")
        if charges is not None and np.asarray(charges).size != len(atoms):
            return f"{where}: {REF_PREFIX}charges must have one value per atom"
        dipole = atoms.info.get(REF_PREFIX + "dipole")
        if dipole is not None and np.asarray(dipole).size != 3:
            return f"{where}: {REF_PREFIX}dipole must have 3 components"
    return None


def split_frames(frames: Sequence[Atoms], valid_fraction: float, seed: int) -> tuple[list[Atoms], list[Atoms]]:
    """Deterministic train/valid split: a seeded permutation, ``round(fraction * n)`` frames held out.

    At least one frame is held out when ``valid_fraction > 0`` and there are two or more frames,
    and at least one is always kept for training.
    """
    n = len(frames)
    n_valid = int(round(valid_fraction * n))
    if valid_fraction > 0 and n >= 2:
        n_valid = max(1, n_valid)
    n_valid = min(n_valid, n - 1)
    order = np.random.default_rng(seed).permutation(n)
    valid = set(order[:n_valid].tolist())
    return [a for i, a in enumerate(frames) if i not in valid], [a for i, a in enumerate(frames) if i in valid]


def fit_dataset(
    frames: Sequence[Atoms],
    model_cfg: ModelConfig,
    training_cfg: TrainingConfig,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[Ensemble, TrainReport, dict[str, float]]:
    """Train a fresh committee on labelled ``frames`` outside any campaign (``ionflow train``).

    Frames are split with :func:`split_frames` (``training_cfg.valid_fraction``); returns the
    committee (weights best on the validation frames), its report, and :func:`evaluate` on the
    validation frames (``{"n": 0}`` when none are held out).
    Raises ``ValueError`` naming the frame when :func:`dataset_problem` finds one.
    """
    problem = dataset_problem(frames)
    if problem:
        raise ValueError(problem)
    train, valid = split_frames(frames, training_cfg.valid_fraction, seed)
    committee, report = train_committee(
        train,
        valid,
        model_cfg.model_dump(),
        epochs=training_cfg.epochs,
        learning_rate=training_cfg.learning_rate,
        batch_size=training_cfg.batch_size,
        energy_weight=training_cfg.energy_weight,
        forces_weight=training_cfg.forces_weight,
        charges_weight=training_cfg.charges_weight,
        dipole_weight=training_cfg.dipole_weight,
        seed=seed,
        progress=progress,
    )
    return committee, report, evaluate(committee, valid)
