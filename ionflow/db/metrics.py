"""The metrics stored on models and iterations: one flat shape, units in the key names, each number
stored once.

``model.metrics`` holds what is a property of a model: its training run (``train_*``), its errors on
its validation set (``valid_*``), on the test set as it was when it was trained (``test_*``) and on
the campaign's test set as it is now (``current_test_*``, rewritten as the set grows). Each error
family is :func:`errors` of :func:`ionflow.platform.evaluation.evaluate`'s dict under a prefix.

``iteration.metrics`` holds what is a property of an iteration: what its MD explored
(:data:`EXPLORE_KEYS`), what selection did with it (``candidates``, ``selected``, ``held_out``), and
the composition of the test set at its end (``test_set_n_structures``, ``test_set_n_<origin>``).

Values are numbers (or null where undefined: a rank correlation of one frame). Key suffixes:
``_eV_per_atom``, ``_eV_per_A`` (eV/Å), ``_eV``, ``_e`` (elementary charge), ``_e_A`` (e·Å),
``_s``, ``_fs``, ``_K``; counts start with ``n_`` and have no unit; ``_z_rms`` and ``_spearman``
are dimensionless. :func:`describe` lists every key pattern with its meaning, and
``docs/schema.md`` is written from it.
"""

from __future__ import annotations

from typing import Any

#: Unit suffix of each quantity :func:`ionflow.platform.evaluation.evaluate` returns.
ERROR_UNITS = {
    "energy_rmse": "eV_per_atom",
    "energy_mae": "eV_per_atom",
    "forces_rmse": "eV_per_A",
    "forces_mae": "eV_per_A",
    "force_std_mean": "eV_per_A",
    "force_std_max": "eV_per_A",
    "energy_std_mean": "eV",
    "charges_rmse": "e",
    "charges_mae": "e",
    "dipole_rmse": "e_A",
    "dipole_mae": "e_A",
}
#: Counts of the same dict, renamed so every count starts with ``n_``.
ERROR_COUNTS = {"n": "n_structures", "n_atoms": "n_atoms", "n_charges": "n_charges", "n_dipole": "n_dipole"}
#: Dimensionless numbers of the same dict (calibration).
ERROR_PLAIN = ("force_z_rms", "energy_z_rms", "forces_spearman", "energy_spearman")
#: Per-element dicts of the same dict: ``forces_rmse_per_element[H]`` becomes ``forces_rmse_H_eV_per_A``.
ERROR_PER_ELEMENT = {"forces_rmse_per_element": "forces_rmse", "forces_mae_per_element": "forces_mae"}

#: The error families a model carries.
ERROR_PREFIXES = ("valid", "test", "current_test")

#: What a training run reports (:class:`ionflow.platform.training.TrainReport`), as model metrics.
TRAIN_KEYS = {
    "epochs": "train_n_epochs",
    "wall_time_s": "train_wall_time_s",
    "train_loss": "train_loss",
    "valid_loss": "train_valid_loss",
    "best_epoch": "train_best_epoch",
    "from_parent": "train_from_parent",
}

#: Iteration metrics written by the explore step.
EXPLORE_KEYS = (
    "explored_frames",
    "explored_force_std_mean_eV_per_A",
    "explored_force_std_max_eV_per_A",
    "walkers_stopped",
    "temperature_max_K",
    "explore_level",
    "walker_steps",
    "walker_time_fs",
)


def errors(prefix: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` (a dict of :func:`ionflow.platform.evaluation.evaluate`) as flat, unit-named keys
    under ``prefix`` (``valid``, ``test`` or ``current_test``)."""
    if prefix not in ERROR_PREFIXES:
        raise ValueError(f"unknown error prefix {prefix!r}; one of {', '.join(ERROR_PREFIXES)}")
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if key in ERROR_UNITS:
            out[f"{prefix}_{key}_{ERROR_UNITS[key]}"] = value
        elif key in ERROR_COUNTS:
            out[f"{prefix}_{ERROR_COUNTS[key]}"] = value
        elif key in ERROR_PLAIN:
            out[f"{prefix}_{key}"] = value
        elif key in ERROR_PER_ELEMENT:
            base = ERROR_PER_ELEMENT[key]
            for symbol, v in value.items():
                out[f"{prefix}_{base}_{symbol}_{ERROR_UNITS[base]}"] = v
        else:
            raise KeyError(f"evaluation key {key!r} has no stored name: add it to ionflow.db.metrics")
    return out


def training(report: dict[str, Any]) -> dict[str, Any]:
    """A training report (``TrainReport.__dict__``) as model metrics."""
    return {TRAIN_KEYS[k]: v for k, v in report.items() if k in TRAIN_KEYS}


def test_errors(model_metrics: dict[str, Any] | None) -> tuple[float | None, float | None]:
    """(energy RMSE eV/atom, force RMSE eV/Å) of a model on the test set as it is now, or as it
    was when the model was trained if it was not evaluated again; (None, None) if never tested."""
    m = model_metrics or {}
    for prefix in ("current_test", "test"):
        if m.get(f"{prefix}_forces_rmse_eV_per_A") is not None:
            return m.get(f"{prefix}_energy_rmse_eV_per_atom"), m[f"{prefix}_forces_rmse_eV_per_A"]
    return None, None


def test_set_size(model_metrics: dict[str, Any] | None) -> int | None:
    """How many structures :func:`test_errors` were measured on."""
    m = model_metrics or {}
    for prefix in ("current_test", "test"):
        if m.get(f"{prefix}_forces_rmse_eV_per_A") is not None:
            return m.get(f"{prefix}_n_structures")
    return None


def describe() -> list[tuple[str, str, str]]:
    """(owner, key pattern, meaning) of every stored metric: the table in ``docs/schema.md``."""
    rows: list[tuple[str, str, str]] = []
    meaning = {
        "energy_rmse": "RMSE of the energy per atom",
        "energy_mae": "MAE of the energy per atom",
        "forces_rmse": "RMSE of the force components",
        "forces_mae": "MAE of the force components",
        "force_std_mean": "mean calibrated per-atom force spread (predicted error)",
        "force_std_max": "largest calibrated per-atom force spread",
        "energy_std_mean": "mean calibrated energy spread",
        "charges_rmse": "RMSE of the partial charges against the reference's",
        "charges_mae": "MAE of the partial charges",
        "dipole_rmse": "RMSE of the dipole components",
        "dipole_mae": "MAE of the dipole components",
        "n_structures": "structures evaluated",
        "n_atoms": "atoms evaluated",
        "n_charges": "structures with reference charges",
        "n_dipole": "structures with a reference dipole",
        "force_z_rms": "RMS of force error / predicted spread (1 = calibrated)",
        "energy_z_rms": "RMS of energy error / predicted spread (1 = calibrated)",
        "forces_spearman": "rank correlation of per-atom force spread and error",
        "energy_spearman": "rank correlation of energy spread and error",
    }
    sets = {
        "valid": "its validation set",
        "test": "the test set as it was when it was trained",
        "current_test": "the campaign's test set as it is now",
    }
    for prefix, where in sets.items():
        for key, unit in ERROR_UNITS.items():
            rows.append(("model", f"{prefix}_{key}_{unit}", f"{meaning[key]}, on {where}"))
        for base in ERROR_PER_ELEMENT.values():
            rows.append(("model", f"{prefix}_{base}_<element>_{ERROR_UNITS[base]}", f"{meaning[base]} of one element"))
        for name in ERROR_COUNTS.values():
            rows.append(("model", f"{prefix}_{name}", f"{meaning[name]}, in {where}"))
        for key in ERROR_PLAIN:
            rows.append(("model", f"{prefix}_{key}", f"{meaning[key]}, on {where}"))
    train_meaning = {
        "train_n_epochs": "epochs run",
        "train_wall_time_s": "training wall time",
        "train_loss": "final training loss (ionflow.platform.loss, dimensionless)",
        "train_valid_loss": "validation loss of the best epoch",
        "train_best_epoch": "the best epoch, from 0",
        "train_from_parent": "1/true when refined from the parent model",
    }
    rows += [("model", key, text) for key, text in train_meaning.items()]
    explore_meaning = {
        "explored_frames": "frames the walkers sampled",
        "explored_force_std_mean_eV_per_A": "mean largest per-atom force spread of the sampled frames",
        "explored_force_std_max_eV_per_A": "largest per-atom force spread of the sampled frames",
        "walkers_stopped": "walkers stopped early (uncertainty or contact)",
        "temperature_max_K": "highest walker temperature",
        "explore_level": "growth level: which temperatures and charge states were unlocked",
        "walker_steps": "MD steps asked of each walker",
        "walker_time_fs": "simulated time asked of each walker",
    }
    rows += [("iteration", key, explore_meaning[key]) for key in EXPLORE_KEYS]
    rows += [
        ("iteration", "candidates", "frames selection decided on"),
        ("iteration", "selected", "frames chosen for labelling"),
        ("iteration", "held_out", "frames held out for the test set"),
        ("iteration", "test_set_n_structures", "test structures after the iteration"),
        ("iteration", "test_set_n_<origin>", "of which from one origin (test, test-md, test-file)"),
    ]
    return rows
