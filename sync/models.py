"""The tables, as SQLAlchemy Core `Table`s; migrations/ builds exactly these."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so migrations can address them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# MySQL/MariaDB tables are utf8mb4 for all of Unicode, with a binary collation because
# Ideogram ids are case-sensitive ("abc" and "ABC" are different datasets). The migrations,
# which are what creates the tables, set that; it is not repeated here because a
# `mysql_*` table option makes SQLAlchemy import the MySQL dialect on every start-up.


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime stored as UTC and always read back as aware UTC.

    PostgreSQL keeps `timestamptz`; SQLite and MySQL have no zone, so the value is
    stored as naive UTC (MySQL with microseconds) and the zone is re-attached on read.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects.mysql import DATETIME

            return dialect.type_descriptor(DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; attach a timezone first")
        value = value.astimezone(UTC)
        if dialect.name == "postgresql":
            return value
        return value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# PostgreSQL gets JSONB (indexable, comparable); the others their JSON type.
# none_as_null: Python None must be SQL NULL, not the JSON literal `null`.
class _JSONType(TypeDecorator[Any]):
    """JSON, and JSONB on PostgreSQL (indexable, compared by value)."""

    impl = JSON(none_as_null=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        # Imported here: a dialect package costs tens of milliseconds to import, and
        # every command but the ones on PostgreSQL would pay for it.
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB(none_as_null=True))
        return dialect.type_descriptor(JSON(none_as_null=True))


JSONType = _JSONType()


def _details_columns() -> list[Column[Any]]:
    """What the details request of a row left: when, a digest of it, and its unknown fields."""
    return [
        Column("details_synced_at", UTCDateTime()),
        Column("details_hash", String(32)),
        Column("details_extra", JSONType),
    ]


def _dataset_content() -> list[Column[Any]]:
    """What the API tells about a dataset; the same columns in `datasets` and its history."""
    return [
        Column("account", String(255), nullable=False),
        Column("name", String(1024), nullable=False),
        Column("user_id", String(255), nullable=False),
        Column("creation_time", UTCDateTime(), nullable=False),
        Column("cover_asset_type", String(64)),
        Column("cover_asset_id", String(255)),
        Column("extra", JSONType),
    ]


datasets = Table(
    "datasets",
    metadata,
    Column("dataset_id", String(255), primary_key=True),
    *_dataset_content(),
    Column("first_seen_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("deleted_at", UTCDateTime()),
    Column("last_sync_run_id", Integer, nullable=False),
    # The parse rules' version and a digest of the content columns (sync.records.content_hash):
    # a re-run compares digests instead of reading back and comparing every column.
    Column("content_hash", String(32)),
    # From GET /datasets/{id} (sync/details.py): null until its details were fetched.
    *_details_columns(),
    Column("file_count", BigInteger),
    # The sum of the files' sizes; null when no file has a known size.
    Column("total_file_bytes", BigInteger),
    Column("custom_model_ids", JSONType),
    Index(None, "user_id"),
    Index(None, "creation_time"),
    Index(None, "deleted_at"),
    Index(None, "account"),
)

sync_runs = Table(
    "sync_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account", String(255), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime()),
    Column("status", String(16), nullable=False),
    Column("datasets_seen", Integer, nullable=False, default=0),
    Column("inserted", Integer, nullable=False, default=0),
    Column("updated", Integer, nullable=False, default=0),
    Column("unchanged", Integer, nullable=False, default=0),
    Column("deleted", Integer, nullable=False, default=0),
    Column("rejected", Integer, nullable=False, default=0),
    Column("error", Text),
    # The daemon's schedule slot this run was for (null for `run`): replicas
    # sharing a database use it to sync each slot exactly once.
    Column("scheduled_for", UTCDateTime()),
    # A digest of the listing body a successful run read (with the parser and schema
    # version): the next run skips re-reading a byte-identical listing.
    Column("listing_digest", String(64)),
    # What the run synced: datasets, dataset_details, models or model_details.
    Column("resource", String(32), nullable=False, server_default="datasets"),
    Index(None, "account", "started_at"),
    Index(None, "account", "scheduled_for"),
    Index(None, "account", "resource", "id"),
)

# One row per version of a dataset (a type-2 slowly changing dimension): the
# dataset's columns as they were from valid_from until valid_to (null: current).
dataset_history = Table(
    "dataset_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("dataset_id", String(255), nullable=False),
    *_dataset_content(),
    Column("valid_from", UTCDateTime(), nullable=False),
    Column("valid_to", UTCDateTime()),
    Column("change_type", String(16), nullable=False),
    Column("sync_run_id", Integer, nullable=False),
    Index(None, "dataset_id", "valid_to"),
    Index(None, "valid_from"),
    Index(None, "sync_run_id"),
)

# The files of each dataset, as its last fetched details listed them (replaced whole when
# those change).
dataset_files = Table(
    "dataset_files",
    metadata,
    Column("dataset_id", String(255), primary_key=True),
    # The file's place in the details' list, from 0.
    Column("position", Integer, primary_key=True, autoincrement=False),
    Column("account", String(255), nullable=False),
    Column("file_name", String(1024)),
    Column("file_size_bytes", BigInteger),
    Column("extra", JSONType),
    Column("sync_run_id", Integer, nullable=False),
)


def _model_content() -> list[Column[Any]]:
    """What GET /models tells about a model; the same columns in `models` and its history."""
    return [
        Column("account", String(255), nullable=False),
        Column("name", String(1024), nullable=False),
        Column("status", String(32)),
        Column("dataset_id", String(255)),
        Column("custom_model_uri", String(1024)),
        Column("is_owned", Boolean, nullable=False),
        Column("is_available_for_generation", Boolean, nullable=False),
        Column("creation_time", UTCDateTime(), nullable=False),
        Column("last_update_time", UTCDateTime()),
        Column("extra", JSONType),
    ]


models = Table(
    "models",
    metadata,
    Column("model_id", String(255), primary_key=True),
    *_model_content(),
    Column("first_seen_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("deleted_at", UTCDateTime()),
    Column("last_sync_run_id", Integer, nullable=False),
    Column("content_hash", String(32)),
    # From GET /models/{id} (owned models only): null until fetched.
    *_details_columns(),
    Index(None, "dataset_id"),
    Index(None, "deleted_at"),
    Index(None, "account"),
)

model_history = Table(
    "model_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_id", String(255), nullable=False),
    *_model_content(),
    Column("valid_from", UTCDateTime(), nullable=False),
    Column("valid_to", UTCDateTime()),
    Column("change_type", String(16), nullable=False),
    Column("sync_run_id", Integer, nullable=False),
    Index(None, "model_id", "valid_to"),
    Index(None, "valid_from"),
    Index(None, "sync_run_id"),
)

# The training runs of each owned model, as its last fetched details listed them.
model_training_runs = Table(
    "model_training_runs",
    metadata,
    Column("training_run_id", String(255), primary_key=True),
    Column("model_id", String(255), nullable=False),
    Column("account", String(255), nullable=False),
    Column("status", String(32)),
    Column("training_steps", BigInteger),
    Column("lora_rank", BigInteger),
    Column("num_chips", BigInteger),
    Column("ema", Double),
    Column("learning_rate", Double),
    Column("creation_time", UTCDateTime(), nullable=False),
    Column("last_update_time", UTCDateTime()),
    Column("extra", JSONType),
    Column("sync_run_id", Integer, nullable=False),
    Index(None, "model_id"),
)

# One row per notice sent to the [notify] webhook (sync/notify.py): its key is claimed
# before sending, so that daemon replicas send each notice once.
sync_notices = Table(
    "sync_notices",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("event", String(16), nullable=False),
    Column("account", String(255), nullable=False),
    Column("resource", String(32), nullable=False),
    Column("run_id", Integer),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("delivered", Boolean, nullable=False),
)

CHANGE_INSERT = "insert"
CHANGE_UPDATE = "update"
CHANGE_DELETE = "delete"
CHANGE_RESTORE = "restore"

# One row per account while a run holds its lease (see sync/lock.py).
sync_locks = Table(
    "sync_locks",
    metadata,
    Column("account", String(255), primary_key=True),
    Column("owner", String(255), nullable=False),
    Column("acquired_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
)


@dataclass(frozen=True)
class Counts:
    """What one sync did to the table (the counters of its sync_runs row)."""

    seen: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    rejected: int = 0


RUN_RUNNING = "running"
RUN_SUCCESS = "success"
RUN_FAILED = "failed"
RUN_ABANDONED = "abandoned"
