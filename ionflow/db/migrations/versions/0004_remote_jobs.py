"""Reference calculations through AiiDA: the ``remote_job`` table (a batch submitted to a remote
engine, written before it is submitted so that a resumed campaign finds it again) and, on each
calculation, the job and the AiiDA node that computed it. Existing rows: NULL (computed locally).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from ionflow.db.views import create_views, drop_views

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "remote_job",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("iteration_id", sa.Integer(), nullable=False),
        sa.Column("engine", sa.String(), nullable=False),
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("structure_ids", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("profile", sa.String(), nullable=True),
        sa.Column("computer", sa.String(), nullable=True),
        sa.Column("node_uuid", sa.String(length=36), nullable=True),
        sa.Column("node_pk", sa.Integer(), nullable=True),
        sa.Column("exit_status", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("collected_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("state IN ('submitting', 'running', 'collected')", name=op.f("ck_remote_job_state")),
        sa.CheckConstraint("engine IN ('aiida')", name=op.f("ck_remote_job_engine")),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaign.id"], name=op.f("fk_remote_job_campaign_id_campaign")),
        sa.ForeignKeyConstraint(["iteration_id"], ["iteration.id"], name=op.f("fk_remote_job_iteration_id_iteration")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_remote_job")),
        sa.UniqueConstraint("key", name=op.f("uq_remote_job_key")),
    )
    op.create_index(op.f("ix_remote_job_campaign_id"), "remote_job", ["campaign_id"])
    op.create_index(op.f("ix_remote_job_iteration_id"), "remote_job", ["iteration_id"])
    drop_views(op.get_bind())  # SQLite rebuilds the table; views on it must not be in the way
    with op.batch_alter_table("calculation") as batch:
        batch.add_column(sa.Column("remote_job_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("aiida_uuid", sa.String(length=36), nullable=True))
        batch.create_foreign_key(
            op.f("fk_calculation_remote_job_id_remote_job"), "remote_job", ["remote_job_id"], ["id"]
        )
        batch.create_index(op.f("ix_calculation_remote_job_id"), ["remote_job_id"])
    create_views(op.get_bind())


def downgrade() -> None:
    drop_views(op.get_bind())
    with op.batch_alter_table("calculation") as batch:
        batch.drop_index(op.f("ix_calculation_remote_job_id"))
        batch.drop_constraint(op.f("fk_calculation_remote_job_id_remote_job"), type_="foreignkey")
        batch.drop_column("aiida_uuid")
        batch.drop_column("remote_job_id")
    create_views(op.get_bind())
    op.drop_index(op.f("ix_remote_job_iteration_id"), table_name="remote_job")
    op.drop_index(op.f("ix_remote_job_campaign_id"), table_name="remote_job")
    op.drop_table("remote_job")
