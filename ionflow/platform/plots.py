"""Figures of a model's errors: parity plots and the calibration of its force spreads.

Drawn with matplotlib's Agg canvas on a bare :class:`~matplotlib.figure.Figure` (no pyplot, no
display, no global state), from a :class:`~ionflow.platform.evaluation.Comparison`. Units: energy
per atom in eV/atom, forces in eV/Å (per Cartesian component in the parity plot, per atom in the
calibration plot), charges in e, dipoles in e·Å.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.data import chemical_symbols
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ionflow.platform.evaluation import Comparison, calibration_bins

#: Groups of equal atom count in the calibration plot.
CALIBRATION_BINS = 10

#: Side of one panel, inches.
PANEL_SIZE = 4.0

#: Panels side by side before a new row starts.
PANELS_PER_ROW = 3

#: Share of the data's range left empty on each side of a plot.
AXIS_MARGIN = 0.05

#: Most labelled ticks on an axis (long energies per atom must not overlap).
TICKS = 5

#: Marker area of the parity scatter, points².
MARKER_AREA = 6.0


def _parity(ax: Axes, reference: np.ndarray, predicted: np.ndarray, quantity: str, unit: str, groups=None) -> None:
    """Predicted against reference with the y = x line; the RMSE in the corner. ``groups`` is an
    optional list of (label, mask) drawn in their own colours."""
    for label, mask in groups or [(None, np.ones(len(reference), dtype=bool))]:
        ax.scatter(reference[mask], predicted[mask], s=MARKER_AREA, alpha=0.6, label=label)
    low, high = min(reference.min(), predicted.min()), max(reference.max(), predicted.max())
    pad = AXIS_MARGIN * (high - low) or AXIS_MARGIN
    low, high = low - pad, high + pad
    ax.plot([low, high], [low, high], color="black", linewidth=0.8)
    ax.set(xlim=(low, high), ylim=(low, high), aspect="equal")
    ax.xaxis.set_major_locator(MaxNLocator(TICKS))
    ax.yaxis.set_major_locator(MaxNLocator(TICKS))
    rmse = np.sqrt(np.mean((predicted - reference) ** 2))
    ax.text(0.04, 0.96, f"RMSE {rmse:.3g} {unit}", transform=ax.transAxes, va="top")
    ax.set(xlabel=f"reference {quantity} ({unit})", ylabel=f"predicted {quantity} ({unit})", title=quantity)
    if groups:
        ax.legend(loc="lower right", markerscale=2)


def _calibration(ax: Axes, c: Comparison) -> None:
    """RMS per-atom force error against the mean force spread, in groups of atoms of similar spread."""
    errors = np.linalg.norm(c.force_errors, axis=-1)  # (n,) eV/Å
    spread, rms = calibration_bins(c.force_std, errors, CALIBRATION_BINS)
    ax.plot(spread, rms, marker="o")
    top = (1 + AXIS_MARGIN) * max(spread.max(), rms.max()) or 1.0
    ax.plot([0, top], [0, top], color="black", linewidth=0.8, label="y = x (calibrated)")
    ax.set(xlim=(0, top), ylim=(0, top), aspect="equal")
    ax.legend(loc="lower right")
    ax.set(
        xlabel="force spread σ_i (eV/Å)", ylabel="RMS |ΔF_i| (eV/Å)", title=f"calibration ({CALIBRATION_BINS} groups)"
    )


def evaluation_figure(c: Comparison, path: str | Path, title: str = "") -> Path:
    """Write parity plots (energy per atom, force components by element, charges and dipoles where
    labelled) and the force calibration plot to ``path``; the format follows its suffix."""
    numbers = np.repeat(c.numbers, 3)  # (3n,) one per force component
    panels = [
        lambda ax: _parity(ax, c.ref_energy / c.n_atoms, c.energy / c.n_atoms, "energy per atom", "eV/atom"),
        lambda ax: _parity(
            ax,
            c.ref_forces.ravel(),
            c.forces.ravel(),
            "force components",
            "eV/Å",
            groups=[(chemical_symbols[z], numbers == z) for z in np.unique(c.numbers)],
        ),
    ]
    if len(c.charges):
        panels.append(lambda ax: _parity(ax, c.ref_charges, c.charges, "charges", "e"))
    if len(c.dipole):
        panels.append(lambda ax: _parity(ax, c.ref_dipole.ravel(), c.dipole.ravel(), "dipole components", "e·Å"))
    panels.append(lambda ax: _calibration(ax, c))
    columns = min(len(panels), PANELS_PER_ROW)
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(PANEL_SIZE * columns, PANEL_SIZE * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, draw in zip(axes, panels):
        draw(ax)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    if title:
        figure.suptitle(title)
    figure.savefig(path)
    return Path(path)
