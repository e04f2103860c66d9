"""Training over N ranks on gloo trains the model one process trains on the same batches:
data-parallel (every rank a shard of each batch) and member-parallel (every rank its own members).

Two processes on the CPU (gloo, 127.0.0.1) train a committee (fixed batches of frames, charges and
dipoles in the loss, a last batch of one frame so that one rank's shard is empty) and a shallow
ensemble (size-balanced batches, NLL on after the first epoch) on GFN2-xTB labels of H3O+, H2O and
OH-, float64; the weights, calibration and best epoch must match a run in this process. They match
only because each shard divides by the whole batch's counts: with its own counts a shard of 2 frames
would weigh its structures 1/2 where the whole batch of 4 weighs them 1/4
(:func:`test_shard_losses_sum_to_the_batch_loss_only_with_its_counts` checks that directly).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from ase import Atoms

from ionflow.config import ModelConfig, TrainingConfig
from ionflow.dft_adapters import get_adapter
from ionflow.platform.dataset import label_batches
from ionflow.platform.distributed import shard
from ionflow.platform.loss import LossWeights, batch_counts, batch_loss
from ionflow.platform.model.ensemble import build_ensemble
from ionflow.platform.structures import labelled_copy, rattled
from ionflow.platform.training import new_spec, train_ensemble
from tests.structures import hydronium, hydroxyl, water

RANKS = 2
#: Float64 weights after a few Adam steps agree to rounding: the shards' gradients are summed in
#: another order than one process sums the batch's.
TOLERANCE = 1e-10
TINY = dict(hidden_irreps="8x0e+8x1o", mlp_irreps="8x0e", num_interactions=2, dtype="float64")


@pytest.fixture(scope="module")
def frames() -> list[Atoms]:
    """13 rattled molecules of 4, 3 and 2 atoms with GFN2-xTB labels; every third frame without
    REF_charges and every fourth without REF_dipole, so that the masked means count."""
    molecules = [
        *rattled(hydronium(), n=5, stdev=0.08, seed=1),
        *rattled(water(), n=5, stdev=0.08, seed=2),
        *rattled(hydroxyl(-1, 1), n=3, stdev=0.05, seed=3),
    ]
    results = get_adapter("tblite").label(molecules)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    order = np.random.default_rng(0).permutation(len(molecules))  # mixed sizes in every batch
    out = []
    for k, i in enumerate(order):
        r = results[i]
        charges = None if k % 3 == 0 else r.charges
        dipole = None if k % 4 == 0 else r.dipole
        out.append(labelled_copy(molecules[i], r.energy, r.forces, charges=charges, dipole=dipole))
    return out


def jobs(frames: list[Atoms]) -> dict[str, tuple]:
    """name -> train_ensemble's (train, valid, model, training, seed)."""
    train, valid = frames[:9], frames[9:]
    committee = ModelConfig(ensemble_size=2, electrostatics="equilibrated", **TINY).settings()
    three = ModelConfig(ensemble_size=3, electrostatics="equilibrated", **TINY).settings()
    shallow = ModelConfig(uncertainty="shallow", ensemble_size=3, electrostatics="none", **TINY).settings()
    common = dict(learning_rate=1e-2, energy_weight=10.0, forces_weight=1.0, charges_weight=1.0, dipole_weight=10.0)
    # 9 frames in batches of 4: 4, 4, 1, reshuffled every epoch; the batch of 1 leaves a rank empty
    by_frames = TrainingConfig(epochs=3, batch_size=4, parallel="data", **common).settings()
    # batches of at most 9 atoms (2-4 frames), repacked every epoch; the NLL joins at epoch 1
    by_atoms = TrainingConfig(epochs=4, batch_size=4, batch_atoms=9, nll_weight=1.0, **common).settings()
    # auto: 3 members on 2 ranks, members 0 and 2 on rank 0, member 1 on rank 1, whole batches
    by_member = TrainingConfig(epochs=3, batch_size=4, **common).settings()
    return {
        "committee": (train, valid, committee, by_frames, 5),
        "shallow": (train, valid, shallow, by_atoms, 6),
        "members": (train, valid, three, by_member, 7),
    }


def _rank(rank: int, port: int, work: dict[str, tuple], folder: str) -> None:
    """One rank of a torchrun-like launch: join the group, train every job, save what it got."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(RANKS),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        IONFLOW_DEVICE="cpu",
    )
    torch.set_num_threads(1)
    from ionflow.platform.distributed import init_from_env, shutdown

    world = init_from_env()
    assert (world.rank, world.size, world.device.type) == (rank, RANKS, "cpu")
    for name, (train, valid, model, training, seed) in work.items():
        ensemble, report = train_ensemble(train, valid, model, training, seed=seed)
        torch.save(
            {"state": ensemble.state_dict(), "calibration": ensemble.spec.calibration, "report": report},
            Path(folder) / f"{name}_{rank}.pt",
        )
    shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_train_the_model_one_process_trains(frames, tmp_path):
    work = jobs(frames)
    mp.spawn(_rank, args=(_free_port(), work, str(tmp_path)), nprocs=RANKS, join=True)
    for name, (train, valid, model, training, seed) in work.items():
        alone, report = train_ensemble(train, valid, model, training, seed=seed, device="cpu")
        ranks = [torch.load(tmp_path / f"{name}_{r}.pt", weights_only=False) for r in range(RANKS)]
        for key, value in ranks[0]["state"].items():
            assert torch.equal(value, ranks[1]["state"][key]), f"{name}: ranks differ in {key}"
        assert ranks[0]["calibration"] == ranks[1]["calibration"]
        assert ranks[0]["report"].best_epoch == ranks[1]["report"].best_epoch == report.best_epoch, name
        assert ranks[0]["report"].valid_loss == pytest.approx(report.valid_loss, rel=1e-9)
        assert ranks[0]["report"].train_loss == pytest.approx(report.train_loss, rel=1e-9)
        for key, value in alone.state_dict().items():
            torch.testing.assert_close(ranks[0]["state"][key], value, rtol=0, atol=TOLERANCE, msg=f"{name}: {key}")
        for kind, factor in alone.spec.calibration.items():
            assert ranks[0]["calibration"][kind] == pytest.approx(factor, rel=1e-9), (name, kind)
        # the comparison is not between two untrained models
        start = build_ensemble(new_spec(train, model, seed)).state_dict()
        trained = alone.state_dict()
        moved = max(
            float((trained[k] - v).abs().max()) for k, v in start.items() if v.is_floating_point() and v.numel()
        )
        assert moved > 1e3 * TOLERANCE, f"{name}: training hardly moved the weights ({moved})"


def _loss_and_grads(ensemble, batch, weights, counts=None) -> tuple[float, list[torch.Tensor]]:
    """The batch's loss, NLL included, and its gradient with respect to every parameter (0 where unused)."""
    loss, nll = batch_loss(ensemble, batch, weights, training=True, counts=counts)
    total = loss + (0.0 if nll is None else nll)
    grads = torch.autograd.grad(total, list(ensemble.parameters()), allow_unused=True)
    return float(total), [torch.zeros(()) if g is None else g for g in grads]


def test_shard_losses_sum_to_the_batch_loss_only_with_its_counts(frames):
    """A batch of 5 frames split 3 + 2 (committee with charges and dipoles; shallow with its NLL):
    with the batch's counts the shards' losses and gradients sum to the batch's; with their own not."""
    batch_frames = frames[:5]
    parts = [[0, 1, 2], [3, 4]]
    weights = LossWeights(energy=10.0, forces=1.0, charges=1.0, dipole=10.0, nll=1.0)
    for model in (
        ModelConfig(ensemble_size=2, electrostatics="equilibrated", **TINY).settings(),
        ModelConfig(uncertainty="shallow", ensemble_size=3, electrostatics="none", **TINY).settings(),
    ):
        ensemble = build_ensemble(new_spec(batch_frames, model, seed=2))
        whole = label_batches(batch_frames, ensemble.spec, 5)[0]
        shards = label_batches(batch_frames, ensemble.spec, 0, groups=parts)
        counts = batch_counts(whole)
        assert counts.charge_atoms < counts.atoms and counts.dipole_structures < counts.structures  # masks at work
        expected, expected_grads = _loss_and_grads(ensemble, whole, weights)
        summed = [_loss_and_grads(ensemble, b, weights, counts) for b in shards]
        assert sum(loss for loss, _ in summed) == pytest.approx(expected, rel=1e-12)
        for k, g in enumerate(expected_grads):
            torch.testing.assert_close(summed[0][1][k] + summed[1][1][k], g, rtol=1e-10, atol=1e-12)
        own = sum(_loss_and_grads(ensemble, b, weights)[0] for b in shards)
        assert abs(own - expected) > 1e-3 * abs(expected), "own counts should not give the batch's loss"


def test_shards_split_a_batch_by_atoms():
    sizes = [4, 3, 2, 4, 3, 2, 4]
    batch = [6, 0, 2, 5, 1]  # 4 + 4 + 2 + 2 + 3 = 15 atoms
    parts = [shard(batch, sizes, rank, 2) for rank in range(2)]
    assert parts == [[6, 0], [2, 5, 1]]  # contiguous, every frame once; 8 and 7 atoms
    assert shard(batch, sizes, 0, 1) == batch
    three = [shard(batch, sizes, rank, 3) for rank in range(3)]
    assert sum(three, []) == batch
    assert [sum(sizes[i] for i in part) for part in three] == [4, 6, 5]
    assert [shard([3], sizes, rank, 2) for rank in range(2)] == [[], [3]]  # one frame, two ranks


def test_alone_there_is_one_rank_and_a_half_set_environment_is_refused(monkeypatch):
    from ionflow.platform.distributed import init_from_env, is_main, world

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env().size == world().size == 1 and is_main()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set: start the processes with torchrun"):
        init_from_env()
    assert world().size == 1


def test_which_ranks_split_members_and_which_split_batches(frames):
    from ionflow.platform.distributed import World
    from ionflow.platform.training import member_parallel

    def spec(kind: str, k: int):
        hyper = ModelConfig(uncertainty=kind, ensemble_size=k, **TINY).hyper()
        return new_spec(frames[:3], ModelConfig(**hyper).settings(), 0)

    two = World(rank=0, size=2, local_rank=0)
    assert member_parallel(spec("committee", 3), "auto", two)
    assert not member_parallel(spec("committee", 3), "data", two)
    assert not member_parallel(spec("committee", 3), "auto", World(rank=0, size=4, local_rank=0))
    assert not member_parallel(spec("shallow", 4), "auto", two)
    assert not member_parallel(spec("committee", 3), "members", World(rank=0, size=1, local_rank=0))
    with pytest.raises(ValueError, match="needs a committee"):
        member_parallel(spec("shallow", 4), "members", two)
    with pytest.raises(ValueError, match="2 members cannot keep 4 ranks busy"):
        member_parallel(spec("committee", 2), "members", World(rank=0, size=4, local_rank=0))


def test_ionflow_train_under_torchrun_writes_the_model_one_process_writes(frames, tmp_path):
    """``torchrun --nproc-per-node 2 -m ionflow.cli train`` and ``ionflow train --processes 2``: one
    model file, written by rank 0, equal to what ``ionflow train`` writes alone."""
    import subprocess
    import sys

    import yaml
    from ase.io import write

    from ionflow.platform.model import load_model

    data = tmp_path / "data.extxyz"
    write(str(data), frames, format="extxyz")
    config = tmp_path / "model.yaml"
    config.write_text(yaml.safe_dump({"model": {**TINY, "ensemble_size": 2}, "training": {"batch_size": 4}}))
    common = ["train", str(data), "--config", str(config), "--epochs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IONFLOW_DEVICE": "cpu"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(RANKS)]
    launch += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    done = subprocess.run(
        [*launch, "-m", "ionflow.cli", *common, "-o", str(tmp_path / "ddp.pt")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved") == 1, done.stdout  # rank 0 alone writes and prints
    for name, extra in (("alone", []), ("spawned", ["--processes", "2"])):  # --processes: no torchrun needed
        done = subprocess.run(
            [sys.executable, "-m", "ionflow.cli", *common, *extra, "-o", str(tmp_path / f"{name}.pt")],
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    one = load_model(tmp_path / "alone.pt").state_dict()
    for name in ("ddp", "spawned"):
        other = load_model(tmp_path / f"{name}.pt").state_dict()
        for key, value in one.items():
            torch.testing.assert_close(other[key], value, rtol=0, atol=TOLERANCE, msg=f"{name}: {key}")
    from typer.testing import CliRunner

    from ionflow.cli import app

    refused = CliRunner().invoke(app, [*common, "--processes", "two", "-o", str(tmp_path / "no.pt")])
    assert refused.exit_code == 2 and "--processes 'two'" in refused.output


def test_a_train_step_in_two_processes_returns_the_model_one_process_trains(frames):
    """What the campaign's train step runs with execution.train_processes: 2 (the gpu pool: one
    process per GPU): the processes start themselves, and rank 0's model comes back."""
    from ionflow.platform.training import train_in_processes, training_processes

    train, valid, model, training, seed = jobs(frames)["members"]
    told = []
    together, report = train_in_processes(
        2, train, valid, model, training, seed=seed, device="cpu", progress=lambda done, total: told.append(done)
    )
    alone, alone_report = train_ensemble(train, valid, model, training, seed=seed, device="cpu")
    assert told == [training.epochs] and report.best_epoch == alone_report.best_epoch
    for key, value in alone.state_dict().items():
        torch.testing.assert_close(together.state_dict()[key], value, rtol=0, atol=TOLERANCE, msg=key)
    assert together.spec.calibration == pytest.approx(alone.spec.calibration, rel=1e-9)
    assert training_processes(3) == 3 and training_processes("auto") == (
        torch.cuda.device_count() if torch.cuda.is_available() and not os.environ.get("IONFLOW_DEVICE") else 1
    )
