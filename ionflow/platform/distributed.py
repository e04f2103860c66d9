"""Data-parallel training over processes: who this process is, and the few collectives training needs.

``torchrun --nproc-per-node N ...`` starts N processes and tells each its place through the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
:func:`init_from_env` joins them into one process group: NCCL when each rank has a GPU of its own
(rank r on ``cuda:LOCAL_RANK``), gloo on the CPU otherwise. Without ``WORLD_SIZE > 1`` nothing is
initialised and :func:`world` is one process, so the same code runs alone unchanged.

Every rank holds the whole model and the whole dataset and builds the same batches; each rank
evaluates its shard of every batch (:func:`shard`), the gradients are summed over the ranks
(:func:`all_reduce_gradients`) and every rank takes the same optimiser step, so the weights stay
identical on all ranks. Not ``DistributedDataParallel``: its reducer sums only what ``backward()``
accumulates, while a shallow ensemble's NLL reaches its heads through ``torch.autograd.grad``, and
it expects a forward pass on every rank, while a rank whose shard of a small batch is empty runs
none. One explicit sum of the ``.grad`` after the batch covers both.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ionflow.platform.device import DEVICE_VARIABLE, pick_device

T = TypeVar("T")

#: The rank whose values win where ranks must agree (initial weights, calibration).
MAIN_RANK = 0


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int  # 0 .. size-1
    size: int  # processes training together; 1 when alone
    local_rank: int  # rank among the processes of this machine
    rank_device: torch.device | None = None  # where this rank trains; None: pick_device(), asked when needed

    @property
    def device(self) -> torch.device:
        """Where this rank trains: its own device in a group, :func:`pick_device` alone."""
        return self.rank_device if self.rank_device is not None else pick_device()


_current: World | None = None

#: One process: what a rank that trains its own committee members sees of the data (all of it).
ALONE = World(rank=0, size=1, local_rank=0)


def _rank_device(local_rank: int) -> torch.device:
    """``IONFLOW_DEVICE`` when set (a bare ``cuda`` becomes ``cuda:LOCAL_RANK``), else this rank's
    own GPU when the machine has one per local rank, else the CPU."""
    name = os.environ.get(DEVICE_VARIABLE)
    if name:
        device = pick_device()
        return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device
    if torch.cuda.is_available() and torch.cuda.device_count() > local_rank:
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_from_env() -> World:
    """Join the process group that ``torchrun`` (or any launcher setting ``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) describes, once; return :func:`world`.

    NCCL when this rank trains on a GPU, gloo otherwise. With ``WORLD_SIZE`` unset or 1 it
    initialises nothing (one process). Calling it again returns the same world.
    """
    global _current
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (_current is not None and dist.is_initialized()):
        return world()
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={size} but {key} is not set: start the processes with torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    device = _rank_device(local_rank)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != size:
        raise RuntimeError(f"WORLD_SIZE={size} but the process group has {dist.get_world_size()} processes")
    _current = World(rank=dist.get_rank(), size=size, local_rank=local_rank, rank_device=device)
    return _current


def world() -> World:
    """This process's world: the one :func:`init_from_env` joined, one made by the caller's own
    ``init_process_group`` (GPU ``cuda:LOCAL_RANK`` under NCCL), or rank 0 of 1 on :func:`pick_device`."""
    if not (dist.is_available() and dist.is_initialized()):
        return World(rank=0, size=1, local_rank=0)
    if _current is not None:
        return _current
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    device = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, rank_device=device)


def is_main() -> bool:
    """Whether this process is the one that prints, writes files and reports progress."""
    return world().rank == MAIN_RANK


def shutdown() -> None:
    """Leave the process group (when one was joined); :func:`world` is one process again."""
    global _current
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _current = None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process group of this machine's processes."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def shard(indexes: Sequence[int], sizes: Sequence[int], rank: int, size: int) -> list[int]:
    """The contiguous part of ``indexes`` (frames of one batch) that ``rank`` of ``size`` evaluates,
    balanced by atoms (``sizes[i]``: atoms of frame i): a frame goes to the rank whose share of the
    batch's atoms holds the frame's middle atom. Every frame goes to exactly one rank; a rank may get
    none when the batch has fewer frames than there are ranks."""
    if size == 1:
        return list(indexes)
    atoms = [int(sizes[i]) for i in indexes]
    total = sum(atoms)
    mine, before = [], 0
    for i, n in zip(indexes, atoms):
        # (before + n/2) / total * size, in integers: the rank whose share holds the middle atom
        if (2 * before + n) * size // (2 * total) == rank:
            mine.append(i)
        before += n
    return mine


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Sum the parameters' ``.grad`` over the ranks, in place; nothing with one process.

    A parameter that got a gradient on some rank but not on this one (its shard was empty, or did
    not reach it) joins with zeros; one that got none on any rank keeps ``grad = None``, as it
    would in one process, so that Adam leaves it alone there too. One collective per dtype: every
    gradient and the has-a-gradient flags in one flat buffer.
    """
    w = world()
    if w.size == 1:
        return
    buckets: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in parameters:
        if p.requires_grad:
            buckets.setdefault(p.dtype, []).append(p)
    for params in buckets.values():
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flags = torch.tensor([p.grad is not None for p in params], dtype=params[0].dtype, device=grads[0].device)
        flat = torch.cat([*(g.reshape(-1) for g in grads), flags])
        dist.all_reduce(flat)
        offset = 0
        for p, g, flag in zip(params, grads, flat[-len(params) :].tolist()):
            if flag > 0:
                p.grad = g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """The sums of ``values`` over the ranks (float64; the same on every rank); ``values`` alone with one process."""
    w = world()
    if w.size == 1:
        return tuple(float(v) for v in values)
    tensor = torch.tensor(values, dtype=torch.float64, device=w.device)
    dist.all_reduce(tensor)
    return tuple(tensor.tolist())


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = MAIN_RANK) -> None:
    """Overwrite the parameters and buffers of ``module`` on every rank with those of rank ``src``."""
    if world().size == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=src)


def broadcast_object(value: T) -> T:
    """The main rank's ``value`` (any picklable object), on every rank."""
    if world().size == 1:
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=MAIN_RANK)
    return box[0]


def check_same_on_all_ranks(what: str, value: Any) -> None:
    """Raise ``RuntimeError`` naming ``what`` when the ranks hold different ``value`` (picklable,
    comparable): they would train on different data and their weights would drift apart."""
    if world().size == 1:
        return
    values: list[Any] = [None] * world().size
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise RuntimeError(f"the ranks disagree on {what}: {values}; every rank must be given the same")
