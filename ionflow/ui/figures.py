"""The dashboard's charts as plotly figure dicts ({data, layout}), built on the server.

The page's script only hands each dict to ``Plotly.newPlot``; what a chart shows is decided (and
tested) here. Units are in the axis titles.
"""

from __future__ import annotations

from typing import Any

LAYOUT = {"margin": {"l": 60, "r": 20, "t": 40, "b": 50}, "height": 340, "template": None}


def _layout(title: str, x: str, y: str, **extra: Any) -> dict[str, Any]:
    return {
        **LAYOUT,
        "title": {"text": title},
        "xaxis": {"title": {"text": x}},
        "yaxis": {"title": {"text": y}},
        **extra,
    }


def learning_curve(curve: list[dict[str, Any]], by: str) -> dict[str, Any]:
    """Test force and energy RMSE of each iteration's model against the labels it was trained on
    (``by="labels"``) or against the reference CPU time so far (``by="cpu"``)."""
    points = [r for r in curve if r["test_forces_rmse_eV_per_A"] is not None]
    if by == "labels":
        x = [(r["n_train_labels"] or 0) + (r["n_valid_labels"] or 0) for r in points]
        xtitle = "labels trained on (train + valid)"
    else:
        x = [(r["reference_cpu_s"] or 0.0) / 3600 for r in points]
        xtitle = "reference CPU time so far (h)"
    text = [f"v{r['model_version']}" for r in points]
    return {
        "data": [
            {
                "type": "scatter",
                "mode": "lines+markers+text",
                "name": "force RMSE (eV/Å)",
                "x": x,
                "y": [r["test_forces_rmse_eV_per_A"] for r in points],
                "text": text,
                "textposition": "top right",
            },
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": "energy RMSE (meV/atom)",
                "x": x,
                "y": [
                    None if r["test_energy_rmse_eV_per_atom"] is None else 1000 * r["test_energy_rmse_eV_per_atom"]
                    for r in points
                ],
                "yaxis": "y2",
                "line": {"dash": "dash"},
            },
        ],
        "layout": _layout(
            "test errors (every model on the test set as it is now)",
            xtitle,
            "force RMSE (eV/Å)",
            yaxis2={
                "title": {"text": "energy RMSE (meV/atom)"},
                "overlaying": "y",
                "side": "right",
                "tickformat": ".1f",
            },
            legend={"orientation": "h", "y": -0.25},
            margin={**LAYOUT["margin"], "r": 70},
        ),
    }


def calibration(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Predicted (mean calibrated force spread) against real (force RMSE) error on the test set,
    one point per model; on the diagonal the uncertainty is calibrated."""
    points = [r for r in rows if r["predicted_eV_per_A"] is not None and r["real_eV_per_A"] is not None]
    top = max([max(r["predicted_eV_per_A"], r["real_eV_per_A"]) for r in points], default=1.0) * 1.1
    return {
        "data": [
            {
                "type": "scatter",
                "mode": "markers+text",
                "name": "models",
                "x": [r["predicted_eV_per_A"] for r in points],
                "y": [r["real_eV_per_A"] for r in points],
                "text": [f"v{r['version']}" for r in points],
                "textposition": "top center",
            },
            {
                "type": "scatter",
                "mode": "lines",
                "name": "calibrated",
                "x": [0, top],
                "y": [0, top],
                "line": {"dash": "dot"},
            },
        ],
        "layout": _layout(
            "uncertainty calibration on the test set", "predicted: mean force spread (eV/Å)", "real: force RMSE (eV/Å)"
        ),
    }


def selection_histogram(selection: dict[str, Any]) -> dict[str, Any]:
    """Scores of an iteration's candidates, chosen and not, with the trust window's edges."""
    edges = selection["histogram"]["edges"]
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    width = edges[1] - edges[0] if len(edges) > 1 else 1.0
    shapes = []
    for value, name in ((selection["threshold_eV_per_A"], "threshold"), (selection["ceiling_eV_per_A"], "ceiling")):
        if value is not None and value <= edges[-1] * 1.5:
            shapes.append(
                {
                    "type": "line",
                    "x0": value,
                    "x1": value,
                    "yref": "paper",
                    "y0": 0,
                    "y1": 1,
                    "line": {"dash": "dash"},
                    "name": name,
                }
            )
    return {
        "data": [
            {"type": "bar", "name": "chosen", "x": centres, "y": selection["histogram"]["chosen"], "width": width},
            {
                "type": "bar",
                "name": "not chosen",
                "x": centres,
                "y": selection["histogram"]["rejected"],
                "width": width,
            },
        ],
        "layout": _layout(
            f"iteration {selection['iteration']}: {selection['n']} candidates, {selection['n_chosen']} chosen ({selection['strategy']})",
            "score: largest per-atom force spread (eV/Å)",
            "frames",
            barmode="stack",
            shapes=shapes,
        ),
    }


def lineage_graph(model: dict[str, Any]) -> dict[str, Any]:
    """The model, its parents (left) and children (right) as a chain of nodes."""
    chain = list(reversed(model["parents"])) + [{"version": model["version"], "model_id": model["model_id"]}]
    chain += model["children"]
    x = list(range(len(chain)))
    return {
        "data": [
            {
                "type": "scatter",
                "mode": "lines+markers+text",
                "x": x,
                "y": [0] * len(chain),
                "text": [f"v{n['version']}" for n in chain],
                "textposition": "top center",
                "customdata": [n["model_id"] for n in chain],
                "marker": {"size": [22 if n["model_id"] == model["model_id"] else 14 for n in chain]},
                "name": "parent -> child",
            }
        ],
        "layout": {
            **LAYOUT,
            "height": 160,
            "title": {"text": "lineage: parents -> this model -> children"},
            "xaxis": {"visible": False},
            "yaxis": {"visible": False},
        },
    }


def parity(ref: list[float], pred: list[float], title: str, unit: str) -> dict[str, Any]:
    both = ref + pred
    lo, hi = (min(both), max(both)) if both else (0.0, 1.0)
    return {
        "data": [
            {"type": "scatter", "mode": "markers", "name": "test set", "x": ref, "y": pred, "marker": {"size": 5}},
            {
                "type": "scatter",
                "mode": "lines",
                "name": "y = x",
                "x": [lo, hi],
                "y": [lo, hi],
                "line": {"dash": "dot"},
            },
        ],
        "layout": _layout(title, f"reference ({unit})", f"model ({unit})"),
    }


def charges_by_element(charges: dict[str, list[float]]) -> dict[str, Any]:
    return {
        "data": [
            {"type": "histogram", "name": symbol, "x": values, "opacity": 0.7} for symbol, values in charges.items()
        ],
        "layout": _layout("predicted partial charges on the test set", "charge (e)", "atoms", barmode="overlay"),
    }
