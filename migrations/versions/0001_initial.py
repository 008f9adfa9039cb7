"""datasets and sync_runs

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql

try:  # installed, editable or not: the package sync.migrations
    from sync.migrations import resumable
except ModuleNotFoundError:  # `alembic` in a checkout whose sync/ is not the installed one
    from migrations import resumable

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out here rather than imported from sync.models: a migration must keep
# meaning what it meant when it was written, whatever the models become.
UTC_DATETIME = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
JSON_TYPE = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True), "postgresql"
)
MYSQL_TABLE_ARGS = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def upgrade() -> None:
    # Each step skips itself when done: see migrations/resumable.py.
    resumable.create_table(
        "datasets",
        sa.Column("dataset_id", sa.String(255), nullable=False),
        sa.Column("account", sa.String(255), nullable=False),
        sa.Column("name", sa.String(1024), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("creation_time", UTC_DATETIME, nullable=False),
        sa.Column("cover_asset_type", sa.String(64), nullable=True),
        sa.Column("cover_asset_id", sa.String(255), nullable=True),
        sa.Column("extra", JSON_TYPE, nullable=True),
        sa.Column("first_seen_at", UTC_DATETIME, nullable=False),
        sa.Column("updated_at", UTC_DATETIME, nullable=False),
        sa.Column("deleted_at", UTC_DATETIME, nullable=True),
        sa.Column("last_sync_run_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("dataset_id", name="pk_datasets"),
        **MYSQL_TABLE_ARGS,
    )
    resumable.create_index("ix_datasets_user_id", "datasets", ["user_id"])
    resumable.create_index("ix_datasets_creation_time", "datasets", ["creation_time"])
    resumable.create_index("ix_datasets_deleted_at", "datasets", ["deleted_at"])
    resumable.create_index("ix_datasets_account", "datasets", ["account"])

    resumable.create_table(
        "sync_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account", sa.String(255), nullable=False),
        sa.Column("started_at", UTC_DATETIME, nullable=False),
        sa.Column("finished_at", UTC_DATETIME, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("datasets_seen", sa.Integer(), nullable=False),
        sa.Column("inserted", sa.Integer(), nullable=False),
        sa.Column("updated", sa.Integer(), nullable=False),
        sa.Column("unchanged", sa.Integer(), nullable=False),
        sa.Column("deleted", sa.Integer(), nullable=False),
        sa.Column("rejected", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sync_runs"),
        **MYSQL_TABLE_ARGS,
    )
    resumable.create_index(
        "ix_sync_runs_account_started_at", "sync_runs", ["account", "started_at"]
    )


def downgrade() -> None:
    resumable.drop_index("ix_sync_runs_account_started_at", "sync_runs")
    resumable.drop_table("sync_runs")
    resumable.drop_index("ix_datasets_account", "datasets")
    resumable.drop_index("ix_datasets_deleted_at", "datasets")
    resumable.drop_index("ix_datasets_creation_time", "datasets")
    resumable.drop_index("ix_datasets_user_id", "datasets")
    resumable.drop_table("datasets")
