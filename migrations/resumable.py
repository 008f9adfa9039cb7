"""Migration steps that may run twice: each looks at the live schema and skips what is done.

MariaDB/MySQL commit every DDL statement as it runs, together with whatever the migration
had written before it, so a migration stopped part-way (kill -9, SIGTERM, a lost connection)
keeps the steps it made while alembic_version still names the revision before. The next
`migrate` runs that migration again from its start, and every step must then find its own
work already done and go on to the next. Each CREATE/ALTER/DROP is one statement, which
MariaDB 10.6+ and MySQL 8 apply whole or not at all, so "done" is a plain look at the
catalog. Data steps are written so that a second run changes nothing (see 0002 and 0005).

PostgreSQL and SQLite run the same steps: their DDL is transactional, an interrupted
migration is rolled back whole, and the checks there simply find every step still to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op


def _inspector() -> sa.Inspector:
    # A fresh inspector for each look: one kept around caches what it saw before a step.
    return sa.inspect(op.get_bind())


def has_table(name: str) -> bool:
    """Whether table `name` exists."""
    return _inspector().has_table(name)


def has_column(table: str, column: str) -> bool:
    """Whether `table` has `column` (False when the table is missing too)."""
    if not has_table(table):
        return False
    return any(c["name"] == column for c in _inspector().get_columns(table))


def has_index(table: str, name: str) -> bool:
    """Whether `table` has the index `name` (False when the table is missing too)."""
    if not has_table(table):
        return False
    return any(i["name"] == name for i in _inspector().get_indexes(table))


def create_table(name: str, *columns: Any, **kwargs: Any) -> None:
    """`op.create_table`, unless the table is there already."""
    if not has_table(name):
        op.create_table(name, *columns, **kwargs)


def create_index(name: str, table: str, columns: Sequence[str], **kwargs: Any) -> None:
    """`op.create_index`, unless the index is there already."""
    if not has_index(table, name):
        op.create_index(name, table, list(columns), **kwargs)


def add_column(table: str, column: sa.Column[Any]) -> None:
    """`op.add_column`, unless the column is there already."""
    if not has_column(table, column.name):
        op.add_column(table, column)


def drop_column(table: str, column: str) -> None:
    """Drop `column` of `table` (batch mode, for SQLite), unless it is gone already."""
    if not has_column(table, column):
        return
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        # Batch mode rebuilds the table under a temporary name; without this, SQLite
        # refuses the final rename because the views name the table.
        op.execute("PRAGMA legacy_alter_table = ON")
    with op.batch_alter_table(table) as batch:
        batch.drop_column(column)
    if sqlite:
        op.execute("PRAGMA legacy_alter_table = OFF")


def drop_index(name: str, table: str) -> None:
    """`op.drop_index`, unless the index is gone already."""
    if has_index(table, name):
        op.drop_index(name, table_name=table)


def drop_table(name: str) -> None:
    """`op.drop_table`, unless the table is gone already."""
    if has_table(name):
        op.drop_table(name)


def replace_view(name: str, select: str) -> None:
    """Create view `name` as `select`, or redefine it if it exists."""
    if op.get_bind().dialect.name == "sqlite":
        # SQLite has no CREATE OR REPLACE VIEW; its DDL is transactional, so the two
        # statements still take effect together.
        op.execute(f"DROP VIEW IF EXISTS {name}")
        op.execute(f"CREATE VIEW {name} AS {select}")
        return
    # One statement on MariaDB/MySQL: no moment without the view. On PostgreSQL a replaced
    # view keeps its grants (a dropped one takes them along), but must keep its columns'
    # names and types: a view whose columns change needs drop_view first.
    op.execute(f"CREATE OR REPLACE VIEW {name} AS {select}")


def drop_view(name: str) -> None:
    """Drop view `name`, unless it is gone already."""
    op.execute(f"DROP VIEW IF EXISTS {name}")
