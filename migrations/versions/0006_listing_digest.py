"""sync_runs.listing_digest: a digest of the listing a run saw, to skip re-reading it unchanged

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

try:  # installed, editable or not: the package sync.migrations
    from sync.migrations import resumable
except ModuleNotFoundError:  # `alembic` in a checkout whose sync/ is not the installed one
    from migrations import resumable

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Skips itself when done: see migrations/resumable.py.
    resumable.add_column("sync_runs", sa.Column("listing_digest", sa.String(64), nullable=True))


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        # Batch mode rebuilds the table under a temporary name; without this, SQLite
        # refuses the final rename because the views name sync_runs.
        op.execute("PRAGMA legacy_alter_table = ON")
    with op.batch_alter_table("sync_runs") as batch:
        # Only if still there: a stopped downgrade is finished by running it again.
        if resumable.has_column("sync_runs", "listing_digest"):
            batch.drop_column("listing_digest")
    if sqlite:
        op.execute("PRAGMA legacy_alter_table = OFF")
