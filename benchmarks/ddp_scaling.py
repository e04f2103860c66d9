"""Data-parallel training on the CPU: one process against two (torchrun, gloo), same model, data and batches.

The same ionflow training run three ways, each launched by ``torchrun --nproc-per-node R`` with
OMP_NUM_THREADS = MKL_NUM_THREADS = T in every process (``torch.set_num_threads(T)`` too):

* 1 rank x 1 thread   (the baseline)
* 2 ranks x 1 thread, data-parallel (each rank evaluates half of every batch, gradients summed)
  and member-parallel (a committee's members split over the ranks, whole batches)
* 1 rank x 2 threads  (torch's own intra-op threads on the same two cores, for comparison)

Data: ``--frames`` water clusters (H2O)4-8 (12-24 atoms; ``training_throughput.water_cluster``),
TIP3P labels (ASE; throughput does not depend on the labels), ionflow's hash split (validation 0.2),
batches of ``--batch-size`` frames. Model: ionflow's ``ModelConfig`` defaults (committee of 3,
equilibrated electrostatics, float64) unless ``--uncertainty``/``--ensemble-size``/``--electrostatics``
say otherwise. An epoch is what the trainer does every epoch (optimiser steps over the training
frames, the validation loss, keeping the best weights); its time is the median of the in-run epochs
2..E (rank 0's progress callback), so start-up, neighbour lists and calibration are left out.
frames/s = training frames / epoch time; speed-up = baseline epoch time / epoch time. As a check,
every configuration must end with the same weights as the baseline (max |difference| is shown;
rounding only, ~1e-12 in float64).

Usage: python benchmarks/ddp_scaling.py [--quick] [--epochs 4] [--frames 160] [--batch-size 16] [--no-write]
A full run (a few minutes on 2 quiet cores) appends its table to benchmarks/RESULTS.md; ``--quick``
(40 frames, 3 epochs) does not: it checks that the launches work, its numbers are start-up noise. The
machine must be otherwise idle: the two ranks need a core each.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
HEADING = "## Data-parallel training (DDP, gloo) on the CPU"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
VALID_FRACTION = 0.2
LEARNING_RATE = 2e-2
SEED = 0
TIP3P_CUTOFF = 9.0  # Å: the whole cluster

#: (name, ranks, threads per rank); the first is the baseline
CONFIGS = [
    ("1 rank x 1 thread", 1, 1, "auto"),
    ("2 ranks x 1 thread, data-parallel", 2, 1, "data"),
    ("2 ranks x 1 thread, member-parallel", 2, 1, "members"),
    ("1 rank x 2 threads", 1, 2, "auto"),
]


def make_frames(n_frames: int, seed: int) -> list:
    """(H2O)4-8 clusters with TIP3P energies and forces as REF_* labels."""
    from ase.calculators.tip3p import TIP3P
    from training_throughput import water_cluster

    from ionflow.platform.structures import labelled_copy, with_charge_state

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n_frames):
        atoms = water_cluster(int(rng.integers(4, 9)), rng)
        atoms.calc = TIP3P(rc=TIP3P_CUTOFF)
        frames.append(with_charge_state(labelled_copy(atoms, atoms.get_potential_energy(), atoms.get_forces()), 0, 1))
    return frames


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: dict, ranks: int, threads: int) -> dict:
    """One training run under torchrun with ``ranks`` processes of ``threads`` threads; rank 0's RESULT."""
    command = [
        TORCHRUN,
        f"--nproc-per-node={ranks}",
        f"--master-port={free_port()}",
        __file__,
        "--worker",
        json.dumps({**job, "threads": threads}),
    ]
    from training_throughput import run_worker

    return run_worker(command, threads, f"torchrun with {ranks} ranks")


def worker(job: dict) -> None:
    """One rank of a run: join the group, train, and (rank 0) save the weights and print RESULT {json}."""
    import torch

    torch.set_num_threads(int(job["threads"]))
    from ase.io import read

    from ionflow.config import ModelConfig, TrainingConfig
    from ionflow.platform.distributed import init_from_env, is_main, shutdown
    from ionflow.platform.training import train_ensemble

    world = init_from_env()
    train, valid = read(job["train"], ":"), read(job["valid"], ":")
    model = ModelConfig(
        uncertainty=job["uncertainty"], ensemble_size=job["k"], electrostatics=job["electrostatics"]
    ).settings()
    training = TrainingConfig(
        epochs=job["epochs"],
        learning_rate=LEARNING_RATE,
        batch_size=job["batch_size"],
        valid_fraction=VALID_FRACTION,
        parallel=job.get("parallel", "auto"),
    ).settings()
    stamps: list[float] = []
    ensemble, report = train_ensemble(
        train, valid, model, training, seed=SEED, device="cpu", progress=lambda *_: stamps.append(time.perf_counter())
    )
    if is_main():
        torch.save(ensemble.state_dict(), job["weights"])
        result = {"ranks": world.size, "threads": torch.get_num_threads(), "epoch_s": list(np.diff(stamps))}
        print("RESULT " + json.dumps(result), flush=True)
    shutdown()


def max_difference(a: str, b: str) -> float:
    import torch

    x, y = torch.load(a), torch.load(b)
    return max(float((x[k] - v).abs().max()) for k, v in y.items() if v.is_floating_point() and v.numel())


def table(rows: list[dict]) -> str:
    lines = [
        "| configuration | s per epoch (median) | frames/s | speed-up | max weight difference to baseline | wall s | load |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['epoch_s']:.2f} | {r['frames_per_s']:.1f} | **{r['speedup']:.2f}x** | "
            f"{r['difference']:.1e} | {r['wall_s']:.1f} | {r['load']:.1f} |"
        )
    return "\n".join(lines)


def write_results(text: str) -> None:
    """Add ``text`` at the end of this benchmark's section of RESULTS.md."""
    from training_throughput import write_results as write_section

    write_section(text, HEADING)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 frames, 3 epochs, no RESULTS.md")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 4, quick 3)")
    parser.add_argument("--frames", type=int, default=None, help="clusters generated (default 160, quick 40)")
    parser.add_argument("--batch-size", type=int, default=16, help="frames per optimiser step (all ranks together)")
    parser.add_argument("--uncertainty", default="committee", choices=["committee", "shallow"])
    parser.add_argument("--ensemble-size", type=int, default=3)
    parser.add_argument("--electrostatics", default="equilibrated")
    parser.add_argument("--no-write", action="store_true", help="do not append the table to RESULTS.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    from ase.io import write

    from ionflow.platform.dataset import split

    epochs = args.epochs or (3 if args.quick else 4)
    n_frames = args.frames or (40 if args.quick else 160)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ionflow_ddp_") as tmp:
        train, valid = split(make_frames(n_frames, SEED), VALID_FRACTION)
        paths = {"train": Path(tmp) / "train.extxyz", "valid": Path(tmp) / "valid.extxyz"}
        write(paths["train"], train, format="extxyz")
        write(paths["valid"], valid, format="extxyz")
        data = (
            f"{len(train)} training frames ({sum(len(a) for a in train)} atoms, (H2O)4-8, TIP3P), {len(valid)} "
            f"validation frames, batches of {args.batch_size}"
        )
        print(data, flush=True)
        job = {
            "train": str(paths["train"]),
            "valid": str(paths["valid"]),
            "uncertainty": args.uncertainty,
            "k": args.ensemble_size,
            "electrostatics": args.electrostatics,
            "epochs": epochs,
            "batch_size": args.batch_size,
        }
        for index, (name, ranks, threads, parallel) in enumerate(CONFIGS):
            weights = str(Path(tmp) / f"weights_{index}.pt")
            load = os.getloadavg()[0]
            run = launch({**job, "weights": weights, "parallel": parallel}, ranks, threads)
            epoch_s = statistics.median(run["epoch_s"][1:] or run["epoch_s"])  # epoch 1 builds the first batches
            rows.append(
                {
                    "name": name,
                    "epoch_s": epoch_s,
                    "frames_per_s": len(train) / epoch_s,
                    "wall_s": run["wall_s"],
                    "load": load,
                    "threads_seen": run["threads"],
                    "difference": max_difference(str(Path(tmp) / "weights_0.pt"), weights),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        row["speedup"] = rows[0]["epoch_s"] / row["epoch_s"]
    text = table(rows)
    print(text)
    import torch
    from training_throughput import cpu_description

    command = "python benchmarks/ddp_scaling.py " + " ".join(sys.argv[1:])
    model = f"{args.uncertainty} K={args.ensemble_size}, {args.electrostatics}, ModelConfig defaults otherwise"
    report = (
        f"Machine: {cpu_description()}; ionflow {version('ionflow')}, torch {torch.__version__}; {model}; {data}; "
        f"{epochs} epochs, median of epochs 2..{epochs}. Command: `{command.strip()}` "
        f"({(time.perf_counter() - started) / 60:.1f} min).\n\n{text}\n"
    )
    print(report)
    if not (args.quick or args.no_write):
        write_results(report)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
