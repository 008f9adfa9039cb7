"""dataset_history (type-2 history) and the BI views

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql, postgresql

try:  # installed, editable or not: the package sync.migrations
    from sync.migrations import resumable
except ModuleNotFoundError:  # `alembic` in a checkout whose sync/ is not the installed one
    from migrations import resumable

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
JSON_TYPE = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True), "postgresql"
)
MYSQL_TABLE_ARGS = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}
VIEWS = ("datasets_current", "sync_runs_latest", "sync_daily")


def _age(dialect: str, column: str) -> str:
    """Whole seconds from `column` (a UTC timestamp) to now, in the dialect's own terms."""
    if dialect == "postgresql":
        return f"CAST(FLOOR(EXTRACT(EPOCH FROM (now() - {column}))) AS BIGINT)"
    if dialect in ("mysql", "mariadb"):
        return f"TIMESTAMPDIFF(SECOND, {column}, UTC_TIMESTAMP(6))"
    return f"CAST((julianday('now') - julianday({column})) * 86400 AS INTEGER)"


def _day(dialect: str, column: str) -> str:
    """The UTC calendar day of `column`."""
    if dialect == "postgresql":
        return f"CAST(({column} AT TIME ZONE 'UTC') AS DATE)"
    return f"DATE({column})"


def upgrade() -> None:
    # Each step skips itself when done: see migrations/resumable.py.
    resumable.create_table(
        "dataset_history",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("dataset_id", sa.String(255), nullable=False),
        sa.Column("account", sa.String(255), nullable=False),
        sa.Column("name", sa.String(1024), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("creation_time", UTC_DATETIME, nullable=False),
        sa.Column("cover_asset_type", sa.String(64), nullable=True),
        sa.Column("cover_asset_id", sa.String(255), nullable=True),
        sa.Column("extra", JSON_TYPE, nullable=True),
        sa.Column("valid_from", UTC_DATETIME, nullable=False),
        sa.Column("valid_to", UTC_DATETIME, nullable=True),
        sa.Column("change_type", sa.String(16), nullable=False),
        sa.Column("sync_run_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_dataset_history"),
        **MYSQL_TABLE_ARGS,
    )
    resumable.create_index(
        "ix_dataset_history_dataset_id_valid_to", "dataset_history", ["dataset_id", "valid_to"]
    )
    resumable.create_index("ix_dataset_history_valid_from", "dataset_history", ["valid_from"])
    resumable.create_index("ix_dataset_history_sync_run_id", "dataset_history", ["sync_run_id"])

    # Backfill: every dataset already stored gets one current version, as of its
    # last change; a soft-deleted one is current as a `delete` version. Only datasets
    # without a version: on MariaDB/MySQL the next CREATE VIEW commits this INSERT, and
    # a migration stopped after that runs it again.
    op.execute(
        "INSERT INTO dataset_history (dataset_id, account, name, user_id, creation_time, "
        "cover_asset_type, cover_asset_id, extra, valid_from, valid_to, change_type, sync_run_id) "
        "SELECT dataset_id, account, name, user_id, creation_time, cover_asset_type, "
        "cover_asset_id, extra, updated_at, NULL, "
        "CASE WHEN deleted_at IS NULL THEN 'insert' ELSE 'delete' END, last_sync_run_id "
        "FROM datasets d WHERE NOT EXISTS "
        "(SELECT 1 FROM dataset_history h WHERE h.dataset_id = d.dataset_id)"
    )

    dialect = op.get_bind().dialect.name
    resumable.replace_view(
        "datasets_current",
        "SELECT dataset_id, account, name, user_id, creation_time, cover_asset_type, "
        "cover_asset_id, extra, first_seen_at, updated_at, last_sync_run_id "
        "FROM datasets WHERE deleted_at IS NULL",
    )
    resumable.replace_view(
        "sync_runs_latest",
        "SELECT r.account, r.id AS run_id, r.started_at, r.finished_at, r.status, "
        "r.datasets_seen, r.inserted, r.updated, r.unchanged, r.deleted, r.rejected, r.error, "
        f"{_age(dialect, 'COALESCE(r.finished_at, r.started_at)')} AS age_seconds, "
        "s.last_success_at, "
        f"{_age(dialect, 's.last_success_at')} AS seconds_since_success "
        "FROM sync_runs r "
        "JOIN (SELECT account, MAX(id) AS id FROM sync_runs GROUP BY account) l ON l.id = r.id "
        "LEFT JOIN (SELECT account, MAX(finished_at) AS last_success_at FROM sync_runs "
        "WHERE status = 'success' GROUP BY account) s ON s.account = r.account",
    )
    day = _day(dialect, "started_at")
    resumable.replace_view(
        "sync_daily",
        f"SELECT {day} AS day, account, COUNT(*) AS runs, "
        "SUM(CASE WHEN status = 'success' THEN 1 ELSE 0 END) AS successes, "
        "SUM(CASE WHEN status IN ('failed', 'abandoned') THEN 1 ELSE 0 END) AS failures, "
        "SUM(inserted) AS inserted, SUM(updated) AS updated, SUM(deleted) AS deleted, "
        "SUM(rejected) AS rejected "
        f"FROM sync_runs GROUP BY {day}, account",
    )


def downgrade() -> None:
    for view in reversed(VIEWS):
        resumable.drop_view(view)
    resumable.drop_index("ix_dataset_history_sync_run_id", "dataset_history")
    resumable.drop_index("ix_dataset_history_valid_from", "dataset_history")
    resumable.drop_index("ix_dataset_history_dataset_id_valid_to", "dataset_history")
    resumable.drop_table("dataset_history")
