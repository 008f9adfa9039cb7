"""sync_runs.scheduled_for: the schedule slot a daemon run was for

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    with op.batch_alter_table("sync_runs") as batch:
        batch.add_column(sa.Column("scheduled_for", UTC_DATETIME, nullable=True))
        batch.create_index(
            "ix_sync_runs_account_scheduled_for", ["account", "scheduled_for"], unique=False
        )


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        # Batch mode rebuilds the table under a temporary name; without this, SQLite
        # refuses the final rename because the views name sync_runs.
        op.execute("PRAGMA legacy_alter_table = ON")
    with op.batch_alter_table("sync_runs") as batch:
        batch.drop_index("ix_sync_runs_account_scheduled_for")
        batch.drop_column("scheduled_for")
    if sqlite:
        op.execute("PRAGMA legacy_alter_table = OFF")
