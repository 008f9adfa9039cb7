"""MariaDB/MySQL: a NO PAD binary collation, so ids that differ by trailing spaces stay apart

utf8mb4_bin is a PAD SPACE collation: 'a' and 'a ' compare equal, so the primary key merged
two Ideogram datasets into one row. MariaDB's utf8mb4_nopad_bin and MySQL 8's
utf8mb4_0900_bin compare every byte. Other backends compare exactly already.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25
"""

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")

TABLES = ("datasets", "dataset_history", "sync_runs", "sync_locks")
NO_PAD = ("utf8mb4_nopad_bin", "utf8mb4_0900_bin")


def _convert(collation: str) -> None:
    for table in TABLES:
        # Run again after a stop, a table converted before it is skipped: converting it
        # once more would change nothing, but rebuild every row of it.
        if not _collated(table, collation):
            op.execute(f"ALTER TABLE {table} CONVERT TO CHARACTER SET utf8mb4 COLLATE {collation}")


def _collated(table: str, collation: str) -> bool:
    """Whether `table` and every text column of it have `collation` already."""
    bind = op.get_bind()
    where = {"table": table}
    found = bind.execute(
        sa.text(
            "SELECT TABLE_COLLATION FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :table"
        ),
        where,
    ).scalars()
    columns = bind.execute(
        sa.text(
            "SELECT COLLATION_NAME FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :table "
            "AND COLLATION_NAME IS NOT NULL"
        ),
        where,
    ).scalars()
    return {*found, *columns} == {collation}


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name not in ("mysql", "mariadb"):
        return
    available = {
        row[0]
        for row in bind.execute(
            sa.text(
                "SELECT COLLATION_NAME FROM information_schema.COLLATIONS "
                "WHERE COLLATION_NAME IN ('utf8mb4_nopad_bin', 'utf8mb4_0900_bin')"
            )
        )
    }
    chosen = next((name for name in NO_PAD if name in available), None)
    if chosen is None:
        # MySQL 5.7 has neither; ids differing only by trailing spaces still collide there.
        log.warning("no NO PAD binary collation on this server; keeping utf8mb4_bin")
        return
    # Distinct under PAD SPACE means distinct under NO PAD: no key can collide.
    _convert(chosen)


def downgrade() -> None:
    if op.get_bind().dialect.name in ("mysql", "mariadb"):
        # Fails if ids differing only by trailing spaces were stored since: they would collide.
        _convert("utf8mb4_bin")
