"""The CPU seconds of each reference calculation (all the code's threads and processes), for
the learning curve's cost axis; NULL where it is not known (calculations made before, or killed).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("calculation") as batch:
        batch.add_column(sa.Column("cpu_time_s", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("calculation") as batch:
        batch.drop_column("cpu_time_s")
