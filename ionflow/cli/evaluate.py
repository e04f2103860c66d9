"""``ionflow evaluate``: any ionflow model's errors on a labelled file, and how well its spreads
predict them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from ionflow.cli.common import app, err, fail, metrics_table, read_labelled

#: Image formats ``--plot`` writes; matplotlib picks the format from the suffix.
PLOT_SUFFIXES = (".png", ".pdf", ".svg")

CALIBRATION_CAPTION = (
    "error/spread: RMS of ΔE/σ_E over frames and of |ΔF_i|/σ_i over atoms (1 calibrated, > 1 overconfident, "
    "< 1 underconfident); ρ: Spearman rank correlation of spread and |error| (1: the spreads order the errors)"
)


def _json_safe(value: Any) -> Any:
    """NaN and infinities as None, recursively, so that the output is standard JSON."""
    if isinstance(value, dict):
        return {key: _json_safe(v) for key, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def per_element_table(metrics: dict):
    """Force RMSE and MAE of each element's atoms (eV/Å, per component)."""
    from rich.table import Table

    table = Table(title="force errors per element")
    for header, justify in (("element", "left"), ("RMSE (eV/Å)", "right"), ("MAE (eV/Å)", "right")):
        table.add_column(header, justify=justify)
    for symbol, rmse in metrics["forces_rmse_per_element"].items():
        table.add_row(symbol, f"{rmse:.4f}", f"{metrics['forces_mae_per_element'][symbol]:.4f}")
    return table


def calibration_table(metrics: dict):
    """Mean calibrated spread, RMS of error/spread and Spearman's ρ, for energies and forces."""
    from rich.table import Table

    table = Table(title="uncertainty calibration", caption=CALIBRATION_CAPTION, caption_justify="left")
    for header, justify in (("quantity", "left"), ("mean spread", "right"), ("error/spread", "right"), ("ρ", "right")):
        table.add_column(header, justify=justify)
    table.add_row(
        "energy (eV, per frame)",
        f"{metrics['energy_std_mean']:.4f}",
        _fmt(metrics["energy_z_rms"], ".3f"),
        _fmt(metrics["energy_spearman"], ".3f"),
    )
    table.add_row(
        "forces (eV/Å, per atom)",
        f"{metrics['force_std_mean']:.4f}",
        _fmt(metrics.get("force_z_rms"), ".3f"),
        _fmt(metrics["forces_spearman"], ".3f"),
    )
    return table


def _check_elements(frames: list, z_table: list[int], data: Path) -> None:
    """Refuse frames with elements the model has no weights for, naming them."""
    from ase.data import chemical_symbols

    known = set(z_table)
    unknown = sorted({int(z) for atoms in frames for z in atoms.numbers} - known)
    if unknown:
        first = next(k for k, atoms in enumerate(frames) if not set(atoms.numbers.tolist()) <= known)
        fail(
            f"{data}: element(s) {', '.join(chemical_symbols[z] for z in unknown)} (first in frame {first}) "
            f"are not among the model's elements ({', '.join(chemical_symbols[z] for z in z_table)})"
        )


@app.command("evaluate")
def evaluate_model(
    model: Path = typer.Argument(..., help="ionflow model file (.pt), from `ionflow train` or a campaign's models/."),
    data: Path = typer.Argument(
        ...,
        help="Labelled structures (extxyz): REF_energy/REF_forces or plain energy/forces; "
        "REF_charges/REF_dipole where present.",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object instead of tables (eV/atom, eV/Å, eV, e, e·Å)."
    ),
    plot: Path | None = typer.Option(
        None, "--plot", help="Write parity plots and the force calibration plot to this image (.png, .pdf, .svg)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", min=1, help="Frames per forward pass (default 64); the numbers do not depend on it."
    ),
) -> None:
    """Errors of a model on labelled structures, and the calibration of its uncertainties.

    RMSE and MAE of energy, forces (also per element), charges and dipole; RMS of error/spread and Spearman's ρ.
    Each frame's total charge and multiplicity come from its info (charge, multiplicity; defaults 0 and 1).
    Charges and dipoles are compared for models with an electrostatic head, on the frames that carry them.
    """
    if plot is not None:
        if plot.suffix.lower() not in PLOT_SUFFIXES:
            fail(f"--plot {plot}: the image file must end in {', '.join(PLOT_SUFFIXES)}")
        if not plot.parent.is_dir():
            fail(f"--plot {plot}: no such folder {plot.parent}")

    from ionflow.platform.device import pick_device
    from ionflow.platform.model import load_model

    try:
        ensemble = load_model(model, device=pick_device())
    except FileNotFoundError:
        fail(f"{model}: no such model file")
    except (ValueError, RuntimeError) as exc:  # not an ionflow model file; IONFLOW_DEVICE names no device
        fail(str(exc))
    frames = read_labelled(data)
    _check_elements(frames, ensemble.z_table, data)
    settings = ensemble.spec.settings
    if not settings.has_electrostatics and any("REF_dipole" in a.info or "REF_charges" in a.arrays for a in frames):
        err.print("note: the model has no electrostatic head; REF_charges/REF_dipole are not compared")

    from ionflow.platform.evaluation import EVALUATION_BATCH_SIZE, compare, error_metrics

    with err.status(f"evaluating {model.name} on {len(frames)} frames"):
        comparison = compare(ensemble, frames, batch_size or EVALUATION_BATCH_SIZE)
    metrics = error_metrics(comparison)
    if plot is not None:
        from ionflow.platform.plots import evaluation_figure

        evaluation_figure(comparison, plot, title=f"{model.name} on {data.name}")
    if as_json:
        typer.echo(json.dumps(_json_safe(metrics)))
        if plot is not None:
            err.print(f"plot written to {plot}")
        return
    out = Console(highlight=False)
    kind = "heads" if settings.shallow else "members"
    description = f"{settings.uncertainty} of {settings.ensemble_size} {kind}, electrostatics {settings.electrostatics}"
    out.print(f"model  {model}: {description}", soft_wrap=True)
    out.print(f"data   {data}: {metrics['n']} frames, {metrics['n_atoms']} atoms", soft_wrap=True)
    out.print(metrics_table(metrics, title="errors"))
    out.print(per_element_table(metrics))
    out.print(calibration_table(metrics))
    if plot is not None:
        out.print(f"plot written to {plot}")
