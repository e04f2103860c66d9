"""Training throughput: ionflow's trainer against mace-torch's ``mace_run_train``, same data and model.

Both train the same MACE backbone: ionflow's ``ModelConfig`` defaults (r_max 4 Å, 2 interactions,
16x0e+16x1o, MLP 16x0e, max_ell 2, correlation 2, 8 Bessel functions, envelope order 5, float64),
with what ionflow's backbone takes from mace's defaults made explicit for ``mace_run_train``
(``--model MACE``: RealAgnosticInteractionBlock first, then RealAgnosticResidualInteractionBlock,
radial MLP [64, 64, 64], silu gate, reduced CG basis). Same frames on each side: ionflow's hash split
(validation fraction 0.2), the training side cut to a multiple of the batch size (``mace_run_train``
drops an incomplete last batch) and written to train/valid extxyz files (``REF_energy``,
``REF_forces``) that both read. Same batch size, learning rate (2e-2, Adam with AMSGrad), loss weights
(energy per atom 1, forces 1), E0s (ionflow's least-squares fit, passed as ``--E0s``), CPU, and threads:
every run is a fresh process with OMP_NUM_THREADS = MKL_NUM_THREADS = ``--threads`` (ionflow's also
calls ``torch.set_num_threads``); the threads torch sees in each process are recorded. mace keeps its
other defaults (gradient clipping at 10, ReduceLROnPlateau, no EMA/SWA); no plots.

Per-epoch time by difference: each trainer runs E and 2E epochs in two fresh processes, and
(wall(2E) - wall(E)) / E is one epoch with everything that happens once per run removed (interpreter
start, imports, reading the data, statistics, neighbour lists built once, model building, mace's final
evaluation and model saving, ionflow's calibration). An epoch is what each trainer does every epoch:
the optimiser steps over the training frames, the loss on the validation frames, and keeping the best
weights (mace: a checkpoint written to disk when validation improves; ionflow: a deepcopy of the state
dict). As a check, the median in-run epoch of the 2E run (epochs 2..2E; ionflow's progress callback,
the time stamps of mace's per-epoch log lines) is shown too.

Datasets: ``clusters``: 200 (H2O)n, n = 4..8 (12-24 atoms), random non-overlapping placement,
rattled, GFN2-xTB labels (tblite), batches of 32 frames (ionflow's default). ``box``: 24 periodic cubes
of 27 H2O (81 atoms, 9.3 Å, liquid density), rattled, TIP3P labels (ASE; GFN2-xTB takes ~15 s per box
on 2 cores), batches of 4 frames. Throughput does not depend on the labels.

Rows: ``mace_run_train`` trains one model. ionflow trains an ensemble: a committee of K = 2 members
(two backbones; "per model" = throughput x 2) and a shallow ensemble of K = 3 heads on one backbone
("per model" = its throughput), each with ``electrostatics: none`` (MACE + the small state head) and
``equilibrated`` (the default: + charge head, Fukui equilibration, Coulomb energy). Ratio = ionflow's
frames/s per model / mace's frames/s (> 1: ionflow faster).

Usage: python benchmarks/training_throughput.py [--quick] [--threads 2] [--epochs 2] [--data DIR] [--no-write]
A full run (~12 min on 2 quiet cores) appends its table to benchmarks/RESULTS.md; ``--quick`` (48 clusters,
or also 10 boxes with ``--datasets clusters box``; 1 and 2 epochs; mace and the K=2 equilibrated committee
only; ~1.5 min) does not: it checks that both trainers run, its numbers are startup noise. ``--data
DIR`` keeps the labelled frames between runs. ``--profile ROW`` cProfiles one ionflow run (a row 1-5
above) in-process instead. The machine must be otherwise idle: on a loaded VM, 2-thread runs stall
for tens of seconds and the difference method gives nonsense (the load column says how busy it was).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
HEADING = "## Training throughput: ionflow vs mace_run_train"
MACE_RUN_TRAIN = str(Path(sys.executable).parent / "mace_run_train")

WATER = np.array([[0.0, 0.0, 0.0], [0.7572, 0.5865, 0.0], [-0.7572, 0.5865, 0.0]])  # O, H, H (Å)
RATTLE = 0.05  # Å
SPACING = 3.1  # Å per molecule in the periodic box: liquid water
VALID_FRACTION = 0.2
LEARNING_RATE = 2e-2
SEED = 0

#: (name, uncertainty, K, electrostatics, NLL weight or None for the default); None: mace_run_train
TRAINERS = [
    ("mace_run_train, MACE (one model)", None, 1, None, None),
    ("ionflow committee K=2, none", "committee", 2, "none", None),
    ("ionflow committee K=2, equilibrated", "committee", 2, "equilibrated", None),
    ("ionflow shallow K=3, none", "shallow", 3, "none", None),
    ("ionflow shallow K=3, equilibrated", "shallow", 3, "equilibrated", None),
    # the same work as mace_run_train's (squared errors of one model): the trainer itself, no NLL
    ("ionflow shallow K=3, none, NLL off", "shallow", 3, "none", 0.0),
]


# --- data ----------------------------------------------------------------------------------------


def _rotated_water(rng: np.random.Generator) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.random(random_state=int(rng.integers(1 << 31))).apply(WATER - WATER.mean(0))


def water_cluster(n: int, rng: np.random.Generator):
    """(H2O)n in a sphere of ~1.2x liquid volume, no two atoms of different molecules within 1.7 Å."""
    from ase import Atoms

    radius = 1.2 * (n * 30.0 * 3 / (4 * np.pi)) ** (1 / 3)
    molecules: list[np.ndarray] = []
    while len(molecules) < n:
        centre = rng.uniform(-radius, radius, 3)
        molecule = _rotated_water(rng) + centre
        if np.linalg.norm(centre) <= radius and all(
            np.linalg.norm(molecule[:, None] - other[None], axis=-1).min() > 1.7 for other in molecules
        ):
            molecules.append(molecule)
    atoms = Atoms("OHH" * n, positions=np.concatenate(molecules))
    atoms.positions += rng.normal(0.0, RATTLE, atoms.positions.shape)
    return atoms


def water_box(rng: np.random.Generator, shape: tuple[int, int, int] = (3, 3, 3)):
    """Periodic cube of randomly oriented H2O on a jittered 3.1 Å grid (minimum image clash check)."""
    from ase import Atoms

    box = np.array(shape) * SPACING
    sites = (np.stack(np.meshgrid(*[np.arange(k) for k in shape], indexing="ij"), -1).reshape(-1, 3) + 0.5) * SPACING
    placed: list[np.ndarray] = []
    for centre in sites + rng.normal(0.0, 0.1, sites.shape):
        others = np.concatenate(placed) if placed else np.zeros((0, 3))
        for _ in range(200):
            molecule = _rotated_water(rng) + centre
            d = molecule[:, None] - others[None]
            d -= np.round(d / box) * box
            if len(others) == 0 or np.sqrt((d**2).sum(-1)).min() > 1.7:
                break
        placed.append(molecule)
    atoms = Atoms("OHH" * len(sites), positions=np.concatenate(placed), cell=np.diag(box), pbc=True)
    atoms.positions += rng.normal(0.0, RATTLE, atoms.positions.shape)
    return atoms


def make_dataset(kind: str, n_frames: int, seed: int) -> list:
    """Labelled frames: ``clusters`` with GFN2-xTB (tblite), ``box`` with TIP3P."""
    from ionflow.platform.structures import labelled_copy, with_charge_state

    rng = np.random.default_rng(seed)
    frames = []
    while len(frames) < n_frames:
        if kind == "clusters":
            from tblite.ase import TBLite

            atoms = water_cluster(int(rng.integers(4, 9)), rng)
            atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
        else:
            from ase.calculators.tip3p import TIP3P

            atoms = water_box(rng)
            atoms.calc = TIP3P(rc=4.5)
        try:
            energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        except Exception:  # an SCF that does not converge: draw another frame
            continue
        frames.append(with_charge_state(labelled_copy(atoms, energy, forces), 0, 1))
    return frames


@dataclass
class Dataset:
    name: str
    description: str
    batch_size: int
    train_path: Path
    valid_path: Path
    n_train: int
    n_valid: int
    train_atoms: int
    valid_atoms: int
    e0s: dict[int, float]
    label_s: float

    @property
    def steps(self) -> int:
        return self.n_train // self.batch_size


def prepare(kind: str, n_frames: int, batch_size: int, folder: Path, cache: Path | None = None) -> Dataset:
    """Generate and label the frames (or read them from ``cache``, ``--data``, where a run left them),
    split them by ionflow's rule and write the train/valid files both trainers read into ``folder``."""
    from ase.io import read, write

    from ionflow.platform.dataset import fit_atomic_energies, split

    labelled = (cache or folder) / f"{kind}_{n_frames}.extxyz"
    label_s = math.nan
    if not labelled.exists():
        t0 = time.perf_counter()
        frames = make_dataset(kind, n_frames, seed=SEED + (0 if kind == "clusters" else 1))
        label_s = time.perf_counter() - t0
        labelled.parent.mkdir(parents=True, exist_ok=True)
        write(labelled, frames, format="extxyz")
    frames = read(labelled, ":")  # split after the round trip, so that a cached run splits alike
    train, valid = split(frames, VALID_FRACTION)
    train = train[: len(train) // batch_size * batch_size]  # mace_run_train drops an incomplete last batch
    train_path, valid_path = folder / f"{kind}_train.extxyz", folder / f"{kind}_valid.extxyz"
    write(train_path, train, format="extxyz")
    write(valid_path, valid, format="extxyz")
    z_table = sorted({int(z) for a in train for z in a.numbers})
    e0 = fit_atomic_energies(train, z_table)
    sizes = sorted({len(a) for a in [*train, *valid]})
    description = (
        f"(H2O)4-8, {sizes[0]}-{sizes[-1]} atoms, GFN2-xTB"
        if kind == "clusters"
        else f"periodic 27 H2O, {sizes[0]} atoms, 9.3 Å cube, TIP3P"
    )
    return Dataset(
        name=kind,
        description=description,
        batch_size=batch_size,
        train_path=train_path,
        valid_path=valid_path,
        n_train=len(train),
        n_valid=len(valid),
        train_atoms=sum(len(a) for a in train),
        valid_atoms=sum(len(a) for a in valid),
        e0s={z: float(e) for z, e in zip(z_table, e0)},
        label_s=label_s,
    )


# --- the two trainers ----------------------------------------------------------------------------


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    return env


def mace_command(data: Dataset, epochs: int, work: Path) -> list[str]:
    from ionflow.config import ModelConfig

    m = ModelConfig().settings()
    return [
        MACE_RUN_TRAIN,
        "--name=bench",
        f"--work_dir={work}",
        f"--seed={SEED}",
        "--device=cpu",
        f"--default_dtype={m.dtype}",
        "--model=MACE",
        f"--r_max={m.r_max}",
        f"--num_interactions={m.num_interactions}",
        f"--hidden_irreps={m.hidden_irreps}",
        f"--MLP_irreps={m.mlp_irreps}",
        f"--max_ell={m.max_ell}",
        f"--correlation={m.correlation}",
        f"--num_radial_basis={m.num_bessel}",
        f"--num_cutoff_basis={m.num_polynomial_cutoff}",
        "--interaction_first=RealAgnosticInteractionBlock",
        "--interaction=RealAgnosticResidualInteractionBlock",
        "--radial_MLP=[64, 64, 64]",
        "--gate=silu",
        "--use_reduced_cg=True",  # MACE's module default, which ionflow's backbone gets
        f"--train_file={data.train_path}",
        f"--valid_file={data.valid_path}",
        "--energy_key=REF_energy",
        "--forces_key=REF_forces",
        f"--E0s={data.e0s}",
        "--loss=weighted",
        "--energy_weight=1.0",
        "--forces_weight=1.0",
        f"--batch_size={data.batch_size}",
        f"--valid_batch_size={data.batch_size}",
        f"--lr={LEARNING_RATE}",
        f"--max_num_epochs={epochs}",
        "--eval_interval=1",
        "--plot=False",
        "--num_workers=0",
        "--pin_memory=False",
    ]


_MACE_EPOCH = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) INFO: Epoch (\d+):", re.MULTILINE)


def run_mace(data: Dataset, epochs: int, threads: int) -> dict:
    import torch

    with tempfile.TemporaryDirectory(prefix="mace_bench_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        proc = subprocess.run(mace_command(data, epochs, work), env=thread_env(threads), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"mace_run_train failed:\n{proc.stderr[-3000:]}")
        log = "\n".join(p.read_text() for p in sorted((work / "logs").glob("*.log")) if "debug" not in p.name)
        stamps = [datetime.strptime(s, "%Y-%m-%d %H:%M:%S.%f").timestamp() for s, _ in _MACE_EPOCH.findall(log)]
        model = torch.load(work / "bench.model", map_location="cpu", weights_only=False)
        params = sum(p.numel() for p in model.parameters())
    return {"wall_s": wall, "epoch_s": list(np.diff(stamps)), "epochs_logged": len(stamps), "params_per_model": params}


def ionflow_job(
    data: Dataset, epochs: int, threads: int, uncertainty: str, k: int, electrostatics: str, nll: float | None
) -> dict:
    """What :func:`worker` trains: the data's files, the model kind and the training length."""
    return {
        "train": str(data.train_path),
        "valid": str(data.valid_path),
        "uncertainty": uncertainty,
        "k": k,
        "electrostatics": electrostatics,
        "nll": nll,
        "epochs": epochs,
        "batch_size": data.batch_size,
        "threads": threads,
    }


def run_ionflow(
    data: Dataset, epochs: int, threads: int, uncertainty: str, k: int, electrostatics: str, nll: float | None
) -> dict:
    job = ionflow_job(data, epochs, threads, uncertainty, k, electrostatics, nll)
    return run_worker([sys.executable, __file__, "--worker", json.dumps(job)], threads, "ionflow worker")


def run_worker(command: list[str], threads: int, what: str) -> dict:
    """Run a worker process (``threads`` threads); its wall time and the JSON of its last ``RESULT`` line."""
    t0 = time.perf_counter()
    proc = subprocess.run(command, env=thread_env(threads), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {"wall_s": wall, **json.loads(lines[-1][len("RESULT ") :])}


def worker(job: dict) -> None:
    """One ionflow training run in this (fresh) process; prints RESULT {json}."""
    import torch

    torch.set_num_threads(int(job["threads"]))
    from ase.io import read

    from ionflow.config import ModelConfig, TrainingConfig
    from ionflow.platform.training import train_ensemble

    train, valid = read(job["train"], ":"), read(job["valid"], ":")
    model = ModelConfig(
        uncertainty=job["uncertainty"], ensemble_size=job["k"], electrostatics=job["electrostatics"]
    ).settings()
    training = TrainingConfig(
        epochs=job["epochs"],
        learning_rate=LEARNING_RATE,
        batch_size=job["batch_size"],
        energy_weight=1.0,
        forces_weight=1.0,
        valid_fraction=VALID_FRACTION,
        **({} if job.get("nll") is None else {"nll_weight": job["nll"]}),
    ).settings()
    stamps: list[float] = []
    t0 = time.perf_counter()
    ensemble, report = train_ensemble(
        train, valid, model, training, seed=SEED, device="cpu", progress=lambda *_: stamps.append(time.perf_counter())
    )
    train_s = time.perf_counter() - t0
    backbone = sum(p.numel() for p in ensemble.first_member.backbone.parameters())
    members = job["k"] if job["uncertainty"] == "committee" else 1
    result = {
        "train_call_s": train_s,
        "epoch_s": list(np.diff(stamps)),
        "threads": torch.get_num_threads(),
        "params_per_model": sum(p.numel() for p in ensemble.parameters()) // members,
        "backbone_params": backbone,
    }
    print("RESULT " + json.dumps(result), flush=True)


# --- the benchmark -------------------------------------------------------------------------------


def torch_threads_in_fresh_process(threads: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        env=thread_env(threads),
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


def measure(data: Dataset, trainers: list, epochs: int, threads: int) -> list[dict]:
    rows = []
    for name, uncertainty, k, electrostatics, nll in trainers:
        runs = {}
        for n in (epochs, 2 * epochs):
            load = os.getloadavg()[0]
            if uncertainty is None:
                runs[n] = run_mace(data, n, threads)
            else:
                runs[n] = run_ionflow(data, n, threads, uncertainty, k, electrostatics, nll)
            runs[n]["load"] = load
            print(
                f"  {data.name:8s} {name:40s} {n:3d} epochs: {runs[n]['wall_s']:7.1f} s (load {load:.1f})", flush=True
            )
        epoch_s = (runs[2 * epochs]["wall_s"] - runs[epochs]["wall_s"]) / epochs
        in_run = runs[2 * epochs]["epoch_s"]
        members = k if uncertainty == "committee" else 1
        rows.append(
            {
                "dataset": data.name,
                "trainer": name,
                "members": members,
                "epoch_s": epoch_s,
                "epoch_s_in_run": statistics.median(in_run) if in_run else math.nan,
                "frames_per_s": data.n_train / epoch_s,
                "atoms_per_s": data.train_atoms / epoch_s,
                "steps_per_s": data.steps / epoch_s,
                "frames_per_s_per_model": members * data.n_train / epoch_s,
                "params_per_model": runs[2 * epochs]["params_per_model"],
                "backbone_params": runs[2 * epochs].get("backbone_params"),
                "wall_s": [round(runs[n]["wall_s"], 2) for n in (epochs, 2 * epochs)],
                "max_load": max(runs[n]["load"] for n in runs),
                "threads": runs[2 * epochs].get("threads"),
            }
        )
    mace = next((r for r in rows if r["trainer"].startswith("mace")), None)
    for row in rows:
        row["ratio"] = row["frames_per_s_per_model"] / mace["frames_per_s_per_model"] if mace else math.nan
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| dataset | trainer | params per model | s per epoch (difference) | s per epoch (in-run median) "
        "| frames/s | atoms/s | steps/s | frames/s per model | ratio ionflow / mace | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        # the two estimates of one epoch disagree by more than 30 %: a stall during one of the runs
        noisy = " †" if not abs(r["epoch_s"] - r["epoch_s_in_run"]) <= 0.3 * r["epoch_s_in_run"] else ""
        lines.append(
            f"| {r['dataset']} | {r['trainer']} | {r['params_per_model']} | {r['epoch_s']:.2f}{noisy} | "
            f"{r['epoch_s_in_run']:.2f} | {r['frames_per_s']:.1f} | {r['atoms_per_s']:.0f} | {r['steps_per_s']:.2f} | "
            f"{r['frames_per_s_per_model']:.1f} | **{r['ratio']:.2f}x** | {r['max_load']:.1f} |"
        )
    if any(abs(r["epoch_s"] - r["epoch_s_in_run"]) > 0.3 * r["epoch_s_in_run"] for r in rows):
        lines.append("\n† difference and in-run median disagree by more than 30 %: one of the two runs was disturbed.")
    return "\n".join(lines)


def source_state() -> str:
    """The commit measured, and whether ionflow/ had uncommitted changes."""
    git = ["git", "-C", str(HERE.parent)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "ionflow"], capture_output=True, text=True).stdout.strip()
    return f"commit {head or 'unknown'}" + (" with uncommitted changes in ionflow/" if dirty else "")


def cpu_description() -> str:
    """The CPU's model name (lscpu) and core count."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", lscpu)
    return f"{model.group(1).strip() if model else 'unknown CPU'}, {os.cpu_count()} cores"


def machine() -> str:
    return f"{cpu_description()}, no GPU"


def write_results(text: str, heading: str = HEADING) -> None:
    """Add ``text`` at the end of the section ``heading`` of RESULTS.md (the section is created if missing)."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if heading not in old:
        RESULTS.write_text(old.rstrip("\n") + f"\n\n{heading}\n\n{text}\n")
        return
    start = old.index(heading)
    following = old.find("\n## ", start + len(heading))
    end = len(old) if following < 0 else following + 1
    RESULTS.write_text(old[:end].rstrip("\n") + f"\n\n{text}\n" + ("\n" + old[end:] if following >= 0 else ""))


def profile(args: argparse.Namespace) -> None:
    """cProfile of one ionflow training run in this process: where its trainer spends the time."""
    import cProfile
    import pstats

    os.environ.update(thread_env(args.threads))
    _, uncertainty, k, electrostatics, nll = TRAINERS[args.profile]
    if uncertainty is None:
        raise SystemExit("--profile takes a row of ionflow's trainers, 1-5")
    kind = (args.datasets or ["clusters"])[0]
    n_frames, batch_size = {"clusters": (200, 32), "box": (24, 4)}[kind]
    with tempfile.TemporaryDirectory(prefix="ionflow_throughput_") as tmp:
        data = prepare(kind, n_frames, batch_size, Path(tmp), args.data)
        job = ionflow_job(data, args.epochs or 2, args.threads, uncertainty, k, electrostatics, nll)
        profiler = cProfile.Profile()
        profiler.runcall(worker, job)
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small data, 1 and 2 epochs, no RESULTS.md")
    parser.add_argument("--threads", type=int, default=2, help="threads of every training process")
    parser.add_argument("--epochs", type=int, default=None, help="E: runs of E and 2E epochs (default 2, quick 1)")
    parser.add_argument(
        "--datasets", nargs="+", default=None, choices=["clusters", "box"], help="default: both (quick: clusters)"
    )
    parser.add_argument("--data", type=Path, default=None, help="folder that keeps the labelled frames between runs")
    parser.add_argument("--no-write", action="store_true", help="do not append the table to RESULTS.md")
    parser.add_argument(
        "--profile",
        type=int,
        default=None,
        metavar="ROW",
        help="instead: cProfile one ionflow run (ROW 1-5 of the trainers) on the first dataset, E epochs",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.profile is not None:
        profile(args)
        return
    os.environ.update(thread_env(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    epochs = args.epochs or (1 if args.quick else 2)
    # frames generated, batch size
    sizes = {"clusters": (48, 8), "box": (10, 4)} if args.quick else {"clusters": (200, 32), "box": (24, 4)}
    trainers = [TRAINERS[0], TRAINERS[2]] if args.quick else TRAINERS
    kinds = args.datasets or (["clusters"] if args.quick else ["clusters", "box"])
    started = time.perf_counter()
    when = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    versions = f"ionflow {version('ionflow')}, mace-torch {version('mace-torch')}, torch {torch.__version__}"
    threads_seen = torch_threads_in_fresh_process(args.threads)
    print(f"{machine()}; {when}; {versions}; torch threads in a fresh process: {threads_seen}", flush=True)
    rows, datasets = [], []
    with tempfile.TemporaryDirectory(prefix="ionflow_throughput_") as tmp:
        for kind in kinds:
            n_frames, batch_size = sizes[kind]
            data = prepare(kind, n_frames, batch_size, Path(tmp), args.data)
            datasets.append(data)
            print(
                f"{kind}: {data.description}; train {data.n_train} frames ({data.train_atoms} atoms, "
                f"{data.steps} steps of {batch_size}), valid {data.n_valid} ({data.valid_atoms} atoms); "
                f"labels {data.label_s:.1f} s",
                flush=True,
            )
            rows += measure(data, trainers, epochs, args.threads)
    for row in rows:
        print(json.dumps(row), flush=True)
    text = table(rows)
    print(text)
    total = time.perf_counter() - started
    command = "python benchmarks/training_throughput.py " + " ".join(a for a in sys.argv[1:])
    data_lines = "\n".join(
        f"- `{d.name}`: {d.description}; train {d.n_train} frames ({d.train_atoms} atoms), "
        f"{d.steps} steps of {d.batch_size} per epoch; valid {d.n_valid} frames ({d.valid_atoms} atoms)"
        for d in datasets
    )
    loads = [r["max_load"] for r in rows]
    report = (
        f"Run of {when}. Machine: {machine()}; {versions} ({source_state()}); {args.threads} threads per training process "
        f"(torch.get_num_threads() = {threads_seen} in a fresh process with that environment, as in both "
        f"trainers); 1-min load average before the runs {min(loads):.1f}-{max(loads):.1f}. Command: "
        f"`{command.strip()}` ({total / 60:.1f} min). Per-epoch time = (wall({2 * epochs} epochs) - "
        f"wall({epochs} epochs)) / {epochs}, each run a fresh process.\n\n{data_lines}\n\n{text}\n"
    )
    print(report)
    if not (args.quick or args.no_write):
        write_results(report)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
