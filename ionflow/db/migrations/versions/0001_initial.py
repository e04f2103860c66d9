"""Initial schema: campaign, iteration, structure, calculation, model, training members, MD run,
campaign membership of structures, selection decision.

Written by hand to match ionflow/db/models.py; tests/db/test_db.py checks with
alembic's autogenerate comparison that nothing differs. Constraint names follow
the naming convention in models.NAMING_CONVENTION.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer(), nullable=False)


def _created_at() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def _hash(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.String(length=64), nullable=nullable)


def _index(table: str, column: str, unique: bool = False) -> None:
    op.create_index(op.f(f"ix_{table}_{column}"), table, [column], unique=unique)


def upgrade() -> None:
    op.create_table(
        "campaign",
        _id(),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        _hash("config_hash"),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("workdir", sa.String(), nullable=False),
        _created_at(),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("prefect_flow_run_id", sa.String(), nullable=True),
        sa.CheckConstraint("status IN ('running', 'finished', 'stopped', 'failed')", name=op.f("ck_campaign_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaign")),
        sa.UniqueConstraint("name", name=op.f("uq_campaign_name")),
    )

    op.create_table(
        "iteration",
        _id(),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("prefect_flow_run_id", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaign.id"], name=op.f("fk_iteration_campaign_id_campaign")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_iteration")),
        sa.UniqueConstraint("campaign_id", "index", name=op.f("uq_iteration_campaign_id_index")),
    )

    op.create_table(
        "structure",
        _id(),
        _hash("hash"),
        sa.Column("formula", sa.String(), nullable=False),
        sa.Column("n_atoms", sa.Integer(), nullable=False),
        sa.Column("charge", sa.Integer(), nullable=False),
        sa.Column("multiplicity", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_structure")),
        sa.UniqueConstraint("hash", name=op.f("uq_structure_hash")),
    )

    op.create_table(
        "calculation",
        _id(),
        sa.Column("structure_id", sa.Integer(), nullable=False),
        sa.Column("adapter", sa.String(), nullable=False),
        sa.Column("code_version", sa.String(), nullable=False),
        _hash("settings_hash"),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("energy", sa.Double(), nullable=True),
        sa.Column("results_path", sa.String(), nullable=True),
        _hash("results_sha256", nullable=True),
        sa.Column("wall_time_s", sa.Double(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("host", sa.String(), nullable=True),
        sa.Column("run_dir", sa.String(), nullable=True),
        sa.Column("iteration_id", sa.Integer(), nullable=True),
        _created_at(),
        sa.CheckConstraint("status IN ('ok', 'failed', 'unconverged', 'timeout')", name=op.f("ck_calculation_status")),
        sa.ForeignKeyConstraint(["iteration_id"], ["iteration.id"], name=op.f("fk_calculation_iteration_id_iteration")),
        sa.ForeignKeyConstraint(["structure_id"], ["structure.id"], name=op.f("fk_calculation_structure_id_structure")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calculation")),
        sa.UniqueConstraint("structure_id", "settings_hash", name=op.f("uq_calculation_structure_id_settings_hash")),
    )
    for column in ("settings_hash", "iteration_id"):
        _index("calculation", column)

    op.create_table(
        "model",
        _id(),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("iteration_id", sa.Integer(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("checkpoint_path", sa.String(), nullable=False),
        _hash("checkpoint_sha256"),
        _created_at(),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaign.id"], name=op.f("fk_model_campaign_id_campaign")),
        sa.ForeignKeyConstraint(["iteration_id"], ["iteration.id"], name=op.f("fk_model_iteration_id_iteration")),
        sa.ForeignKeyConstraint(["parent_id"], ["model.id"], name=op.f("fk_model_parent_id_model")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model")),
        sa.UniqueConstraint("campaign_id", "version", name=op.f("uq_model_campaign_id_version")),
    )
    for column in ("iteration_id", "parent_id"):
        _index("model", column)

    op.create_table(
        "model_training_member",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("calculation_id", sa.Integer(), nullable=False),
        sa.Column("split", sa.String(), nullable=False),
        sa.CheckConstraint("split IN ('train', 'valid')", name=op.f("ck_model_training_member_split")),
        sa.ForeignKeyConstraint(
            ["calculation_id"],
            ["calculation.id"],
            name=op.f("fk_model_training_member_calculation_id_calculation"),
        ),
        sa.ForeignKeyConstraint(["model_id"], ["model.id"], name=op.f("fk_model_training_member_model_id_model")),
        sa.PrimaryKeyConstraint("model_id", "calculation_id", name=op.f("pk_model_training_member")),
    )
    _index("model_training_member", "calculation_id")

    op.create_table(
        "md_run",
        _id(),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("iteration_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=True),
        sa.Column("start_structure_id", sa.Integer(), nullable=False),
        sa.Column("walker", sa.Integer(), nullable=False),
        sa.Column("temperature_K", sa.Double(), nullable=False),
        sa.Column("timestep_fs", sa.Double(), nullable=False),
        sa.Column("n_steps_requested", sa.Integer(), nullable=False),
        sa.Column("n_steps_done", sa.Integer(), nullable=False),
        sa.Column("stop_reason", sa.String(), nullable=False),
        sa.Column("trajectory_path", sa.String(), nullable=True),
        sa.Column("wall_time_s", sa.Double(), nullable=False),
        _created_at(),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaign.id"], name=op.f("fk_md_run_campaign_id_campaign")),
        sa.ForeignKeyConstraint(["iteration_id"], ["iteration.id"], name=op.f("fk_md_run_iteration_id_iteration")),
        sa.ForeignKeyConstraint(["model_id"], ["model.id"], name=op.f("fk_md_run_model_id_model")),
        sa.ForeignKeyConstraint(
            ["start_structure_id"], ["structure.id"], name=op.f("fk_md_run_start_structure_id_structure")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_md_run")),
    )
    for column in ("campaign_id", "iteration_id", "model_id", "start_structure_id"):
        _index("md_run", column)

    op.create_table(
        "campaign_structure",
        _id(),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("structure_id", sa.Integer(), nullable=False),
        sa.Column("iteration_id", sa.Integer(), nullable=True),
        sa.Column("md_run_id", sa.Integer(), nullable=True),
        sa.Column("origin", sa.String(), nullable=False),
        _created_at(),
        sa.ForeignKeyConstraint(
            ["campaign_id"], ["campaign.id"], name=op.f("fk_campaign_structure_campaign_id_campaign")
        ),
        sa.ForeignKeyConstraint(
            ["iteration_id"], ["iteration.id"], name=op.f("fk_campaign_structure_iteration_id_iteration")
        ),
        sa.ForeignKeyConstraint(["md_run_id"], ["md_run.id"], name=op.f("fk_campaign_structure_md_run_id_md_run")),
        sa.ForeignKeyConstraint(
            ["structure_id"], ["structure.id"], name=op.f("fk_campaign_structure_structure_id_structure")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaign_structure")),
        sa.UniqueConstraint("campaign_id", "structure_id", name=op.f("uq_campaign_structure_campaign_id_structure_id")),
    )
    for column in ("structure_id", "iteration_id", "md_run_id"):
        _index("campaign_structure", column)

    op.create_table(
        "selection_decision",
        _id(),
        sa.Column("iteration_id", sa.Integer(), nullable=False),
        sa.Column("structure_id", sa.Integer(), nullable=False),
        sa.Column("md_run_id", sa.Integer(), nullable=True),
        sa.Column("score", sa.Double(), nullable=False),
        sa.Column("energy_uncertainty", sa.Double(), nullable=True),
        sa.Column("threshold", sa.Double(), nullable=False),
        sa.Column("chosen", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        _created_at(),
        sa.ForeignKeyConstraint(
            ["iteration_id"], ["iteration.id"], name=op.f("fk_selection_decision_iteration_id_iteration")
        ),
        sa.ForeignKeyConstraint(["md_run_id"], ["md_run.id"], name=op.f("fk_selection_decision_md_run_id_md_run")),
        sa.ForeignKeyConstraint(
            ["structure_id"], ["structure.id"], name=op.f("fk_selection_decision_structure_id_structure")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_selection_decision")),
        sa.UniqueConstraint(
            "iteration_id", "structure_id", name=op.f("uq_selection_decision_iteration_id_structure_id")
        ),
    )
    for column in ("structure_id", "md_run_id"):
        _index("selection_decision", column)


def downgrade() -> None:
    # dependants first: every foreign key points at a table dropped later
    for table in (
        "selection_decision",
        "campaign_structure",
        "md_run",
        "model_training_member",
        "model",
        "calculation",
        "structure",
        "iteration",
        "campaign",
    ):
        op.drop_table(table)
