"""A migration stopped after any statement is finished by the next `migrate`.

MariaDB/MySQL commit every DDL statement as it runs, so a process killed in the middle of a
migration leaves part of it behind; running `migrate` again must complete it and end in the
same schema and data as a migration that was never stopped. PostgreSQL and SQLite roll the
whole migration back instead: they must be left exactly as they were before it started.

Run as `python -m tests.test_migration_resume ARGS...` this module is the CLI with a pause:
after the first statement containing $PAUSE_AFTER it creates $PAUSE_MARKER and sleeps, so a
test can kill -9 it at a known point of a migration.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
# Statements that change nothing: killing the process after one of them leaves the same
# database as killing it after the write before, so only writes are worth a kill.
_READS = ("SELECT", "SHOW", "DESCRIBE", "DESC ", "EXPLAIN", "PRAGMA", "BEGIN", "SET ")
# Autoincrement ids: a rolled-back INSERT still uses up InnoDB AUTO_INCREMENT values, so a
# backfill redone after a kill numbers its rows further on. Their order is compared.
_SURROGATE_IDS = {"dataset_history": "id", "sync_runs": "id"}
# The statement the subprocess test stops after: the column of issue 15's second error.
_CONTENT_HASH_DDL = "ALTER TABLE datasets ADD COLUMN content_hash"


class Killed(BaseException):
    """The process died after this statement (a BaseException, like SystemExit: no handler
    in the code under test may swallow it)."""


def _is_write(statement: str) -> bool:
    return not " ".join(statement.split()).upper().startswith(_READS)


@contextmanager
def writes_recorded(engine: sa.Engine) -> Iterator[list[str]]:
    """Collect the text of every write statement `engine` executes."""
    seen: list[str] = []

    def after(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if _is_write(statement):
            seen.append(" ".join(statement.split()))

    event.listen(engine, "after_cursor_execute", after)
    try:
        yield seen
    finally:
        event.remove(engine, "after_cursor_execute", after)


@contextmanager
def dies_after_write(engine: sa.Engine, k: int) -> Iterator[None]:
    """Make the process 'die' right after `engine`'s k-th write statement (1-based)."""
    count = 0

    def after(conn: sa.Connection, _cursor: Any, statement: str, *_args: Any) -> None:
        nonlocal count
        if not _is_write(statement):
            return
        count += 1
        if count == k:
            # As kill -9 does: the connection goes away without COMMIT or ROLLBACK, and the
            # server discards whatever it had not committed yet.
            conn.invalidate()
            raise Killed(statement)

    event.listen(engine, "after_cursor_execute", after)
    try:
        yield
    finally:
        event.remove(engine, "after_cursor_execute", after)


def _ordered_rows(conn: sa.Connection, table: str) -> list[str]:
    surrogate = _SURROGATE_IDS.get(table)
    order = surrogate or "1"
    result = conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY {order}")
    names = list(result.keys())
    out = []
    for rank, row in enumerate(result.all()):
        values = dict(zip(names, row, strict=True))
        if surrogate:
            values[surrogate] = f"#{rank}"
        out.append(repr(sorted(values.items())))
    return out if surrogate else sorted(out)


def _mysql_ddl(conn: sa.Connection, kind: str, name: str) -> str:
    database = conn.exec_driver_sql("SELECT DATABASE()").scalar_one()
    ddl = conn.exec_driver_sql(f"SHOW CREATE {kind} `{name}`").one()
    text = " | ".join(str(part) for part in ddl[1:])
    text = re.sub(r" AUTO_INCREMENT=\d+", "", text)
    return text.replace(f"`{database}`.", "")


def snapshot(url: str) -> dict[str, Any]:
    """Everything a migration makes, comparable across databases: tables (columns with types,
    nullability and defaults, keys, indexes, options, rows), views, and on MariaDB/MySQL the
    server's own SHOW CREATE text (collations, column order, view security) too."""
    from sync.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            dialect = conn.dialect
            mysql = dialect.name in ("mysql", "mariadb")
            dump: dict[str, Any] = {}
            for table in sorted(inspector.get_table_names()):
                columns = [
                    (
                        c["name"],
                        str(c["type"].compile(dialect=dialect)),
                        c["nullable"],
                        c.get("default"),
                    )
                    for c in inspector.get_columns(table)
                ]
                indexes = sorted(
                    (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                    for i in inspector.get_indexes(table)
                )
                dump[f"table {table}"] = {
                    "columns": columns,
                    "primary key": inspector.get_pk_constraint(table),
                    "indexes": indexes,
                    "unique": inspector.get_unique_constraints(table),
                    "foreign keys": inspector.get_foreign_keys(table),
                    "checks": inspector.get_check_constraints(table),
                    "options": inspector.get_table_options(table),
                    "rows": _ordered_rows(conn, table),
                }
                if mysql:
                    dump[f"table {table}"]["ddl"] = _mysql_ddl(conn, "TABLE", table)
            for view in sorted(inspector.get_view_names()):
                definition = " ".join(inspector.get_view_definition(view).split())
                # repr: SQLite gives a computed column no type, which does not compile.
                columns = [
                    (c["name"], repr(c["type"]), c["nullable"]) for c in inspector.get_columns(view)
                ]
                dump[f"view {view}"] = {"definition": definition, "columns": columns}
                if mysql:
                    dump[f"view {view}"]["ddl"] = _mysql_ddl(conn, "VIEW", view)
            if mysql:
                # Each column's exact type and collation, views' columns included.
                dump["information_schema.COLUMNS"] = [
                    tuple(r)
                    for r in conn.exec_driver_sql(
                        "SELECT TABLE_NAME, ORDINAL_POSITION, COLUMN_NAME, COLUMN_TYPE, "
                        "IS_NULLABLE, COLUMN_DEFAULT, COLLATION_NAME, EXTRA "
                        "FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
                        "ORDER BY TABLE_NAME, ORDINAL_POSITION"
                    )
                ]
            if dialect.name == "sqlite":
                master = conn.exec_driver_sql(
                    "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
                )
                dump["sqlite_master"] = [tuple(r) for r in master]
            return dump
    finally:
        engine.dispose()


def recreate(url: str) -> None:
    """Drop the database of `url` and create it empty again, with the same defaults."""
    parsed = make_url(url)
    name = parsed.database
    if parsed.get_backend_name() == "sqlite":
        Path(name or "").unlink(missing_ok=True)
        return
    # Connected to a database other than the one dropped: PostgreSQL's own, or none.
    other = "postgres" if parsed.get_backend_name() == "postgresql" else None
    admin = sa.create_engine(parsed.set(database=other), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
                return
            charset, collation = conn.exec_driver_sql(
                "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME "
                "FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
                (name,),
            ).one()
            conn.exec_driver_sql(f"DROP DATABASE `{name}`")
            conn.exec_driver_sql(
                f"CREATE DATABASE `{name}` CHARACTER SET {charset} COLLATE {collation}"
            )
    finally:
        admin.dispose()


def upgrade(url: str, target: str = "head", kill_after: int | None = None) -> None:
    """`sync.db.migrate` to `target`; with `kill_after`, die after that many writes."""
    from sync.db import make_engine, migrate

    engine = make_engine(url)
    try:
        if kill_after is None:
            migrate(engine, target)
            return
        with dies_after_write(engine, kill_after), pytest.raises(Killed):
            migrate(engine, target)
    finally:
        engine.dispose()


def count_writes(url: str) -> list[str]:
    """The write statements of an uninterrupted migration of `url` to head, in order."""
    from sync.db import make_engine, migrate

    engine = make_engine(url)
    try:
        with writes_recorded(engine) as seen:
            migrate(engine)
    finally:
        engine.dispose()
    return seen


def seed(url: str) -> None:
    """Datasets as a version at migration 0001 stored them, for the backfills to work on."""
    from sync.db import make_engine

    engine = make_engine(url)
    when = datetime(2026, 1, 2, 3, 4, 5, 678901)
    try:
        meta = sa.MetaData()
        extra = sa.Column("extra", sa.JSON(none_as_null=True))
        datasets = sa.Table("datasets", meta, extra, autoload_with=engine)
        runs = sa.Table("sync_runs", meta, autoload_with=engine)
        with engine.begin() as conn:
            conn.execute(
                runs.insert().values(
                    account="default", started_at=when, finished_at=when, status="success",
                    datasets_seen=3, inserted=3, updated=0, unchanged=0, deleted=1, rejected=0,
                )
            )  # fmt: skip
            for dataset_id, deleted, cover, more in (
                ("kept", None, ("RESPONSE", "c1"), {"sharing": [1, True, None]}),
                ("gone", when, None, None),
                ("ünï ✓", None, ("UPLOAD", "c2"), {"a": {"z": 1.5}}),
            ):
                conn.execute(
                    datasets.insert().values(
                        dataset_id=dataset_id, account="default", name=f"name of {dataset_id}",
                        user_id="u", creation_time=when, cover_asset_type=cover and cover[0],
                        cover_asset_id=cover and cover[1], extra=more, first_seen_at=when,
                        updated_at=when, deleted_at=deleted, last_sync_run_id=1,
                    )
                )  # fmt: skip
    finally:
        engine.dispose()


@pytest.fixture
def mysql_url(tmp_path: Path) -> Iterator[str]:
    """A fresh MariaDB/MySQL database (skips without TEST_MYSQL_URL)."""
    from tests.conftest import database_url_for

    yield from database_url_for("mysql", tmp_path)


_VERSION_WRITE = re.compile(r"(INSERT INTO|UPDATE) alembic_version")


def _sweep(url: str, prepare: Any, data_only: bool = False) -> list[str]:
    """Kill a migration to head after each of its writes in turn, and resume it each time.

    `prepare(url)` brings an empty database to where the migration starts. `data_only`: only
    the writes of migrations that also write rows (a backfill), not just the schema.
    Returns the writes that were kill points."""
    prepare(url)
    writes = count_writes(url)
    clean = snapshot(url)
    assert writes, "the migration wrote nothing"
    points = list(enumerate(writes, start=1))
    if data_only:
        points = [
            p for migration in _by_migration(points) if _writes_rows(migration) for p in migration
        ]
    for k, statement in points:
        recreate(url)
        prepare(url)
        upgrade(url, kill_after=k)
        try:
            upgrade(url)
        except Exception as exc:
            pytest.fail(
                f"killed after write {k} ({statement[:90]}): the next migrate failed: {exc}"
            )
        assert snapshot(url) == clean, f"killed after write {k} ({statement[:90]})"
    return [statement for _k, statement in points]


def _by_migration(points: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """The writes cut into migrations: each one ends by recording its revision."""
    migrations: list[list[tuple[int, str]]] = [[]]
    for point in points:
        migrations[-1].append(point)
        if _VERSION_WRITE.match(point[1]):
            migrations.append([])
    return [m for m in migrations if m]


def _writes_rows(migration: list[tuple[int, str]]) -> bool:
    return any(
        statement.startswith(("INSERT", "UPDATE", "DELETE")) and not _VERSION_WRITE.match(statement)
        for _k, statement in migration
    )


def _recorded(writes: list[str]) -> set[str]:
    """The revisions that the writes put into alembic_version."""
    return {
        revision
        for statement in writes
        if _VERSION_WRITE.match(statement)
        for revision in re.findall(r"'(\w+)'", statement)
    }


def test_every_kill_point_of_every_migration_resumes_on_mysql(mysql_url: str) -> None:
    from sync.db import known_revisions

    writes = _sweep(mysql_url, lambda url: None)
    # Kill points inside every migration: each one ends by recording its revision.
    assert _recorded(writes) == known_revisions()


def test_backfills_resume_on_mysql(mysql_url: str) -> None:
    """From a database at 0001 with data, killed at every point of each migration that
    writes rows: the backfills (0002's history, 0005's digests) are done once and whole."""

    def at_0001_with_data(url: str) -> None:
        upgrade(url, "0001")
        seed(url)

    writes = _sweep(mysql_url, at_0001_with_data, data_only=True)
    assert {"0002", "0005"} <= _recorded(writes)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_interrupted_migration_leaves_nothing_behind(backend: str, tmp_path: Path) -> None:
    """Transactional DDL: killed mid-migration, the database is as it was before `migrate`."""
    from tests.conftest import database_url_for

    for url in database_url_for(backend, tmp_path):
        upgrade(url, "0001")
        seed(url)
        writes = count_writes(url)
        clean = snapshot(url)
        recreate(url)
        upgrade(url, "0001")
        seed(url)
        before = snapshot(url)
        # Well inside the run: after 0005's new column, several migrations in.
        k = next(i for i, s in enumerate(writes, start=1) if s.startswith(_CONTENT_HASH_DDL))
        upgrade(url, kill_after=k)
        assert snapshot(url) == before
        upgrade(url)
        assert snapshot(url) == clean


def _python(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def paused_migrate(db_url: str, tmp_path: Path) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """A real `migrate` of `db_url`, paused right after 0005 added its column; and the
    environment for running the tool on the same database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEOGRAM_")}
    env.update(PYTHONPATH=str(ROOT), IDEOGRAM_SYNC_DATABASE_URL=db_url)
    marker = tmp_path / "paused"
    paused = {**env, "PAUSE_AFTER": _CONTENT_HASH_DDL, "PAUSE_MARKER": str(marker)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.test_migration_resume", "migrate"],
        cwd=ROOT,
        env=paused,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not marker.exists():
        process.kill()
        raise AssertionError(f"migrate never reached the pause: {process.communicate()}")
    return process, env


def test_kill_9_in_the_middle_of_a_migration(db_url: str, tmp_path: Path) -> None:
    """A real `migrate` process killed after 0005 added its column: the next `migrate`
    finishes, and a sync works. (PostgreSQL and SQLite: the kill left nothing at all.)"""
    from sync.db import current_revision, head_revision, make_engine

    process, env = paused_migrate(db_url, tmp_path)
    try:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL

    engine = make_engine(db_url)
    try:
        left = current_revision(engine)
        tables = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    if make_url(db_url).get_backend_name() in ("mysql", "mariadb"):
        # Committed as it went: 0005 is under way, recorded as 0004 with its column added.
        assert left == "0004" and "content_hash" in _columns(db_url, "datasets")
    else:
        assert (left, tables) == (None, set())

    again = _python("-m", "sync", "migrate", env=env)
    assert again.returncode == 0, again.stderr
    synced = _python("-m", "sync", "run", "--input", "examples/datasets.json", env=env)
    assert synced.returncode == 0, synced.stderr
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT COUNT(*) FROM datasets").scalar_one() > 0
    finally:
        engine.dispose()


def _columns(url: str, table: str) -> set[str]:
    from sync.db import make_engine

    engine = make_engine(url)
    try:
        return {c["name"] for c in sa.inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def _pause_after(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
    if os.environ["PAUSE_AFTER"] not in " ".join(statement.split()):
        return
    Path(os.environ["PAUSE_MARKER"]).write_text(str(os.getpid()))
    time.sleep(120)  # until the test kills the process


if __name__ == "__main__":
    from sync.cli import main

    event.listen(sa.Engine, "after_cursor_execute", _pause_after)
    sys.exit(main(sys.argv[1:]))
