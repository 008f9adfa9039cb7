"""datasets.record_digest dropped: the content hash is of the record's text, under a version

A run recognised a record whose JSON text was unchanged by this digest and did not parse it
again, and nothing told a new column or a fixed parse to reach such rows. The content hash
now is the hash of the record's text under a version of the parse rules
(sync.records.HASH_VERSION): a new version makes every stored hash differ, so every record
is parsed again, and only rows whose columns differ are updated.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa

try:  # installed, editable or not: the package sync.migrations
    from sync.migrations import resumable
except ModuleNotFoundError:  # `alembic` in a checkout whose sync/ is not the installed one
    from migrations import resumable

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Skips itself when done: see migrations/resumable.py.
    resumable.drop_column("datasets", "record_digest")


def downgrade() -> None:
    # Skips itself when done: see migrations/resumable.py. The next run of the version
    # that used it fills it in.
    resumable.add_column("datasets", sa.Column("record_digest", sa.String(32), nullable=True))
