"""MD speed: µs per atom per step of ionflow's walkers with the electrostatic committee on a periodic cell.

What a campaign's explore step runs (``run_walkers``: ASE Langevin, one batched ensemble call per
step that gives the committee mean forces and the per-atom force spread, the walkers' contact and
uncertainty checks), on one periodic NaCl-in-water cell of ~``--atoms`` atoms at liquid density
(``electrostatics_cost.py``'s boxes). The committee has the campaign defaults (3 members,
``equilibrated``, r_max 4 Å, 16x0e+16x1o, 2 layers) with random weights: the cost does not depend
on them. The model is moved and converted as the explore step does (``accelerate``: cuEquivariance
layers on CUDA where installed, ``--mixed-precision`` for a float32 backbone).

Each step's wall time is split into the ensemble call (``predict``), the step's graph (the walkers'
Verlet neighbour list, rebuilt when an atom has moved half the skin, and the pairs within r_max of it)
and the rest (integrator, splitting, checks). ``--skin 0`` builds a fresh neighbour list every step. The issue's
goal is <= 5 µs/atom/step on an H100/H200-class GPU for ~1,000 atoms.

Usage: python benchmarks/md_speed.py [--atoms 1000] [--steps 20] [--device cpu|cuda]
       [--dtype float64|float32] [--mixed-precision] [--members 3] [--electrostatics equilibrated]
       [--threads N] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from electrostatics_cost import E0, Z_TABLE, nacl_in_water  # noqa: E402
from training_throughput import cpu_description, write_results  # noqa: E402

import ionflow.platform.md as md  # noqa: E402
from ionflow.config import ModelConfig  # noqa: E402
from ionflow.platform.model import Committee, ModelSpec  # noqa: E402
from ionflow.platform.model.kernels import accelerate  # noqa: E402

HEADING = "## md_speed.py: MD µs/atom/step with the electrostatic committee, periodic NaCl in water"


class _Timed:
    """Wraps a callable; keeps the wall time of each call (after synchronising CUDA)."""

    def __init__(self, fn, device: torch.device) -> None:
        self.fn, self.device, self.times = fn, device, []

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter() - t0)
        return out


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    atoms = nacl_in_water(args.atoms, seed=0)
    hyper = ModelConfig(ensemble_size=args.members, electrostatics=args.electrostatics, dtype=args.dtype).hyper()
    spec = ModelSpec(hyper=hyper, z_table=Z_TABLE, atomic_energies=E0, scale=1.0, avg_num_neighbors=20.0)
    torch.manual_seed(0)
    ensemble = accelerate(Committee(spec).eval().to(device), device, args.mixed_precision)

    predict = _Timed(ensemble.predict, device)
    ensemble.predict = predict  # the walkers' calculator calls ensemble.predict once per step
    graph = _Timed(md._WalkersCalculator._batch, device)  # the step's graph: Verlet list, rebuilt when due
    md._WalkersCalculator._batch = lambda calc, positions: graph(calc, positions)

    def walk(steps: int) -> tuple[float, int, str]:
        predict.times.clear()
        graph.times.clear()
        t0 = time.perf_counter()
        (result,) = md.run_walkers(
            ensemble,
            [atoms],
            steps=steps,
            timestep_fs=0.25,
            temperature_K=300.0,
            friction_per_fs=0.01,
            sample_every=max(1, steps),
            stop_uncertainty=float("inf"),
            seed=0,
            skin=args.skin,
        )
        return time.perf_counter() - t0, result.n_steps_done, result.stop_reason

    walk(args.warmup)  # compilation, allocator, caches
    walls = []
    parts = {"predict": [], "graph": []}
    for _ in range(args.repeats):
        wall, done, reason = walk(args.steps)
        if done != args.steps:
            raise SystemExit(f"the walker stopped after {done} of {args.steps} steps: {reason}")
        # the calculator runs once more than the steps: the integrator's first forces, left out
        first = predict.times[0] + graph.times[0]
        walls.append((wall - first) / done)
        parts["predict"].append(sum(predict.times[1:]) / done)
        parts["graph"].append(sum(graph.times[1:]) / done)
    step = statistics.median(walls)
    n = len(atoms)
    row = {
        "atoms": n,
        "box": "x".join(f"{x:.1f}" for x in atoms.cell.lengths()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description(),
        "dtype": args.dtype + (" (backbone float32)" if args.mixed_precision else ""),
        "members": args.members,
        "skin": args.skin,
        "electrostatics": args.electrostatics,
        "ms_per_step": 1000 * step,
        "us_per_atom_step": 1e6 * step / n,
        "predict_ms": 1000 * statistics.median(parts["predict"]),
        "graph_ms": 1000 * statistics.median(parts["graph"]),
    }
    row["rest_ms"] = row["ms_per_step"] - row["predict_ms"] - row["graph_ms"]
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| atoms | cell (Å) | device | dtype | members, head | skin (Å) | ms/step | µs/atom/step | predict (ms) | "
        "graph (ms) | rest (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['atoms']} | {r['box']} | {r['device']} | {r['dtype']} | {r['members']}, {r['electrostatics']} | {r['skin']} | "
            f"{r['ms_per_step']:.1f} | **{r['us_per_atom_step']:.1f}** | {r['predict_ms']:.1f} | "
            f"{r['graph_ms']:.1f} | {r['rest_ms']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atoms", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--mixed-precision", action="store_true", help="float32 backbone, float64 sums (CUDA)")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--skin", type=float, default=md.VERLET_SKIN, help="Verlet skin (Å); 0: a fresh list per step")
    parser.add_argument("--electrostatics", default="equilibrated")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    row = measure(args)
    command = "python benchmarks/md_speed.py " + " ".join(sys.argv[1:])
    report = (
        f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads; median of {args.repeats} runs of {args.steps} steps after "
        f"{args.warmup} warm-up steps. Command: `{command.strip()}` ({(time.perf_counter() - started) / 60:.1f} min)."
        f"\n\n{table([row])}\n"
    )
    print(report)
    if not args.no_write:
        write_results(report, HEADING)


if __name__ == "__main__":
    main()
