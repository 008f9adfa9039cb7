"""A large first load into empty tables builds their indexes after the rows (PostgreSQL only).

store._Staged drops the secondary indexes of `datasets` and `dataset_history` before the
first full batch of new rows and creates them again before the run commits. These tests
check that it happens only where it should, that the indexes come back exactly as the
migrations made them, and that a failed run leaves them (and the tables) as they were.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sync import store
from sync.config import DatabaseSettings, Settings, SyncOptions
from sync.db import make_engine, migrate
from sync.errors import InvalidRecordsError
from sync.job import sync_account
from tests.conftest import database_url_for
from tests.fakeapi import synthetic

# With store.FLUSH_ROWS lowered to FLUSH, a listing of TOTAL new datasets is a first batch
# that is full, then more batches written while the indexes are missing.
FLUSH = 200
TOTAL = 700
INDEXED = {"datasets", "dataset_history"}


class Db:
    """A migrated database with a log of the DDL run on it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        migrate(self.engine)
        self.ddl: list[str] = []
        sa.event.listen(self.engine, "before_cursor_execute", self._note)

    def _note(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith(("DROP INDEX", "CREATE INDEX")):
            self.ddl.append(statement.split("(")[0].strip())

    def indexes(self) -> dict[str, Any]:
        """Every index of the two tables: the catalog's own definition where it has one."""
        with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                return dict(
                    conn.execute(
                        sa.text(
                            "SELECT indexname, indexdef FROM pg_indexes "
                            "WHERE tablename IN ('datasets', 'dataset_history')"
                        )
                    ).all()
                )
            inspector = sa.inspect(conn)
            return {
                f"{name}.{index['name']}": (index["column_names"], index["unique"])
                for name in sorted(INDEXED)
                for index in inspector.get_indexes(name)
            }

    def count(self, table: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.exec_driver_sql(f"SELECT COUNT(*) FROM {table}").scalar_one())

    def sync(self, records: list[dict[str, Any]], **options: Any) -> None:
        settings = Settings(database=DatabaseSettings(url=self.url), sync=SyncOptions(**options))
        body = json.dumps({"datasets": records}).encode()
        sync_account(settings, settings.accounts[0], self.engine, body=body)


def open_db(backend: str, tmp_path: Path) -> Iterator[Db]:
    for url in database_url_for(backend, tmp_path):
        db = Db(url)
        try:
            yield db
        finally:
            db.engine.dispose()


@pytest.fixture
def pg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Db]:
    monkeypatch.setattr(store, "FLUSH_ROWS", FLUSH)
    yield from open_db("postgresql", tmp_path)


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def any_db(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Db]:
    monkeypatch.setattr(store, "FLUSH_ROWS", FLUSH)
    yield from open_db(request.param, tmp_path)


def drops(db: Db) -> int:
    return sum(statement.startswith("DROP INDEX") for statement in db.ddl)


def test_a_first_load_ends_with_the_indexes_the_migrations_made(any_db: Db) -> None:
    migrated = any_db.indexes()
    assert len(migrated) >= 7

    any_db.sync(synthetic(TOTAL))

    assert any_db.indexes() == migrated
    assert any_db.count("datasets") == TOTAL
    assert any_db.count("dataset_history") == TOTAL
    # Deferred only where the DROP is part of the run's transaction and pays off.
    deferred = 7 if any_db.engine.dialect.name == "postgresql" else 0
    assert drops(any_db) == deferred
    assert len(any_db.ddl) == 2 * deferred


def test_a_failed_first_load_leaves_the_tables_and_indexes_as_they_were(pg: Db) -> None:
    migrated = pg.indexes()
    records = synthetic(TOTAL)
    records[-1] = {"dataset_id": "broken", "name": 5}

    with pytest.raises(InvalidRecordsError):
        pg.sync(records, on_invalid_record="fail")

    assert drops(pg) == 7  # the run did get as far as dropping them
    assert pg.indexes() == migrated
    assert pg.count("datasets") == 0
    assert pg.count("dataset_history") == 0


def test_a_small_first_load_keeps_the_indexes(pg: Db) -> None:
    pg.sync(synthetic(FLUSH - 1))

    assert pg.ddl == []
    assert pg.count("datasets") == FLUSH - 1


def test_a_large_load_into_tables_with_rows_keeps_the_indexes(pg: Db) -> None:
    pg.sync(synthetic(10))
    # A different listing of many new datasets: its first batch is full of inserts.
    more = [{**r, "dataset_id": f"more-{r['dataset_id']}"} for r in synthetic(TOTAL)]

    pg.sync(more)

    assert pg.ddl == []
    assert pg.count("datasets") == TOTAL + 10
    assert pg.count("dataset_history") == TOTAL + 10 + 10  # the 10 first ones were deleted


def test_a_history_without_rows_in_datasets_keeps_the_indexes(pg: Db) -> None:
    pg.sync(synthetic(10))
    with pg.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM datasets")

    pg.sync(synthetic(TOTAL))

    assert pg.ddl == []
    assert pg.count("datasets") == TOTAL
