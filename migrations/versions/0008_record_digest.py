"""datasets.record_digest: a digest of each record's JSON text, to skip decoding it unchanged

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

Existing rows start without one (NULL); the next run that reads their records fills it in
without counting or recording a change.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("record_digest", sa.String(32), nullable=True))


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        # Batch mode rebuilds the table under a temporary name; without this, SQLite
        # refuses the final rename because the views name datasets.
        op.execute("PRAGMA legacy_alter_table = ON")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("record_digest")
    if sqlite:
        op.execute("PRAGMA legacy_alter_table = OFF")
