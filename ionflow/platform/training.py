"""Fit an ensemble (committee or shallow) to reference labels, keeping the weights best on validation.

Adam (AMSGrad) minimises the loss of :mod:`ionflow.platform.loss` over batches of labelled
frames (:func:`ionflow.platform.dataset.label_batches`), the training frames reshuffled each
epoch, with a learning rate that decays on a cosine from ``learning_rate`` to
``LR_FLOOR x learning_rate`` over the epochs. After each epoch the loss on the validation frames
decides whether these weights are the best so far; the best are kept. A shallow ensemble's NLL
joins after a quarter of the epochs of a model trained from scratch, when the mean has left its
random start (a refinement from a parent has it from the first epoch). Finally the spreads are
calibrated on the validation frames (:func:`ionflow.platform.evaluation.calibrate`).

A model is refined from its parent when the parent's elements cover the data: from the parent's
weights, for ``finetune_epochs`` at ``learning_rate x finetune_lr_factor``; otherwise a fresh one
starts with E0 (eV) and a force scale (eV/Å) fitted to the training frames.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms

from ionflow.platform.batching import pack_by_atoms
from ionflow.platform.dataset import (
    check_one_level_of_theory,
    dataset_problem,
    fit_atomic_energies,
    label_batches,
    reference_forces,
    split,
)
from ionflow.platform.device import pick_device
from ionflow.platform.evaluation import calibrate, evaluate
from ionflow.platform.finetune import from_foundation, parameter_groups, replay_backward, replay_batches
from ionflow.platform.loss import backward, loss_weights, validation_loss
from ionflow.platform.model.ensemble import Ensemble, ModelSpec, build_ensemble
from ionflow.platform.model.foundation import Foundation
from ionflow.platform.model.graph import build_batch
from ionflow.platform.settings import ModelSettings, TrainingSettings

Progress = Callable[[int, int], None]  # (done, total)

#: The learning rate's cosine decays to this fraction of its start: small data sets need the late,
#: gentle steps, which a decay to zero would not take.
LR_FLOOR = 0.02

#: A shallow ensemble trained from scratch adds its NLL after epochs // NLL_START_DIVISOR epochs:
#: before that the mean is still near its random start and the NLL would fit spreads to noise.
NLL_START_DIVISOR = 4

#: Member (or backbone) k of a fresh model trained with seed s is initialised from seed
#: s * MEMBER_SEED_STRIDE + k: seeds of different runs do not overlap for K < 1000.
MEMBER_SEED_STRIDE = 1000


@dataclass
class TrainReport:
    """What a training run did; losses are those of :mod:`ionflow.platform.loss` (the validation
    loss of the best epoch, ``best_epoch`` counted from 0)."""

    epochs: int
    wall_time_s: float
    train_loss: float
    valid_loss: float
    best_epoch: int
    from_parent: bool


def new_spec(frames: Sequence[Atoms], model: ModelSettings, seed: int) -> ModelSpec:
    """Architecture and data statistics (E0, force scale, neighbour count) for a fresh ensemble."""
    z_table = sorted({int(z) for a in frames for z in a.numbers})
    e0 = fit_atomic_energies(frames, z_table)
    forces = np.concatenate([reference_forces(a).ravel() for a in frames])
    scale = float(np.sqrt(np.mean(forces**2))) or 1.0  # all-zero forces: no scale to fit
    batch = build_batch(frames, z_table, float(model.r_max))
    avg_neighbours = batch["edge_index"].shape[1] / max(1, batch["positions"].shape[0])
    k = int(model.ensemble_size)
    return ModelSpec(
        hyper=dataclasses.asdict(model),
        z_table=z_table,
        atomic_energies=[float(x) for x in e0],
        scale=scale,
        shift=0.0,
        avg_num_neighbors=max(1.0, float(avg_neighbours)),
        seeds=[seed * MEMBER_SEED_STRIDE + i for i in range(k)],
    )


def foundation_problem(spec: ModelSpec, frames: Sequence[Atoms]) -> str | None:
    """Why ``frames`` cannot go through a model with ``spec`` (an element outside its table), or None."""
    from ase.data import chemical_symbols

    missing = sorted({int(z) for a in frames for z in a.numbers} - set(spec.z_table))
    if missing:
        return f"{', '.join(chemical_symbols[z] for z in missing)} outside the model's elements"
    return None


def _cosine_decay(epochs: int) -> Callable[[int], float]:
    """Learning-rate factor of epoch e: from 1 down to LR_FLOOR at the last epoch, on a cosine."""
    return lambda e: LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))


def train_ensemble(
    train: Sequence[Atoms],
    valid: Sequence[Atoms],
    model: ModelSettings,
    training: TrainingSettings,
    seed: int,
    parent: Ensemble | None = None,
    progress: Progress | None = None,
    device: torch.device | str | None = None,
    foundation: Foundation | None = None,
    replay: Sequence[Atoms] = (),
) -> tuple[Ensemble, TrainReport]:
    """Train an ensemble on labelled ``train`` frames, keeping the weights best on ``valid``,
    then fit its calibration on ``valid`` (:func:`~ionflow.platform.evaluation.calibrate`; kept
    from the parent, or 1, without).

    ``training`` gives the epochs and learning rate (``finetune_epochs`` and ``learning_rate x
    finetune_lr_factor`` when a ``parent`` is given), the batch size and the loss weights; the
    charge and dipole terms apply to models with electrostatics only, the NLL to shallow ensembles
    only (see :mod:`ionflow.platform.loss`). ``device`` (default
    :func:`~ionflow.platform.device.pick_device`: a GPU when there is one) is where training
    runs; the ensemble returned is on the CPU.

    With a ``parent`` whose elements cover the data the ensemble is refined from the parent's
    weights and architecture (the parent itself is not modified); otherwise a fresh one with
    the architecture ``model`` starts from scratch with E0 and force scale fitted to ``train``, or,
    given a ``foundation``, from the foundation's architecture and weights with ionflow's heads
    (:mod:`~ionflow.platform.finetune`). A model fine-tuned from a foundation (now or by its
    parent) trains its backbone at ``foundation_lr_factor`` times the heads' rate with its first
    ``frozen_layers`` layers frozen, and replays ``training.replay_frames`` of the ``replay``
    frames (the foundation's level of theory) each epoch.
    """
    if not train:
        raise ValueError("no training frames")
    check_one_level_of_theory([*train, *valid])
    start = time.perf_counter()
    if parent is not None:  # a refinement, even when it has to start afresh (new elements)
        epochs, learning_rate = training.finetune_epochs, training.learning_rate * training.finetune_lr_factor
    else:
        epochs, learning_rate = training.epochs, training.learning_rate
    elements = {int(z) for a in train for z in a.numbers}
    from_parent = parent is not None and elements <= set(parent.z_table)
    if from_parent:
        ensemble = copy.deepcopy(parent)
    elif foundation is not None:
        seeds = [seed * MEMBER_SEED_STRIDE + i for i in range(int(model.ensemble_size))]
        ensemble = from_foundation(train, model, seeds, foundation)
    else:
        ensemble = build_ensemble(new_spec(train, model, seed))
    if replay and ensemble.spec.foundation is None:
        raise ValueError("replay frames need a model fine-tuned from a foundation model (model.foundation)")
    if replay:
        problem = dataset_problem(replay) or foundation_problem(ensemble.spec, replay)
        if problem:
            raise ValueError(f"replay frames: {problem}")
    device = torch.device(device) if device is not None else pick_device()
    ensemble = ensemble.to(device)
    spec = ensemble.spec
    active = loss_weights(training, spec.settings)
    # the NLL joins once the mean has left its random start; the best weights are chosen after that
    nll_start = 0 if from_parent or not spec.settings.shallow else epochs // NLL_START_DIVISOR
    batch_size = training.batch_size
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    sizes = [len(a) for a in train]
    if training.batch_atoms is not None:  # size-balanced: about batch_atoms atoms per step
        fixed = sum(sizes) <= training.batch_atoms
        valid_groups = pack_by_atoms([len(a) for a in valid], training.batch_atoms)
    else:
        fixed = len(train) <= batch_size
        valid_groups = None
    train_batches_fixed = label_batches(train, spec, batch_size, device) if fixed else None
    valid_batches = label_batches(valid, spec, batch_size, device, valid_groups) if valid else []

    optimiser = torch.optim.Adam(parameter_groups(ensemble, training, learning_rate), lr=learning_rate, amsgrad=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _cosine_decay(epochs))
    best = (math.inf, -1, copy.deepcopy(ensemble.state_dict()))
    train_loss = math.nan
    for epoch in range(epochs):
        weights = active if epoch >= nll_start else dataclasses.replace(active, nll=0.0)
        if epoch == nll_start and nll_start > 0:
            best = (math.inf, -1, best[2])  # a loss with the NLL is not comparable with one without
        ensemble.train()
        if train_batches_fixed is not None:
            batches = train_batches_fixed
        elif training.batch_atoms is not None:
            batches = label_batches(train, spec, batch_size, device, pack_by_atoms(sizes, training.batch_atoms, rng))
        else:
            order = rng.permutation(len(train))
            batches = label_batches([train[i] for i in order], spec, batch_size, device)
        replayed = replay_batches(replay, spec, training.replay_frames, len(batches), rng, device)
        total = 0.0
        for step, batch in enumerate(batches):
            optimiser.zero_grad(set_to_none=True)
            total += backward(ensemble, batch, weights)
            if step < len(replayed) and training.replay_weight > 0:
                replay_backward(ensemble, replayed[step], weights, training.replay_weight)
            optimiser.step()
        scheduler.step()
        train_loss = total / len(batches)
        ensemble.eval()
        if valid_batches:
            valid_loss = sum(validation_loss(ensemble, b, weights) for b in valid_batches) / len(valid_batches)
        else:
            valid_loss = train_loss
        if valid_loss < best[0]:
            best = (valid_loss, epoch, copy.deepcopy(ensemble.state_dict()))
        if progress:
            progress(epoch + 1, epochs)
    ensemble.load_state_dict(best[2])
    ensemble.eval()
    if valid:
        ensemble.spec.calibration = calibrate(ensemble, valid)
    ensemble = ensemble.to("cpu")  # files and callers get CPU tensors; they move it where they run
    report = TrainReport(
        epochs=epochs,
        wall_time_s=time.perf_counter() - start,
        train_loss=train_loss,
        valid_loss=best[0],
        best_epoch=best[1],
        from_parent=from_parent,
    )
    return ensemble, report


def fit_dataset(
    frames: Sequence[Atoms],
    model: ModelSettings,
    training: TrainingSettings,
    seed: int = 0,
    progress: Progress | None = None,
    foundation: Foundation | None = None,
    replay: Sequence[Atoms] = (),
) -> tuple[Ensemble, TrainReport, dict[str, float]]:
    """Train a fresh ensemble on labelled ``frames`` outside any campaign (``ionflow train``).

    Frames are split by the campaigns' rule, :func:`ionflow.platform.dataset.split`
    (``training.valid_fraction``); returns the ensemble (weights best on the validation frames),
    its report, and :func:`~ionflow.platform.evaluation.evaluate` on the validation frames
    (``{"n": 0}`` when none are held out). Raises ``ValueError`` naming the frame when
    :func:`~ionflow.platform.dataset.dataset_problem` finds one. ``foundation`` and ``replay``
    as in :func:`train_ensemble`.
    """
    problem = dataset_problem(frames)
    if problem:
        raise ValueError(problem)
    train, valid = split(frames, training.valid_fraction)
    ensemble, report = train_ensemble(
        train, valid, model, training, seed=seed, progress=progress, foundation=foundation, replay=replay
    )
    return ensemble, report, evaluate(ensemble, valid)
