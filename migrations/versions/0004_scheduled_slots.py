"""sync_runs.scheduled_for: the schedule slot a daemon run was for

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

try:  # installed, editable or not: the package sync.migrations
    from sync.migrations import resumable
except ModuleNotFoundError:  # `alembic` in a checkout whose sync/ is not the installed one
    from migrations import resumable

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    # Each step skips itself when done: see migrations/resumable.py. Adding a column and an
    # index needs no batch mode on SQLite (it ALTERs in place).
    resumable.add_column("sync_runs", sa.Column("scheduled_for", UTC_DATETIME, nullable=True))
    resumable.create_index(
        "ix_sync_runs_account_scheduled_for", "sync_runs", ["account", "scheduled_for"]
    )


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        # Batch mode rebuilds the table under a temporary name; without this, SQLite
        # refuses the final rename because the views name sync_runs.
        op.execute("PRAGMA legacy_alter_table = ON")
    with op.batch_alter_table("sync_runs") as batch:
        # Only what is still there: a stopped downgrade is finished by running it again.
        if resumable.has_index("sync_runs", "ix_sync_runs_account_scheduled_for"):
            batch.drop_index("ix_sync_runs_account_scheduled_for")
        if resumable.has_column("sync_runs", "scheduled_for"):
            batch.drop_column("scheduled_for")
    if sqlite:
        op.execute("PRAGMA legacy_alter_table = OFF")
