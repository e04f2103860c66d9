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

Data-parallel training (``torchrun --nproc-per-node N``, :mod:`ionflow.platform.distributed`):
when the process group holds N > 1 ranks, every rank gets the same frames and seed, builds the same
batches in the same order, and evaluates its shard of each (a contiguous slice balanced by atoms).
The shard's loss divides by the whole batch's counts (structures, atoms, labelled charges and
dipoles; :class:`~ionflow.platform.loss.LossCounts`), so the gradients summed over the ranks are
those of the whole batch, and every rank takes the same Adam step: the result is the model one
process would train with the same batches, to rounding. A rank whose shard is empty (a batch of
fewer frames than ranks) contributes zero. The validation loss is sharded and summed the same way,
so every rank keeps the same best epoch; a foundation replay batch is evaluated whole by rank 0
(its gradient enters the sum once); the calibration is fitted on rank 0 and broadcast, and every
rank returns the same ensemble. Only rank 0 reports progress.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms

from ionflow.platform.batching import pack_by_atoms
from ionflow.platform.dataset import (
    check_one_level_of_theory,
    dataset_problem,
    fit_atomic_energies,
    label_batches,
    reference_charges,
    reference_dipole,
    reference_forces,
    split,
)
from ionflow.platform.device import DEVICE_VARIABLE
from ionflow.platform.distributed import (
    ALONE,
    MAIN_RANK,
    World,
    all_reduce_gradients,
    broadcast_module,
    broadcast_object,
    check_same_on_all_ranks,
    free_port,
    init_from_env,
    shard,
    shutdown,
    sum_over_ranks,
    world,
)
from ionflow.platform.evaluation import calibrate, evaluate
from ionflow.platform.finetune import from_foundation, parameter_groups, replay_backward, replay_batches
from ionflow.platform.loss import LossCounts, backward, loss_weights, validation_loss
from ionflow.platform.model.ensemble import Ensemble, ModelSpec, build_ensemble
from ionflow.platform.model.files import load_model, save_model
from ionflow.platform.model.foundation import Foundation
from ionflow.platform.model.graph import build_batch
from ionflow.platform.model.kernels import accelerate, restore
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


def _batches_of(n_frames: int, batch_size: int) -> list[list[int]]:
    """Frame indexes ``0 .. n_frames-1`` in order, ``batch_size`` a batch."""
    return [list(range(start, min(start + batch_size, n_frames))) for start in range(0, n_frames, batch_size)]


_Shard = tuple[dict[str, torch.Tensor] | None, LossCounts | None]


def _shards(
    frames: Sequence[Atoms], groups: Sequence[Sequence[int]], spec: ModelSpec, device: torch.device, w: World
) -> list[_Shard]:
    """This rank's part of each batch of ``frames`` (``groups``: frame indexes per batch) with the
    whole batch's loss counts; alone, the whole batches with None (their own counts). A shard
    without frames is None."""
    if w.size == 1:
        return [(batch, None) for batch in label_batches(frames, spec, 0, device, groups)]
    sizes = [len(a) for a in frames]
    charge_atoms = [0 if reference_charges(a) is None else len(a) for a in frames]
    dipoles = [int(reference_dipole(a) is not None) for a in frames]
    mine = [shard(group, sizes, w.rank, w.size) for group in groups]
    built = iter(label_batches(frames, spec, 0, device, [m for m in mine if m]))
    out: list[_Shard] = []
    for group, part in zip(groups, mine):
        counts = LossCounts(
            structures=len(group),
            atoms=sum(sizes[i] for i in group),
            charge_atoms=sum(charge_atoms[i] for i in group),
            dipole_structures=sum(dipoles[i] for i in group),
        )
        out.append((next(built) if part else None, counts))
    return out


def member_parallel(spec: ModelSpec, parallel: str, w: World) -> bool:
    """Whether the ranks of ``w`` split the committee's members (each trains its own on every
    batch, nothing summed per step) rather than each batch (data-parallel): ``training.parallel``
    ``members``, or ``auto`` with a committee of at least as many members as ranks. Raises
    ``ValueError`` when ``members`` cannot apply."""
    if w.size == 1:
        return False
    k = int(spec.settings.ensemble_size)
    if parallel == "members":
        if spec.settings.shallow:
            raise ValueError("training.parallel 'members' needs a committee: a shallow ensemble has one backbone")
        if k < w.size:
            raise ValueError(f"training.parallel 'members': {k} members cannot keep {w.size} ranks busy")
        return True
    return parallel == "auto" and not spec.settings.shallow and k >= w.size


def _own_members(ensemble: Ensemble, w: World) -> Ensemble:
    """A committee of the members rank ``w.rank`` trains (k = rank, rank + size, ...): the same
    modules, so training it trains them in ``ensemble``."""
    own = copy.copy(ensemble)
    own._modules = dict(ensemble._modules)
    own._modules["members"] = torch.nn.ModuleList(
        member for k, member in enumerate(ensemble.members) if k % w.size == w.rank
    )
    return own


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

    In a process group of N > 1 ranks (:func:`~ionflow.platform.distributed.init_from_env`) every
    rank must call this with the same arguments; each trains on its shard of every batch, on its
    own device (``device`` default: the rank's, :class:`~ionflow.platform.distributed.World`), and
    all return the same ensemble and report (module docstring).
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
    w = world()
    check_same_on_all_ranks(
        "the training data and seed", (len(train), len(valid), sum(len(a) for a in train), len(replay), seed)
    )
    device = torch.device(device) if device is not None else w.device
    ensemble = ensemble.to(device)
    broadcast_module(ensemble)  # the ranks start identical whatever built their weights
    # cuEquivariance kernels on a CUDA device that has them, a float32 backbone when asked: both
    # change the backbone's modules (so before the optimiser sees its parameters), restored below
    accelerate(ensemble, device, training.mixed_precision)
    spec = ensemble.spec
    split_members = member_parallel(spec, training.parallel, w)
    # what this rank trains, and on which part of each batch: its own members on whole batches, or
    # every member on its shard of each batch
    own, data_world = (_own_members(ensemble, w), ALONE) if split_members else (ensemble, w)
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
        valid_groups = _batches_of(len(valid), batch_size)
    train_batches_fixed = (
        _shards(train, _batches_of(len(train), batch_size), spec, device, data_world) if fixed else None
    )
    valid_batches = _shards(valid, valid_groups, spec, device, data_world) if valid else []

    optimiser = torch.optim.Adam(parameter_groups(own, training, learning_rate), lr=learning_rate, amsgrad=True)
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
            batches = _shards(train, pack_by_atoms(sizes, training.batch_atoms, rng), spec, device, data_world)
        else:
            order = rng.permutation(len(train)).tolist()
            groups = [[order[i] for i in group] for group in _batches_of(len(train), batch_size)]
            batches = _shards(train, groups, spec, device, data_world)
        replayed = replay_batches(replay, spec, training.replay_frames, len(batches), rng, device)
        total = 0.0
        for step, (batch, counts) in enumerate(batches):
            optimiser.zero_grad(set_to_none=True)
            if batch is not None:  # an empty shard adds nothing but joins the sum of the gradients
                total += backward(own, batch, weights, counts)
            if step < len(replayed) and training.replay_weight > 0 and (split_members or w.rank == MAIN_RANK):
                replay_backward(own, replayed[step], weights, training.replay_weight)  # whole, once per member
            if not split_members:  # members share nothing: their gradients stay on their rank
                all_reduce_gradients(ensemble.parameters())
            optimiser.step()
        scheduler.step()
        (total,) = sum_over_ranks(total)
        train_loss = total / len(batches)
        ensemble.eval()
        if valid_batches:
            shards = sum(validation_loss(own, b, weights, counts) for b, counts in valid_batches if b is not None)
            (valid_loss,) = sum_over_ranks(shards)
            valid_loss /= len(valid_batches)
        else:
            valid_loss = train_loss
        if valid_loss < best[0]:
            best = (valid_loss, epoch, copy.deepcopy(ensemble.state_dict()))
        if progress and w.rank == MAIN_RANK:
            progress(epoch + 1, epochs)
    ensemble.load_state_dict(best[2])
    ensemble.eval()
    if split_members:  # member k from the rank that trained it, to every rank
        for k, member in enumerate(ensemble.members):
            broadcast_module(member, src=k % w.size)
    else:
        broadcast_module(ensemble)  # identical on every rank already; this makes sure of it
    if valid:
        calibration = calibrate(ensemble, valid) if w.rank == MAIN_RANK else None
        ensemble.spec.calibration = broadcast_object(calibration)
    restore(ensemble)  # the e3nn backbone in the model's dtype: the layout model files hold
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


def training_processes(setting: int | str) -> int:
    """How many processes a train step runs: ``setting``, or for ``auto`` one per visible CUDA GPU
    (one with no GPU, or when ``IONFLOW_DEVICE`` names the device). One in a process that already
    belongs to a group (started by ``torchrun``): its ranks are the processes."""
    if world().size > 1:
        return 1
    if setting != "auto":
        return int(setting)
    if os.environ.get(DEVICE_VARIABLE) or not torch.cuda.is_available():
        return 1
    return max(1, torch.cuda.device_count())


def train_in_processes(processes: int, *args: Any, **kwargs: Any) -> tuple[Ensemble, TrainReport]:
    """:func:`train_ensemble` (same arguments, ``progress`` told only at the end) in ``processes``
    processes of this machine joined by :mod:`torch.distributed` (rank r on GPU r where there are
    enough, gloo on the CPU otherwise; 127.0.0.1), as ``torchrun`` would start them; one process:
    :func:`train_ensemble` itself. Returns what rank 0 trained (every rank trains the same)."""
    progress = kwargs.pop("progress", None)
    if processes <= 1:
        return train_ensemble(*args, progress=progress, **kwargs)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="ionflow-train-") as folder:
        mp.spawn(_train_rank, args=(processes, free_port(), folder, args, kwargs), nprocs=processes, join=True)
        ensemble = load_model(Path(folder) / "model.pt")
        report = TrainReport(**json.loads((Path(folder) / "report.json").read_text()))
    if progress:
        progress(report.epochs, report.epochs)
    return ensemble, report


def _train_rank(rank: int, size: int, port: int, folder: str, args: tuple, kwargs: dict) -> None:
    """One process of :func:`train_in_processes`: join the group, train, rank 0 writes the result."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(max(1, torch.get_num_threads() // size))  # the processes share this machine's cores
    init_from_env()
    try:
        ensemble, report = train_ensemble(*args, **kwargs)
        if rank == MAIN_RANK:
            save_model(ensemble, Path(folder) / "model.pt")
            (Path(folder) / "report.json").write_text(json.dumps(dataclasses.asdict(report)))
    finally:
        shutdown()


def fit_dataset(
    frames: Sequence[Atoms],
    model: ModelSettings,
    training: TrainingSettings,
    seed: int = 0,
    progress: Progress | None = None,
    foundation: Foundation | None = None,
    replay: Sequence[Atoms] = (),
    processes: int = 1,
) -> tuple[Ensemble, TrainReport, dict[str, float]]:
    """Train a fresh ensemble on labelled ``frames`` outside any campaign (``ionflow train``).

    Frames are split by the campaigns' rule, :func:`ionflow.platform.dataset.split`
    (``training.valid_fraction``); returns the ensemble (weights best on the validation frames),
    its report, and :func:`~ionflow.platform.evaluation.evaluate` on the validation frames
    (``{"n": 0}`` when none are held out). Raises ``ValueError`` naming the frame when
    :func:`~ionflow.platform.dataset.dataset_problem` finds one. ``foundation`` and ``replay``
    as in :func:`train_ensemble`; ``processes`` > 1 trains in that many processes
    (:func:`train_in_processes`).
    """
    problem = dataset_problem(frames)
    if problem:
        raise ValueError(problem)
    train, valid = split(frames, training.valid_fraction)
    ensemble, report = train_in_processes(
        processes, train, valid, model, training, seed=seed, progress=progress, foundation=foundation, replay=replay
    )
    return ensemble, report, evaluate(ensemble, valid)
