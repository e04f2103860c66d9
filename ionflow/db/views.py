"""The SQL views of the provenance database, the same on SQLite and PostgreSQL.

Created by migration 0003 (and dropped by its downgrade); documented with example queries in
``docs/schema.md``. Column names carry units in their case (``score_eV_per_A``) but are not
quoted, so the same query works on both databases; PostgreSQL folds them to lower case, and
:func:`cased` gives query results their names back. Views hold no data: they are saved queries over the tables, so they are always
current. Column names carry units where a quantity has one. Where a view reads a metric it takes
it from ``model.metrics`` (see :mod:`ionflow.db.metrics`), with the dialect's JSON operator.
"""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa


def _metric(dialect: str, column: str, key: str) -> str:
    """A number from a JSON column, as SQL."""
    if dialect == "postgresql":
        return f"CAST(({column} ->> '{key}') AS DOUBLE PRECISION)"
    return f"json_extract({column}, '$.\"{key}\"')"


def _test_error(dialect: str, key: str) -> str:
    """A test error of model ``m``: on the test set as it is now, else as it was when trained."""
    return f"COALESCE({_metric(dialect, 'm.metrics', 'current_test_' + key)}, {_metric(dialect, 'm.metrics', 'test_' + key)})"


def view_sql(dialect: str) -> dict[str, str]:
    """``{view name: SELECT}`` for ``dialect`` (``sqlite`` or ``postgresql``)."""
    return {
        "ionflow_training_set": """
SELECT m.campaign_id, c.name AS campaign, m.id AS model_id, m.version AS model_version, tm.split,
       calc.id AS calculation_id, calc.adapter, calc.code_version, calc.settings_hash, calc.status,
       calc.energy AS energy_eV, calc.wall_time_s, calc.cpu_time_s, calc.run_dir,
       calc_it."index" AS labelled_in_iteration,
       s.id AS structure_id, s.hash AS structure_hash, s.formula, s.n_atoms, s.charge, s.multiplicity,
       cs.origin, joined.\"index\" AS iteration_index, cs.md_run_id, cs.md_step,
       sd.reason_code AS chosen_because, sd.score AS score_eV_per_A, sd.rank
FROM model_training_member tm
JOIN model m ON m.id = tm.model_id
JOIN campaign c ON c.id = m.campaign_id
JOIN calculation calc ON calc.id = tm.calculation_id
JOIN structure s ON s.id = calc.structure_id
LEFT JOIN iteration calc_it ON calc_it.id = calc.iteration_id
LEFT JOIN campaign_structure cs ON cs.structure_id = s.id AND cs.campaign_id = m.campaign_id
LEFT JOIN iteration joined ON joined.id = cs.iteration_id
LEFT JOIN selection_decision sd ON sd.iteration_id = cs.iteration_id AND sd.structure_id = s.id
""",
        "ionflow_decisions": """
SELECT it.campaign_id, c.name AS campaign, it.\"index\" AS iteration_index, sd.id AS decision_id,
       sd.structure_id, s.hash AS structure_hash, s.formula, sd.md_run_id, r.walker, cs.md_step,
       r.\"temperature_K\" AS temperature_K, sd.score AS score_eV_per_A,
       sd.energy_uncertainty AS energy_uncertainty_eV, sd.threshold AS threshold_eV_per_A,
       it.selection_ceiling AS ceiling_eV_per_A, it.selection_strategy AS strategy,
       sd.chosen, sd.reason_code, sd.rank, sd.reason
FROM selection_decision sd
JOIN iteration it ON it.id = sd.iteration_id
JOIN campaign c ON c.id = it.campaign_id
JOIN structure s ON s.id = sd.structure_id
LEFT JOIN campaign_structure cs ON cs.campaign_id = it.campaign_id AND cs.structure_id = sd.structure_id
LEFT JOIN md_run r ON r.id = sd.md_run_id
""",
        "ionflow_learning_curve": f"""
WITH cost AS (
    SELECT it.campaign_id, it.id AS iteration_id, it.\"index\" AS iteration_index,
           COUNT(calc.id) AS n_calculations,
           SUM(CASE WHEN calc.status = 'ok' THEN 1 ELSE 0 END) AS n_ok,
           COALESCE(SUM(COALESCE(calc.cpu_time_s, calc.wall_time_s)), 0) AS cpu_s
    FROM iteration it LEFT JOIN calculation calc ON calc.iteration_id = it.id
    GROUP BY it.campaign_id, it.id, it.\"index\"
),
members AS (
    SELECT model_id,
           SUM(CASE WHEN split = 'train' THEN 1 ELSE 0 END) AS n_train,
           SUM(CASE WHEN split = 'valid' THEN 1 ELSE 0 END) AS n_valid
    FROM model_training_member GROUP BY model_id
)
SELECT c.id AS campaign_id, c.name AS campaign, cost.iteration_index, m.version AS model_version,
       members.n_train AS n_train_labels, members.n_valid AS n_valid_labels,
       COALESCE({_metric(dialect, "m.metrics", "current_test_n_structures")},
                {_metric(dialect, "m.metrics", "test_n_structures")}) AS n_test_structures,
       CAST(SUM(cost.n_calculations) OVER w AS BIGINT) AS reference_calculations,
       CAST(SUM(cost.n_ok) OVER w AS BIGINT) AS reference_ok,
       SUM(cost.cpu_s) OVER w AS reference_cpu_s,
       {_test_error(dialect, "energy_rmse_eV_per_atom")} AS test_energy_rmse_eV_per_atom,
       {_test_error(dialect, "forces_rmse_eV_per_A")} AS test_forces_rmse_eV_per_A
FROM cost
JOIN campaign c ON c.id = cost.campaign_id
LEFT JOIN model m ON m.iteration_id = cost.iteration_id
     AND m.version = (SELECT MAX(m2.version) FROM model m2 WHERE m2.iteration_id = cost.iteration_id)
LEFT JOIN members ON members.model_id = m.id
WINDOW w AS (PARTITION BY cost.campaign_id ORDER BY cost.iteration_index)
""",
        "ionflow_reference_cost": """
SELECT c.id AS campaign_id, c.name AS campaign, calc.adapter, calc.code_version, calc.status,
       COUNT(*) AS n_calculations, SUM(s.n_atoms) AS n_atoms,
       SUM(calc.wall_time_s) AS wall_time_s, SUM(calc.cpu_time_s) AS cpu_time_s,
       SUM(COALESCE(calc.cpu_time_s, calc.wall_time_s)) AS cpu_or_wall_time_s,
       SUM(CASE WHEN calc.cpu_time_s IS NULL THEN 1 ELSE 0 END) AS n_cpu_time_unknown
FROM calculation calc
JOIN iteration it ON it.id = calc.iteration_id
JOIN campaign c ON c.id = it.campaign_id
JOIN structure s ON s.id = calc.structure_id
GROUP BY c.id, c.name, calc.adapter, calc.code_version, calc.status
""",
    }


#: What each view answers, for ``docs/schema.md`` and ``ionflow db views``.
VIEW_DESCRIPTIONS = {
    "ionflow_training_set": "one row per model and label it was fitted on (train or valid): the "
    "calculation, its structure, how and when the structure joined the campaign, the MD run and step "
    "it was sampled at, and the decision that chose it",
    "ionflow_decisions": "one row per selection decision, with its iteration's index (not its id), "
    "the MD run, walker, step and temperature the frame came from, its score, the threshold and "
    "ceiling, the reason code and the rank",
    "ionflow_learning_curve": "one row per iteration: the model it trained, its labels by split, "
    "the test set's size, the reference calculations and CPU seconds so far, and the test errors",
    "ionflow_reference_cost": "reference calculations per campaign, adapter, code version and "
    "status: counts, atoms, wall and CPU seconds",
}


def create_views(bind: sa.Connection) -> None:
    """Create (or replace) every view on ``bind``'s database."""
    drop_views(bind)
    for name, select in view_sql(bind.dialect.name).items():
        bind.exec_driver_sql(f"CREATE VIEW {name} AS {select.strip()}")


def drop_views(bind: sa.Connection) -> None:
    for name in view_sql(bind.dialect.name):
        bind.exec_driver_sql(f"DROP VIEW IF EXISTS {name}")


def _view_columns() -> dict[str, str]:
    names: set[str] = set()
    for select in view_sql("sqlite").values():
        names.update(re.findall(r"\bAS ([A-Za-z_]+)", select))
        names.update(re.findall(r'"([A-Za-z_]+)"', select))
    return {n.lower(): n for n in names if n != n.lower()}


def cased(row: dict[str, Any]) -> dict[str, Any]:
    """A row of a view with its column names as documented (``score_eV_per_A``), on PostgreSQL too."""
    return {_CASED.get(k, k): v for k, v in row.items()}


_CASED = _view_columns()
