"""sync_daily: every count an integer on every backend

MariaDB/MySQL type SUM of an integer column as DECIMAL, so BI tools and drivers got the
view's sums as decimals (Python's Decimal through PyMySQL) there, and integers elsewhere.
Each count is now cast to a 64-bit integer: BIGINT on every backend, as PostgreSQL's sums
and counts already were (so PostgreSQL's view keeps its column types, and its grants).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

try:  # installed, editable or not: the package sync.migrations
    from sync.migrations import resumable
except ModuleNotFoundError:  # `alembic` in a checkout whose sync/ is not the installed one
    from migrations import resumable

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The counts, in the view's column order: (column, what it counts).
COUNTS = (
    ("runs", "COUNT(*)"),
    ("successes", "SUM(CASE WHEN status = 'success' THEN 1 ELSE 0 END)"),
    ("failures", "SUM(CASE WHEN status IN ('failed', 'abandoned') THEN 1 ELSE 0 END)"),
    ("inserted", "SUM(inserted)"),
    ("updated", "SUM(updated)"),
    ("deleted", "SUM(deleted)"),
    ("rejected", "SUM(rejected)"),
)


def _day(dialect: str, column: str) -> str:
    """The UTC calendar day of `column` (as in 0002)."""
    if dialect == "postgresql":
        return f"CAST(({column} AT TIME ZONE 'UTC') AS DATE)"
    return f"DATE({column})"


def _integer(dialect: str, expression: str) -> str:
    """`expression` as a 64-bit integer; MariaDB/MySQL's CAST knows SIGNED, not BIGINT."""
    kind = "SIGNED" if dialect in ("mysql", "mariadb") else "BIGINT"
    return f"CAST({expression} AS {kind})"


def _sync_daily(dialect: str, cast: bool) -> str:
    day = _day(dialect, "started_at")
    counts = ", ".join(
        f"{_integer(dialect, expression) if cast else expression} AS {column}"
        for column, expression in COUNTS
    )
    return f"SELECT {day} AS day, account, {counts} FROM sync_runs GROUP BY {day}, account"


def upgrade() -> None:
    # One CREATE OR REPLACE: run again after a stop, it redefines the view the same way.
    resumable.replace_view("sync_daily", _sync_daily(op.get_bind().dialect.name, cast=True))


def downgrade() -> None:
    # The view as 0002 made it (the same columns, uncast).
    resumable.replace_view("sync_daily", _sync_daily(op.get_bind().dialect.name, cast=False))
