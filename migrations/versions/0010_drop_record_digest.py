"""datasets.record_digest dropped: every record is parsed on every run

A run recognised a record whose JSON text was unchanged by this digest and did not parse it
again, so a new column or a fixed parse never reached such rows. Records are now always
parsed, and the content hash carries the version of the rules it was made by
(sync.records.HASH_VERSION): rows stored under older rules are compared column by column on
the next run, and only those whose columns differ are updated.

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
