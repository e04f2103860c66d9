"""What a person sees while a campaign runs: rich progress bars and one table per iteration."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from ionflow.db import metrics

console = Console(stderr=False, highlight=False, soft_wrap=True)


@contextmanager
def stage(description: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """A progress bar for one step; yields ``update(done, total)``."""
    progress = Progress(
        TextColumn("  {task.description:<34}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=max(total, 1))

        def update(done: int, new_total: int | None = None) -> None:
            progress.update(task, completed=done, total=new_total or max(total, 1))

        yield update
        progress.update(task, completed=progress.tasks[0].total)


CAPTION = (
    "labels: reference labels so far (test set included); fit: labels the model was trained on; CPU: CPU "
    "time of the reference calculations so far; new: frames selected this iteration; E (meV/atom), F (eV/Å): "
    "RMSE of energy per atom and forces of each iteration's model on the test set as it is now (every model is "
    "evaluated again as the set grows); σF: calibrated per-atom force spread (predicted error, eV/Å) over "
    "explored frames, mean (σF) and max"
)


def test_errors(row: dict[str, Any]) -> tuple[float | None, float | None]:
    """(energy RMSE eV/atom, force RMSE eV/Å) of the model of an iteration (a row of
    :func:`ionflow.db.queries.iteration_table`) on the current test set, else on the test set of its
    own time, else None."""
    return metrics.test_errors(row.get("model_metrics"))


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 3600:.2f} h"


def learning_curve(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Test errors against labels trained on and against reference CPU time, one point per
    evaluated iteration, as a PNG at ``path``; None when no iteration has test errors yet."""
    points = [r for r in rows if test_errors(r)[1] is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    errors = [test_errors(r) for r in points]
    forces = [f for _, f in errors]
    energies = [1000 * e for e, _ in errors]
    cpu = [r.get("reference_cpu_s") or 0.0 for r in points]
    hours = max(cpu) >= 3600
    axes_x = [
        ([r.get("n_training_labels") or 0 for r in points], "labels trained on"),
        ([c / 3600 for c in cpu] if hours else cpu, f"reference CPU time ({'h' if hours else 's'})"),
    ]
    fig, panels = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    for ax, (x, label) in zip(panels, axes_x):
        ax.plot(x, forces, "o-", color="tab:blue")
        for xi, yi, r in zip(x, forces, points):
            ax.annotate(f"v{r['index']}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("test force RMSE (eV/Å)", color="tab:blue")
        twin = ax.twinx()
        twin.plot(x, energies, "s--", color="tab:red")
        twin.set_ylabel("test energy RMSE (meV/atom)", color="tab:red")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def calibration_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Predicted (mean calibrated force spread) against real (force RMSE) error of each iteration's
    model on the test set, as a PNG at ``path``; None when no model was tested yet."""
    points = []
    for r in rows:
        m = r.get("model_metrics") or {}
        prefix = "current_test" if m.get("current_test_force_std_mean_eV_per_A") is not None else "test"
        predicted, real = m.get(f"{prefix}_force_std_mean_eV_per_A"), m.get(f"{prefix}_forces_rmse_eV_per_A")
        if predicted is not None and real is not None:
            points.append((r["index"], predicted, real))
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    top = 1.1 * max(max(p, q) for _, p, q in points)
    fig, ax = plt.subplots(figsize=(4.2, 3.6), constrained_layout=True)
    ax.plot([0, top], [0, top], ":", color="grey", label="calibrated")
    ax.plot([p for _, p, _ in points], [q for _, _, q in points], "o", color="tab:blue")
    for index, p, q in points:
        ax.annotate(f"v{index}", (p, q), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("predicted: mean force spread (eV/Å)")
    ax.set_ylabel("real: force RMSE (eV/Å)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def iteration_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Labels so far, test errors, force uncertainty of explored frames, frames selected."""
    table = Table(
        title=title, title_justify="left", caption=CAPTION, caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False
    )
    # short headers: the eleven columns fit an 80-column terminal (the caption explains them)
    headers = ("it", "status", "labels", "fit", "CPU", "new", "E", "F", "σF", "max", "model")
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        m = row.get("metrics") or {}
        e, f = test_errors(row)
        table.add_row(
            str(row["index"]),
            row["status"],
            str(row["n_labels"]),
            _fmt(row.get("n_training_labels"), "d"),
            _duration(row.get("reference_cpu_s")),
            "-" if row["index"] == 0 else str(row["n_selected"]),
            _fmt(None if e is None else 1000 * e, ".1f"),
            _fmt(f, ".3f"),
            _fmt(m.get("explored_force_std_mean_eV_per_A"), ".3f"),
            _fmt(m.get("explored_force_std_max_eV_per_A"), ".3f"),
            "-" if row.get("model_version") is None else f"v{row['model_version']}",
        )
    return table


def failure_table(counts: dict[str, int], failures: list[dict[str, Any]], title: str) -> Table:
    """The reference calculations that did not end ``ok``: why, and where their files are."""
    total = sum(counts.values())
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    table = Table(
        title=f"{title}: {summary} of {total} calculations",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for header, justify in (
        ("iter", "right"),
        ("structure", "right"),
        ("status", "left"),
        ("error", "left"),
        ("run folder", "left"),
    ):
        table.add_column(header, justify=justify, overflow="fold")
    for row in failures:
        table.add_row(
            "-" if row["iteration"] is None else str(row["iteration"]),
            str(row["structure_id"]),
            row["status"],
            (row["error"] or "")[:300],
            row["run_dir"] or "-",
        )
    return table
