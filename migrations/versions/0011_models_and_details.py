"""Custom models and dataset details: models, model_history, model_training_runs,
dataset_files, the details columns of datasets, sync_runs.resource, and their views

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql, postgresql

try:  # installed, editable or not: the package sync.migrations
    from sync.migrations import resumable
except ModuleNotFoundError:  # `alembic` in a checkout whose sync/ is not the installed one
    from migrations import resumable

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
JSON_TYPE = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True), "postgresql"
)
NEW_VIEWS = ("models_current", "dataset_models")


def _details_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("details_synced_at", UTC_DATETIME, nullable=True),
        sa.Column("details_hash", sa.String(32), nullable=True),
        sa.Column("details_extra", JSON_TYPE, nullable=True),
    ]


def _model_content() -> list[sa.Column[Any]]:
    return [
        sa.Column("account", sa.String(255), nullable=False),
        sa.Column("name", sa.String(1024), nullable=False),
        sa.Column("status", sa.String(32), nullable=True),
        sa.Column("dataset_id", sa.String(255), nullable=True),
        sa.Column("custom_model_uri", sa.String(1024), nullable=True),
        sa.Column("is_owned", sa.Boolean(), nullable=False),
        sa.Column("is_available_for_generation", sa.Boolean(), nullable=False),
        sa.Column("creation_time", UTC_DATETIME, nullable=False),
        sa.Column("last_update_time", UTC_DATETIME, nullable=True),
        sa.Column("extra", JSON_TYPE, nullable=True),
    ]


def _table_args() -> dict[str, str]:
    """MariaDB/MySQL: the character set and collation `datasets` has (0007 may have made it
    a NO PAD one), so keys compare the same way in every table."""
    bind = op.get_bind()
    if bind.dialect.name not in ("mysql", "mariadb"):
        return {}
    collation = bind.execute(
        sa.text(
            "SELECT TABLE_COLLATION FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'datasets'"
        )
    ).scalar()
    return {"mysql_charset": "utf8mb4", "mysql_collate": collation or "utf8mb4_bin"}


def _age(dialect: str, column: str) -> str:
    """Whole seconds from `column` (a UTC timestamp) to now (as in 0002)."""
    if dialect == "postgresql":
        return f"CAST(FLOOR(EXTRACT(EPOCH FROM (now() - {column}))) AS BIGINT)"
    if dialect in ("mysql", "mariadb"):
        return f"TIMESTAMPDIFF(SECOND, {column}, UTC_TIMESTAMP(6))"
    return f"CAST((julianday('now') - julianday({column})) * 86400 AS INTEGER)"


def _day(dialect: str) -> str:
    if dialect == "postgresql":
        return "CAST((started_at AT TIME ZONE 'UTC') AS DATE)"
    return "DATE(started_at)"


def _integer(dialect: str, expression: str) -> str:
    kind = "SIGNED" if dialect in ("mysql", "mariadb") else "BIGINT"
    return f"CAST({expression} AS {kind})"


DATASETS_CURRENT = (
    "SELECT dataset_id, account, name, user_id, creation_time, cover_asset_type, "
    "cover_asset_id, extra, first_seen_at, updated_at, last_sync_run_id{details} "
    "FROM datasets WHERE deleted_at IS NULL"
)
DATASETS_DETAILS = ", file_count, total_file_bytes, details_synced_at"


def _sync_runs_latest(dialect: str, per_resource: bool) -> str:
    """The newest run of each account (and resource), with its last success.

    The resource comes last: PostgreSQL's CREATE OR REPLACE VIEW keeps the existing
    columns (and the view's grants) and may only add new ones at the end.
    """
    keys = "account, resource" if per_resource else "account"
    joined = "s.account = r.account" + (" AND s.resource = r.resource" if per_resource else "")
    return (
        "SELECT r.account, r.id AS run_id, r.started_at, r.finished_at, r.status, "
        "r.datasets_seen, r.inserted, r.updated, r.unchanged, r.deleted, r.rejected, r.error, "
        f"{_age(dialect, 'COALESCE(r.finished_at, r.started_at)')} AS age_seconds, "
        "s.last_success_at, "
        f"{_age(dialect, 's.last_success_at')} AS seconds_since_success"
        f"{', r.resource' if per_resource else ''} "
        "FROM sync_runs r "
        f"JOIN (SELECT {keys}, MAX(id) AS id FROM sync_runs GROUP BY {keys}) l ON l.id = r.id "
        f"LEFT JOIN (SELECT {keys}, MAX(finished_at) AS last_success_at FROM sync_runs "
        f"WHERE status = 'success' GROUP BY {keys}) s ON {joined}"
    )


SYNC_DAILY_COUNTS = (
    ("runs", "COUNT(*)"),
    ("successes", "SUM(CASE WHEN status = 'success' THEN 1 ELSE 0 END)"),
    ("failures", "SUM(CASE WHEN status IN ('failed', 'abandoned') THEN 1 ELSE 0 END)"),
    ("inserted", "SUM(inserted)"),
    ("updated", "SUM(updated)"),
    ("deleted", "SUM(deleted)"),
    ("rejected", "SUM(rejected)"),
)


def _sync_daily(dialect: str, per_resource: bool) -> str:
    """Runs and changes per UTC day and account (and resource, last: see above)."""
    day = _day(dialect)
    counts = ", ".join(
        f"{_integer(dialect, expression)} AS {column}" for column, expression in SYNC_DAILY_COUNTS
    )
    keys = f"{day}, account" + (", resource" if per_resource else "")
    return (
        f"SELECT {day} AS day, account, {counts}{', resource' if per_resource else ''} "
        f"FROM sync_runs GROUP BY {keys}"
    )


MODELS_CURRENT = (
    "SELECT model_id, account, name, status, dataset_id, custom_model_uri, is_owned, "
    "is_available_for_generation, creation_time, last_update_time, extra, first_seen_at, "
    "updated_at, last_sync_run_id, details_synced_at FROM models WHERE deleted_at IS NULL"
)

# One row per active dataset and active model trained from it, with the model's newest
# training run (by creation time, then id), if its details were fetched.
DATASET_MODELS = (
    "SELECT d.dataset_id, d.account, d.name AS dataset_name, m.model_id, "
    "m.name AS model_name, m.status AS model_status, m.is_owned, "
    "m.is_available_for_generation, m.creation_time AS model_creation_time, "
    "m.last_update_time AS model_last_update_time, "
    "t.training_run_id AS latest_training_run_id, t.status AS latest_training_status, "
    "t.creation_time AS latest_training_created_at, "
    "t.last_update_time AS latest_training_updated_at "
    "FROM datasets d "
    "JOIN models m ON m.dataset_id = d.dataset_id AND m.deleted_at IS NULL "
    "LEFT JOIN model_training_runs t ON t.model_id = m.model_id AND NOT EXISTS ("
    "SELECT 1 FROM model_training_runs n WHERE n.model_id = t.model_id AND "
    "(n.creation_time > t.creation_time OR "
    "(n.creation_time = t.creation_time AND n.training_run_id > t.training_run_id))) "
    "WHERE d.deleted_at IS NULL"
)


def upgrade() -> None:
    # Each step skips itself when done: see migrations/resumable.py.
    args = _table_args()
    for column in [
        *_details_columns(),
        sa.Column("file_count", sa.BigInteger(), nullable=True),
        sa.Column("total_file_bytes", sa.BigInteger(), nullable=True),
        sa.Column("custom_model_ids", JSON_TYPE, nullable=True),
    ]:
        resumable.add_column("datasets", column)
    resumable.add_column(
        "sync_runs",
        sa.Column("resource", sa.String(32), nullable=False, server_default="datasets"),
    )
    resumable.create_index(
        "ix_sync_runs_account_resource_id", "sync_runs", ["account", "resource", "id"]
    )
    resumable.create_table(
        "dataset_files",
        sa.Column("dataset_id", sa.String(255), nullable=False),
        sa.Column("position", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("account", sa.String(255), nullable=False),
        sa.Column("file_name", sa.String(1024), nullable=True),
        sa.Column("file_size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("extra", JSON_TYPE, nullable=True),
        sa.Column("sync_run_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("dataset_id", "position", name="pk_dataset_files"),
        **args,
    )
    resumable.create_table(
        "models",
        sa.Column("model_id", sa.String(255), nullable=False),
        *_model_content(),
        sa.Column("first_seen_at", UTC_DATETIME, nullable=False),
        sa.Column("updated_at", UTC_DATETIME, nullable=False),
        sa.Column("deleted_at", UTC_DATETIME, nullable=True),
        sa.Column("last_sync_run_id", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(32), nullable=True),
        *_details_columns(),
        sa.PrimaryKeyConstraint("model_id", name="pk_models"),
        **args,
    )
    for column in ("dataset_id", "deleted_at", "account"):
        resumable.create_index(f"ix_models_{column}", "models", [column])
    resumable.create_table(
        "model_history",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.String(255), nullable=False),
        *_model_content(),
        sa.Column("valid_from", UTC_DATETIME, nullable=False),
        sa.Column("valid_to", UTC_DATETIME, nullable=True),
        sa.Column("change_type", sa.String(16), nullable=False),
        sa.Column("sync_run_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_model_history"),
        **args,
    )
    resumable.create_index(
        "ix_model_history_model_id_valid_to", "model_history", ["model_id", "valid_to"]
    )
    resumable.create_index("ix_model_history_valid_from", "model_history", ["valid_from"])
    resumable.create_index("ix_model_history_sync_run_id", "model_history", ["sync_run_id"])
    resumable.create_table(
        "model_training_runs",
        sa.Column("training_run_id", sa.String(255), nullable=False),
        sa.Column("model_id", sa.String(255), nullable=False),
        sa.Column("account", sa.String(255), nullable=False),
        sa.Column("status", sa.String(32), nullable=True),
        sa.Column("training_steps", sa.BigInteger(), nullable=True),
        sa.Column("lora_rank", sa.BigInteger(), nullable=True),
        sa.Column("num_chips", sa.BigInteger(), nullable=True),
        sa.Column("ema", sa.Double(), nullable=True),
        sa.Column("learning_rate", sa.Double(), nullable=True),
        sa.Column("creation_time", UTC_DATETIME, nullable=False),
        sa.Column("last_update_time", UTC_DATETIME, nullable=True),
        sa.Column("extra", JSON_TYPE, nullable=True),
        sa.Column("sync_run_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("training_run_id", name="pk_model_training_runs"),
        **args,
    )
    resumable.create_index("ix_model_training_runs_model_id", "model_training_runs", ["model_id"])

    dialect = op.get_bind().dialect.name
    # New columns at the end of each view: see _sync_runs_latest.
    resumable.replace_view("datasets_current", DATASETS_CURRENT.format(details=DATASETS_DETAILS))
    resumable.replace_view("sync_runs_latest", _sync_runs_latest(dialect, per_resource=True))
    resumable.replace_view("sync_daily", _sync_daily(dialect, per_resource=True))
    resumable.replace_view("models_current", MODELS_CURRENT)
    resumable.replace_view("dataset_models", DATASET_MODELS)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for view in NEW_VIEWS:
        resumable.drop_view(view)
    # Fewer columns than now: PostgreSQL cannot replace a view by a narrower one.
    for view, select in (
        ("datasets_current", DATASETS_CURRENT.format(details="")),
        ("sync_runs_latest", _sync_runs_latest(dialect, per_resource=False)),
        ("sync_daily", _sync_daily(dialect, per_resource=False)),
    ):
        resumable.drop_view(view)
        resumable.replace_view(view, select)
    resumable.drop_table("model_training_runs")
    resumable.drop_table("model_history")
    resumable.drop_table("models")
    resumable.drop_table("dataset_files")
    resumable.drop_index("ix_sync_runs_account_resource_id", "sync_runs")
    resumable.drop_column("sync_runs", "resource")
    for column in (
        "custom_model_ids",
        "total_file_bytes",
        "file_count",
        "details_extra",
        "details_hash",
        "details_synced_at",
    ):
        resumable.drop_column("datasets", column)
