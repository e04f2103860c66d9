"""Does active learning save labels? Real campaigns, three selection strategies, an independent test set.

For each ``selection.strategy`` (uncertainty, diverse, random) and each seed, this runs a real
ionflow campaign (the Prefect flow ``campaign_flow``, in this process, on a temporary Prefect
server) on the campaign file given (default ``examples/nacl-water.yaml``: Na+ Cl- and three
waters, GFN2-xTB labels from tblite), made cheaper for the benchmark (``BENCHMARK_CHANGES``:
a smaller committee, fewer epochs, more iterations) and identical between strategies except
for the strategy and, between seeds, the seed (rattles, MD, initial weights, random picks).
Every strategy labels the same number of frames per iteration (``selection.per_iteration``;
the trust window is opened wide so that ``uncertainty`` and ``diverse`` always find enough).

Every model version of every campaign (``models/model-vN.pt``) is evaluated on an independent
test set that no campaign saw: frames of reference-driven Langevin MD at the campaign's
temperature (``benchmarks/reference_md.py``; default ``examples/data/nacl-water-md300K.extxyz``).
The x axis is the number of training labels the version was fitted on (training and
validation sides; the campaign's own bootstrap test labels, the same for every strategy, are
not counted).

Labels saved: on the mean curves over seeds (force RMSE against labels, linear between the
measured points), for each number of labels N that random reached, N_AL is the fewest labels
at which the active-learning curve is at or below random's error at N (interpolated linearly
in labels between the two AL points that bracket it; None when AL never gets there). The
ratio N / N_AL is the labels-saved factor; the goal is >= 3 (AL reaches random's error at N
with <= N/3 labels).

Outputs in ``--out`` (default ``/tmp/ionflow-al-benchmark``): each campaign's folder, the
campaign files, ``results.json`` (every model version's test metrics), and the plot
(``--plot``, default ``benchmarks/active_learning.png``); the markdown tables go to stdout.
``--report`` redraws the tables and plot from ``results.json`` without running anything.

Usage:
    python benchmarks/active_learning.py [--seeds 0 1 2] [--strategies uncertainty diverse random]
        [--campaign examples/nacl-water.yaml] [--test examples/data/nacl-water-md300K.extxyz]
        [--out DIR] [--plot benchmarks/active_learning.png] [--quick] [--report]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

# Before anything imports prefect: a private Prefect home, no analytics.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="ionflow-al-prefect-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

import numpy as np  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("uncertainty", "diverse", "random")

#: What the benchmark changes in the campaign file, for every strategy and seed alike: a
#: cheaper committee (2 members, 8+8 channels), fewer epochs, more iterations of a smaller
#: batch, and a trust window (and walker stop) wide enough that every strategy finds
#: per_iteration frames to label while an early model is still poor (its calibrated spreads,
#: predicted errors, reach 2-3 eV/Å after the 6 bootstrap labels).
BENCHMARK_CHANGES = {
    "iterations": 5,
    "model": {"ensemble_size": 2, "hidden_irreps": "8x0e+8x1o", "mlp_irreps": "8x0e"},
    "training": {"epochs": 100, "finetune_epochs": 30},
    "bootstrap": {"n_train": 6},
    "explore": {"walkers": 4, "steps": 200, "sample_every": 10, "stop_uncertainty": 5.0},
    "selection": {"per_iteration": 6, "threshold": 0.01, "ceiling": 5.0},
}

#: --from-scratch: every model version trained afresh (``training.from_scratch``) instead of refined
#: from the previous one, and the selection ceiling above the walkers' stop (so that the frame a
#: walker stopped on can be chosen).
SCRATCH_CHANGES = {"training": {"from_scratch": True}, "selection": {"ceiling": 10.0}}

#: --quick: a smoke run of the whole pipeline (minutes, numbers meaningless); 10 epochs leave
#: spreads of eV/Å, so the trust window is opened all the way.
QUICK_CHANGES = {
    "iterations": 2,
    "training": {"epochs": 10, "finetune_epochs": 5},
    "explore": {"walkers": 2, "steps": 40, "sample_every": 10, "stop_uncertainty": 100.0},
    "selection": {"per_iteration": 3, "ceiling": 100.0},
}

#: The goal: active learning reaches random's error at N labels with at most N / this.
GOAL_RATIO = 3.0


def merged(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied one level deep (sections updated, not replaced)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def campaign_file(base: dict, strategy: str, seed: int, out: Path, quick: bool, scratch: bool = False) -> Path:
    """Write the campaign file of one (strategy, seed) run; return its path."""
    config = merged(base, BENCHMARK_CHANGES)
    if scratch:
        config = merged(config, SCRATCH_CHANGES)
    if quick:
        config = merged(config, QUICK_CHANGES)
    name = f"al-{strategy}-s{seed}"
    config = merged(
        config, {"name": name, "seed": seed, "workdir": str(out / "runs"), "selection": {"strategy": strategy}}
    )
    path = out / "campaigns" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_campaign(path: Path, test_frames: list) -> dict:
    """Run (or resume) one campaign; evaluate every model version on ``test_frames``."""
    from ionflow.flows.campaign import campaign_flow
    from ionflow.platform.evaluation import evaluate
    from ionflow.platform.model import load_model

    start = time.perf_counter()
    summary = campaign_flow(str(path))
    wall = time.perf_counter() - start
    folder = Path(summary["folder"])
    versions = []
    for row in summary["iterations"]:
        if row["model_version"] is None:
            continue
        model_path = folder / "models" / f"model-v{row['model_version']}.pt"
        metrics = evaluate(load_model(model_path), test_frames)
        versions.append(
            {
                "iteration": row["index"],
                "version": row["model_version"],
                "labels": row["n_training_labels"],
                "energy_rmse": metrics["energy_rmse"],  # eV/atom
                "forces_rmse": metrics["forces_rmse"],  # eV/Å
                "force_z_rms": metrics.get("force_z_rms"),
                "campaign_test_forces_rmse": row["model_metrics"].get("test_forces_rmse_eV_per_A"),
            }
        )
    return {"wall_s": wall, "stop_reason": summary["stop_reason"], "versions": versions}


def mean_curve(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels, mean and standard deviation over seeds of ``key``, and how many seeds each point has.

    Seeds label the same number per iteration, so their label counts match. A campaign that
    stopped early (nothing left in its trust window) has no later points; the mean is then over
    the seeds that got there, and a count only one seed reached (of several) is left out.
    """
    by_labels: dict[int, list[float]] = {}
    for run in runs:
        for v in run["versions"]:
            by_labels.setdefault(v["labels"], []).append(v[key])
    labels = sorted(n for n, values in by_labels.items() if len(values) >= min(2, len(runs)))
    values = [np.array(by_labels[n]) for n in labels]
    return (
        np.array(labels, dtype=float),
        np.array([v.mean() for v in values]),
        np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in values]),
        np.array([len(v) for v in values]),
    )


#: Relative tolerance of "at or below": curves that share a point (every strategy's bootstrap
#: model is the same) must compare equal whatever order their seeds were averaged in.
REACH_TOLERANCE = 1e-9


def labels_to_reach(labels: np.ndarray, errors: np.ndarray, target: float) -> float | None:
    """Fewest labels at which the curve (linear between points) is at or below ``target``; None if never."""
    target = target * (1 + REACH_TOLERANCE)
    if errors[0] <= target:
        return float(labels[0])
    for k in range(1, len(labels)):
        if errors[k] <= target:
            frac = (errors[k - 1] - target) / (errors[k - 1] - errors[k])
            return float(labels[k - 1] + frac * (labels[k] - labels[k - 1]))
    return None


def print_curves(curves: dict, names: list[str], keys: list[str], n_seeds: int, energy_digits: int = 2) -> None:
    """Markdown table of mean ± std force and energy RMSE per label count, a column pair per curve
    (``keys`` into ``curves``, headed ``names``); ``(n=…)`` marks points fewer than ``n_seeds`` reached."""
    print(
        "| training labels | "
        + " | ".join(f"{name} F (eV/Å)" for name in names)
        + " | "
        + " | ".join(f"{name} E (meV/atom)" for name in names)
        + " |"
    )
    print("| --- " * (1 + 2 * len(keys)) + "|")
    for n in sorted({n for key in keys for n in curves[key]["forces_rmse"][0]}):
        cells = []
        for what, scale, fmt in (("forces_rmse", 1.0, ".3f"), ("energy_rmse", 1000.0, f".{energy_digits}f")):
            for key in keys:
                labels, mean, std, count = curves[key][what]
                hit = np.flatnonzero(labels == n)
                if not len(hit):
                    cells.append("-")
                    continue
                k = hit[0]
                partial = f" (n={count[k]})" if count[k] < n_seeds else ""
                cells.append(f"{scale * mean[k]:{fmt}} ± {scale * std[k]:{fmt}}{partial}")
        print(f"| {int(n)} | " + " | ".join(cells) + " |")


def report(results: dict, plot: Path) -> None:
    """Markdown tables of the mean curves and the labels saved; the plot."""
    by_strategy: dict[str, list[dict]] = {}
    for run in results["runs"]:
        by_strategy.setdefault(run["strategy"], []).append(run)
    curves = {s: {k: mean_curve(runs, k) for k in ("forces_rmse", "energy_rmse")} for s, runs in by_strategy.items()}
    seeds = sorted({run["seed"] for run in results["runs"]})

    print(f"\nTest errors on {results['test_set']} ({results['n_test']} frames), mean ± std over seeds {seeds}:\n")
    strategies = [s for s in STRATEGIES if s in curves]
    print_curves(curves, [f"{s}:" for s in strategies], strategies, len(seeds))

    if "random" in curves:
        print(
            "\nLabels saved (force RMSE, mean curves): labels random needs (N) and labels active learning needs "
            "for the same error (N_AL, interpolated), ratio N / N_AL; goal >= 3:\n"
        )
        labels_r, mean_r = curves["random"]["forces_rmse"][:2]
        others = [s for s in strategies if s != "random"]
        print("| N (random) | random F (eV/Å) | " + " | ".join(f"{s}: N_AL (ratio)" for s in others) + " |")
        print("| --- " * (2 + len(others)) + "|")
        for n, target in zip(labels_r, mean_r):
            cells = []
            for s in others:
                labels_a, mean_a = curves[s]["forces_rmse"][:2]
                n_al = labels_to_reach(labels_a, mean_a, target)
                cells.append("not reached" if n_al is None else f"{n_al:.1f} ({n / n_al:.2f}x)")
            print(f"| {int(n)} | {target:.3f} | " + " | ".join(cells) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=90)
    for s in strategies:
        for ax, key, scale in zip(axes, ("forces_rmse", "energy_rmse"), (1.0, 1000.0)):
            labels, mean, std, _ = curves[s][key]
            ax.errorbar(labels, scale * mean, yerr=scale * std, marker="o", ms=4, capsize=3, label=s)
    axes[0].set_ylabel("test force RMSE (eV/Å)")
    axes[1].set_ylabel("test energy RMSE (meV/atom)")
    axes[1].set_yscale("log")  # energy errors of single versions span 10-100 meV/atom
    for ax in axes:
        ax.set_xlabel("training labels")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    fig.suptitle(f"{results['system']}: reference-MD test set, mean ± std over {len(seeds)} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(plot)
    print(f"\nplot: {plot}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--campaign", type=Path, default=ROOT / "examples/nacl-water.yaml")
    parser.add_argument("--test", type=Path, default=ROOT / "examples/data/nacl-water-md300K.extxyz")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "ionflow-al-benchmark")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: benchmarks/active_learning.png).")
    parser.add_argument("--quick", action="store_true", help="Smoke run: tiny campaigns, numbers meaningless.")
    parser.add_argument("--from-scratch", action="store_true", help="Train every version afresh (SCRATCH_CHANGES).")
    parser.add_argument("--report", action="store_true", help="Only redraw tables and plot from results.json.")
    args = parser.parse_args()
    out = args.out.resolve()
    results_path = out / "results.json"
    plot = args.plot or (out / "active_learning.png" if args.quick else ROOT / "benchmarks/active_learning.png")

    if not args.report:
        from ionflow.platform.structures import read_structures, with_reference_labels

        test_frames = [with_reference_labels(a) for a in read_structures(args.test)]
        base = yaml.safe_load(args.campaign.read_text())
        results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": []}
        results.update(
            system=f"{base['name']} ({test_frames[0].get_chemical_formula()})",
            test_set=str(args.test.relative_to(ROOT) if args.test.resolve().is_relative_to(ROOT) else args.test),
            n_test=len(test_frames),
            changes=merged(BENCHMARK_CHANGES, SCRATCH_CHANGES) if args.from_scratch else BENCHMARK_CHANGES,
            quick=args.quick,
        )
        for seed in args.seeds:
            for strategy in args.strategies:
                path = campaign_file(base, strategy, seed, out, args.quick, args.from_scratch)
                run = {"strategy": strategy, "seed": seed, **run_campaign(path, test_frames)}
                results["runs"] = [r for r in results["runs"] if (r["strategy"], r["seed"]) != (strategy, seed)] + [run]
                results_path.write_text(json.dumps(results, indent=1))
                last = run["versions"][-1]
                print(
                    f"== {strategy} seed {seed}: {run['wall_s']:.0f} s, {last['labels']} labels, "
                    f"test F {last['forces_rmse']:.3f} eV/Å, E {1000 * last['energy_rmse']:.2f} meV/atom "
                    f"({run['stop_reason']})",
                    flush=True,
                )
    report(json.loads(results_path.read_text()), plot)


if __name__ == "__main__":
    main()
