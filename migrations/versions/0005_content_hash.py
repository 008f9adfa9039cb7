"""datasets.content_hash: a digest of each row's content, so re-runs compare digests

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

try:  # installed, editable or not: the package sync.migrations
    from sync.migrations import resumable
except ModuleNotFoundError:  # `alembic` in a checkout whose sync/ is not the installed one
    from migrations import resumable

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 1000


def content_hash(
    name: str,
    user_id: str,
    creation_time: datetime,
    cover_asset_type: str | None,
    cover_asset_id: str | None,
    extra: dict[str, Any] | None,
) -> str:
    """Frozen copy of sync.records.content_hash as of this migration (a test keeps them equal)."""
    canonical = repr((name, user_id, creation_time.isoformat(), cover_asset_type, cover_asset_id))
    if extra is not None:
        canonical += json.dumps(extra, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(canonical.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _utc(value: datetime | str) -> datetime:
    if isinstance(value, str):  # SQLite hands DATETIME back as text
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def upgrade() -> None:
    # Skips itself when done: see migrations/resumable.py.
    resumable.add_column("datasets", sa.Column("content_hash", sa.String(32), nullable=True))
    # Backfill from what is stored. A number that a JSON column normalised (PostgreSQL
    # JSONB turns 1e23 into an integer) may hash differently from the API's spelling;
    # such a row is rewritten once, as an update, on its next sync. Only rows without a
    # digest: run again after a stop (MariaDB/MySQL keep the new column), it redoes nothing
    # that was kept.
    datasets = sa.table(
        "datasets",
        sa.column("dataset_id", sa.String),
        sa.column("name", sa.String),
        sa.column("user_id", sa.String),
        sa.column("creation_time", sa.DateTime(timezone=True)),
        sa.column("cover_asset_type", sa.String),
        sa.column("cover_asset_id", sa.String),
        sa.column("extra", sa.JSON(none_as_null=True)),
        sa.column("content_hash", sa.String),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(
            datasets.c.dataset_id,
            datasets.c.name,
            datasets.c.user_id,
            datasets.c.creation_time,
            datasets.c.cover_asset_type,
            datasets.c.cover_asset_id,
            datasets.c.extra,
        ).where(datasets.c.content_hash.is_(None))
    ).all()
    update = (
        sa.update(datasets)
        .where(datasets.c.dataset_id == sa.bindparam("id"))
        .values(content_hash=sa.bindparam("digest"))
    )
    params = [
        {
            "id": r.dataset_id,
            "digest": content_hash(
                r.name,
                r.user_id,
                _utc(r.creation_time),
                r.cover_asset_type,
                r.cover_asset_id,
                r.extra or None,
            ),
        }
        for r in rows
    ]
    for start in range(0, len(params), BATCH):
        conn.execute(update, params[start : start + BATCH])


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        # See 0004: the views name the table that batch mode rebuilds.
        op.execute("PRAGMA legacy_alter_table = ON")
    with op.batch_alter_table("datasets") as batch:
        # Only if still there: a stopped downgrade is finished by running it again.
        if resumable.has_column("datasets", "content_hash"):
            batch.drop_column("content_hash")
    if sqlite:
        op.execute("PRAGMA legacy_alter_table = OFF")
