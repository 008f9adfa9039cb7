"""datasets.record_digest: a digest of each record's JSON text, to skip decoding it unchanged

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

Existing rows start without one (NULL); the next run that reads their records fills it in
without counting or recording a change.
"""

from collections.abc import Sequence

import sqlalchemy as sa

try:  # installed, editable or not: the package sync.migrations
    from sync.migrations import resumable
except ModuleNotFoundError:  # `alembic` in a checkout whose sync/ is not the installed one
    from migrations import resumable

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Skips itself when done: see migrations/resumable.py.
    resumable.add_column("datasets", sa.Column("record_digest", sa.String(32), nullable=True))


def downgrade() -> None:
    # Skips itself when done: see migrations/resumable.py.
    resumable.drop_column("datasets", "record_digest")
