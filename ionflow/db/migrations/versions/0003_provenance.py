"""Provenance worth querying: the MD step of each sampled frame, where each walker's start came from,
reason codes and ranks on selection decisions, the selection parameters of each iteration, the
history of Prefect runs, run folders relative to the campaign folder, metrics in one flat shape with
units in their keys, and the SQL views of docs/schema.md.

Existing rows are upgraded in place: decisions get the code of their reason sentence (and, for
campaigns selecting by uncertainty, their rank by spread); iterations get the selection parameters
of their campaign's configuration; run folders under the campaign folder become relative; model
and iteration metrics are renamed and moved where they belong (errors to the model). What was
never recorded stays NULL: the MD step of frames sampled before this revision, and where walkers
started (``unknown``).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from ionflow.db.views import create_views, drop_views

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REASON_CODES = (
    "uncertain",
    "random_pick",
    "diverse",
    "trusted",
    "above_ceiling",
    "already_labelled",
    "near_duplicate",
    "budget",
    "not_drawn",
    "covered",
    "held_out",
)
#: The first words of each reason sentence the releases before 0003 wrote, and their code.
_REASON_PREFIXES = (
    ("uncertain:", "uncertain"),
    ("random pick", "random_pick"),
    ("diverse: covered", "covered"),
    ("diverse:", "diverse"),
    ("trusted:", "trusted"),
    ("above ceiling", "above_ceiling"),
    ("already labelled", "already_labelled"),
    ("near-duplicate", "near_duplicate"),
    ("budget:", "budget"),
    ("random: not drawn", "not_drawn"),
    ("held out", "held_out"),
)


def _ck(values: tuple[str, ...], column: str) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    with op.batch_alter_table("iteration") as batch:
        batch.add_column(sa.Column("stop_reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("selection_strategy", sa.String(), nullable=True))
        for name in ("selection_threshold", "selection_ceiling", "selection_min_distance", "selection_min_novelty"):
            batch.add_column(sa.Column(name, sa.Double(), nullable=True))
        for name in ("selection_budget", "selection_seed", "selection_held_out"):
            batch.add_column(sa.Column(name, sa.Integer(), nullable=True))
    with op.batch_alter_table("campaign_structure") as batch:
        batch.add_column(sa.Column("md_step", sa.Integer(), nullable=True))
    with op.batch_alter_table("md_run") as batch:
        batch.add_column(sa.Column("start_origin", sa.String(), nullable=True))
        batch.add_column(sa.Column("start_md_run_id", sa.Integer(), nullable=True))
    with op.batch_alter_table("selection_decision") as batch:
        batch.add_column(sa.Column("reason_code", sa.String(), nullable=True))
        batch.add_column(sa.Column("rank", sa.Integer(), nullable=True))

    op.create_table(
        "prefect_run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("iteration_id", sa.Integer(), nullable=True),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("flow_run_id", sa.String(), nullable=True),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("api_url", sa.String(), nullable=True),
        sa.Column("temporary_server", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("kind IN ('flow', 'task')", name=op.f("ck_prefect_run_kind")),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaign.id"], name=op.f("fk_prefect_run_campaign_id_campaign")),
        sa.ForeignKeyConstraint(["iteration_id"], ["iteration.id"], name=op.f("fk_prefect_run_iteration_id_iteration")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prefect_run")),
        sa.UniqueConstraint("run_id", name=op.f("uq_prefect_run_run_id")),
    )
    op.create_index(op.f("ix_prefect_run_campaign_id"), "prefect_run", ["campaign_id"])
    op.create_index(op.f("ix_prefect_run_iteration_id"), "prefect_run", ["iteration_id"])

    _upgrade_rows(op.get_bind())

    with op.batch_alter_table("md_run") as batch:
        batch.alter_column("start_origin", existing_type=sa.String(), nullable=False)
        batch.create_check_constraint(
            op.f("ck_md_run_start_origin"), "start_origin IN ('rattle', 'previous_run', 'unknown')"
        )
        batch.create_foreign_key(op.f("fk_md_run_start_md_run_id_md_run"), "md_run", ["start_md_run_id"], ["id"])
    with op.batch_alter_table("selection_decision") as batch:
        batch.alter_column("reason_code", existing_type=sa.String(), nullable=False)
        batch.create_check_constraint(op.f("ck_selection_decision_reason_code"), _ck(REASON_CODES, "reason_code"))

    create_views(op.get_bind())


def reason_code(reason: str) -> str:
    """The code of a reason sentence written before revision 0003."""
    for prefix, code in _REASON_PREFIXES:
        if reason.startswith(prefix):
            return code
    raise ValueError(f"selection decision reason {reason!r} matches no reason code")


def _upgrade_rows(bind: sa.Connection) -> None:
    meta = sa.MetaData()
    campaign = sa.Table("campaign", meta, autoload_with=bind)
    iteration = sa.Table("iteration", meta, autoload_with=bind)
    decision = sa.Table("selection_decision", meta, autoload_with=bind)
    calculation = sa.Table("calculation", meta, autoload_with=bind)
    model = sa.Table("model", meta, autoload_with=bind)
    md_run = sa.Table("md_run", meta, autoload_with=bind)

    bind.execute(md_run.update().values(start_origin="unknown"))
    configs = {row.id: (row.config or {}, row.workdir) for row in bind.execute(sa.select(campaign))}
    iterations = list(bind.execute(sa.select(iteration)))
    campaign_of = {it.id: it.campaign_id for it in iterations}

    # decisions: code from the sentence; rank by spread where the campaign selected by uncertainty
    by_iteration: dict[int, list[Any]] = defaultdict(list)
    for row in bind.execute(sa.select(decision.c.id, decision.c.iteration_id, decision.c.score, decision.c.reason)):
        by_iteration[row.iteration_id].append(row)
    for iteration_id, rows in by_iteration.items():
        config = configs[campaign_of[iteration_id]][0]
        strategy = (config.get("selection") or {}).get("strategy", "uncertainty")
        ranked = [r for r in rows if reason_code(r.reason) != "held_out"]
        ranks = {}
        if strategy == "uncertainty":
            ranks = {r.id: k for k, r in enumerate(sorted(ranked, key=lambda r: (-r.score, r.id)), start=1)}
        for r in rows:
            bind.execute(
                decision.update()
                .where(decision.c.id == r.id)
                .values(reason_code=reason_code(r.reason), rank=ranks.get(r.id))
            )

    # iterations that selected: the parameters of their campaign's configuration
    for it in iterations:
        if it.id not in by_iteration:
            continue
        config = configs[it.campaign_id][0]
        sel = config.get("selection") or {}
        bind.execute(
            iteration.update()
            .where(iteration.c.id == it.id)
            .values(
                selection_strategy=sel.get("strategy", "uncertainty"),
                selection_threshold=sel.get("threshold"),
                selection_ceiling=sel.get("ceiling"),
                selection_budget=sel.get("per_iteration"),
                selection_min_distance=sel.get("min_distance"),
                selection_min_novelty=sel.get("min_novelty"),
                selection_held_out=((config.get("test") or {}).get("held_out_per_iteration")),
            )
        )

    # run folders under the campaign folder that ran them become relative to it
    for row in bind.execute(
        sa.select(calculation.c.id, calculation.c.run_dir, calculation.c.iteration_id).where(
            calculation.c.run_dir.is_not(None), calculation.c.iteration_id.is_not(None)
        )
    ):
        workdir = configs.get(campaign_of.get(row.iteration_id), ({}, None))[1]
        if workdir and row.run_dir.startswith(workdir.rstrip("/") + "/"):
            relative = row.run_dir[len(workdir.rstrip("/")) + 1 :]
            bind.execute(calculation.update().where(calculation.c.id == row.id).values(run_dir=relative))

    _upgrade_metrics(bind, iteration, model, iterations)


def _upgrade_metrics(bind: sa.Connection, iteration: sa.Table, model: sa.Table, iterations: list[Any]) -> None:
    """Model metrics flattened with units in their keys; an iteration's test errors (a copy of its
    model's) dropped and its ``current_test_*`` errors moved to its model; iteration keys renamed."""
    from ionflow.db.metrics import errors, training

    newest = {}
    for row in bind.execute(sa.select(model.c.id, model.c.iteration_id, model.c.version, model.c.metrics)):
        if row.iteration_id is not None and (
            row.iteration_id not in newest or row.version > newest[row.iteration_id][1]
        ):
            newest[row.iteration_id] = (row.id, row.version)
        old = dict(row.metrics or {})
        new: dict[str, Any] = {}
        if isinstance(old.get("train"), dict):
            new.update(training(old.pop("train")))
        for prefix in ("valid", "test"):
            if isinstance(old.get(prefix), dict):
                new.update(errors(prefix, old.pop(prefix)))
        new.update(old)  # anything else is kept under its name
        bind.execute(model.update().where(model.c.id == row.id).values(metrics=new))

    renamed = {
        "explored_force_std_mean": "explored_force_std_mean_eV_per_A",
        "explored_force_std_max": "explored_force_std_max_eV_per_A",
        "temperature_K": "temperature_max_K",
        "test_n": "test_set_n_structures",
    }
    origins = ("test", "test-md", "test-file")
    for it in iterations:
        old = dict(it.metrics or {})
        new, current, tested = {}, {}, {}
        for key, value in old.items():
            if key == "stop_reason":
                bind.execute(iteration.update().where(iteration.c.id == it.id).values(stop_reason=value))
            elif key in renamed:
                new[renamed[key]] = value
            elif key == "conditions":
                continue  # walkers' temperatures and charge states are in md_run and its start structure
            elif key.startswith("test_n_") and key[len("test_n_") :] in origins:
                new[f"test_set_n_{key[len('test_n_') :]}"] = value
            elif key.startswith("current_test_"):
                current[key[len("current_test_") :]] = value
            elif key.startswith("test_"):
                tested[key[len("test_") :]] = value
            else:
                new[key] = value
        if it.id in newest and (current or tested):
            model_id = newest[it.id][0]
            metrics = dict(bind.execute(sa.select(model.c.metrics).where(model.c.id == model_id)).scalar() or {})
            if current:
                metrics.update(errors("current_test", current))
            if tested and "test_forces_rmse_eV_per_A" not in metrics:
                tested["n"] = old.get("test_n")
                metrics.update(errors("test", {k: v for k, v in tested.items() if v is not None}))
            bind.execute(model.update().where(model.c.id == model_id).values(metrics=metrics))
        if "test_n" in old and it.id not in newest:
            new["test_set_n_structures"] = old["test_n"]
        bind.execute(iteration.update().where(iteration.c.id == it.id).values(metrics=new or None))


def downgrade() -> None:
    drop_views(op.get_bind())
    op.drop_table("prefect_run")
    with op.batch_alter_table("selection_decision") as batch:
        batch.drop_constraint(op.f("ck_selection_decision_reason_code"), type_="check")
        batch.drop_column("rank")
        batch.drop_column("reason_code")
    with op.batch_alter_table("md_run") as batch:
        batch.drop_constraint(op.f("ck_md_run_start_origin"), type_="check")
        batch.drop_constraint(op.f("fk_md_run_start_md_run_id_md_run"), type_="foreignkey")
        batch.drop_column("start_md_run_id")
        batch.drop_column("start_origin")
    with op.batch_alter_table("campaign_structure") as batch:
        batch.drop_column("md_step")
    with op.batch_alter_table("iteration") as batch:
        for name in (
            "stop_reason",
            "selection_strategy",
            "selection_threshold",
            "selection_ceiling",
            "selection_min_distance",
            "selection_min_novelty",
            "selection_budget",
            "selection_seed",
            "selection_held_out",
        ):
            batch.drop_column(name)
