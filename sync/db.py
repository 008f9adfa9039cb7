"""Engines and migrations: `make_engine`, `migrate`, `current_revision`, `head_revision`."""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError, SQLAlchemyError

from sync import interrupt, redact
from sync.config import DatabaseSettings
from sync.errors import Cancelled, ConfigError, DatabaseError, MigrationRequired, NoDatabase

if TYPE_CHECKING:  # Alembic is imported only when migrating: `status` starts faster without it
    from alembic.config import Config

log = logging.getLogger(__name__)

# The newest migration in migrations/versions; tests/test_migrations.py checks it
# against Alembic's head, so a new migration cannot be forgotten here.
SCHEMA_HEAD = "0013"

# A URL without a driver gets the one our extras install.
_DEFAULT_DRIVERS = {
    "postgresql": ("postgresql+psycopg", "postgres"),
    "postgres": ("postgresql+psycopg", "postgres"),
    "mysql": ("mysql+pymysql", "mysql"),
    "mariadb": ("mariadb+pymysql", "mysql"),
}
_EXTRA_FOR_BACKEND = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}


def _mysql_lock(purpose: str) -> str:
    # MySQL's named locks are server-wide, PostgreSQL's advisory locks are per database: the
    # name carries the database's (hashed, to fit 64 characters), so installations that share
    # a server do not wait for each other.
    return f"CONCAT('ideogram_sync_{purpose}:', LEFT(SHA2(COALESCE(DATABASE(), ''), 256), 16))"


_MYSQL_WRITE_LOCK = _mysql_lock("write")
_MYSQL_MIGRATE_LOCK = _mysql_lock("migrate")


def normalize_url(url: str) -> URL:
    """Parse a database URL and give driverless PostgreSQL/MySQL URLs our default drivers."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            "database.url is not a valid SQLAlchemy URL; expected e.g. "
            "sqlite:///ideogram_sync.db or postgresql://user:password@host/dbname"
        ) from None
    if parsed.drivername in _DEFAULT_DRIVERS:
        parsed = parsed.set(drivername=_DEFAULT_DRIVERS[parsed.drivername][0])
    if parsed.get_backend_name() in ("mysql", "mariadb") and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return parsed


def safe_url(url: str | URL) -> str:
    """The URL as it may be shown to people: password masked."""
    parsed = url if isinstance(url, URL) else normalize_url(url)
    return parsed.render_as_string(hide_password=True)


def make_engine(url: str, schema: str | None = None, *, read_only: bool = False) -> Engine:
    """An Engine for `url` (and PostgreSQL `schema`) with the default timeouts."""
    return open_engine(DatabaseSettings(url=url, schema=schema), read_only=read_only)


def open_engine(database: DatabaseSettings, *, read_only: bool = False) -> Engine:
    """Create an Engine for the configured database: sessions in UTC, every wait bounded.

    `read_only`: for commands that only read (status, datasets); on SQLite they then never
    take the write lock, and a database that does not exist yet is not created.
    """
    parsed = normalize_url(database.url)
    backend = parsed.get_backend_name()
    schema = database.schema
    if schema and backend != "postgresql":
        raise ConfigError(
            f"database.schema is only supported on PostgreSQL, not {backend}; "
            "on MariaDB/MySQL a schema is a database: name it in database.url"
        )
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    connect = math.ceil(database.connect_timeout_seconds)
    lock_ms = round(database.lock_timeout_seconds * 1000)
    statement_ms = round(database.statement_timeout_seconds * 1000)
    if backend == "sqlite":
        _check_sqlite_file(parsed.database, read_only)
        # Lock waits happen in BEGIN IMMEDIATE, in slices (see _sqlite_transactions).
        kwargs["connect_args"] = {"timeout": SQLITE_WAIT_SLICE_SECONDS}
    elif backend == "postgresql":
        options = f"-c timezone=UTC -c lock_timeout={lock_ms} -c statement_timeout={statement_ms}"
        if schema:
            # Unqualified names (our tables, views, alembic_version) all resolve here.
            options += f" -c search_path={schema}"
        kwargs["connect_args"] = {"options": options, "connect_timeout": connect}
        # A peer that vanished (host down, network cut) is noticed by TCP within about a
        # minute; a libpq parameter in the URL's query wins.
        for name, value in _PG_KEEPALIVES.items():
            if name not in parsed.query:
                kwargs["connect_args"][name] = value
    elif backend in ("mysql", "mariadb"):
        # The server ends a statement after statement_timeout; the client's socket
        # timeouts end a wait on a server that stopped answering at all.
        kwargs["connect_args"] = {
            "init_command": (
                "SET time_zone = '+00:00', "
                f"lock_wait_timeout = {math.ceil(database.lock_timeout_seconds)}, "
                f"innodb_lock_wait_timeout = {math.ceil(database.lock_timeout_seconds)}"
            ),
            "connect_timeout": connect,
            "read_timeout": math.ceil(database.statement_timeout_seconds) + SOCKET_MARGIN_SECONDS,
            "write_timeout": math.ceil(database.statement_timeout_seconds) + SOCKET_MARGIN_SECONDS,
        }
    try:
        engine = create_engine(parsed, **kwargs)
    except ModuleNotFoundError as exc:
        extra = _EXTRA_FOR_BACKEND.get(backend, backend)
        raise ConfigError(
            f"the database driver for {backend} is not installed ({exc.name}); "
            f"pip install 'ideogram-dataset-sync[{extra}]'"
        ) from None
    except (ArgumentError, SQLAlchemyError) as exc:
        raise ConfigError(f"cannot use database.url {safe_url(parsed)}: {exc}") from None
    if read_only:
        engine = reading(engine)
    if backend == "sqlite":
        _sqlite_transactions(engine, database.lock_timeout_seconds, wal=not read_only)
    elif backend in ("mysql", "mariadb"):
        _mysql_statement_timeout(engine, statement_ms)
    interrupt.track(engine)
    return engine


# Seconds: TCP keepalive probes after 30 s idle, every 10 s, 3 unanswered = gone; unacked
# data for 60 s = gone.
_PG_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}
# A socket read on MariaDB/MySQL waits for a statement that the server itself ends
# after statement_timeout; the margin lets the server's own error arrive first.
SOCKET_MARGIN_SECONDS = 30
# SQLite waits for another writer's lock this long at a time, so a signal is handled
# between the waits (SQLite's own busy wait cannot be interrupted).
SQLITE_WAIT_SLICE_SECONDS = 0.5
READ_ONLY_OPTION = "ideogram_sync_read_only"


def reading(engine: Engine) -> Engine:
    """The same engine for work that only reads: on SQLite, a read transaction only."""
    return engine.execution_options(**{READ_ONLY_OPTION: True})


def _check_sqlite_file(database: str | None, read_only: bool) -> None:
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database).expanduser()
    if read_only and not path.is_file():
        raise NoDatabase(
            f"there is no synced database yet: {path.resolve()} does not exist (database.url "
            f"sqlite:///{database}); run `ideogram-sync run` first, or point --database-url "
            "at the database the sync writes"
        )
    folder = path.resolve().parent
    if not folder.is_dir():
        raise ConfigError(
            f"the folder for the SQLite database {database} does not exist; create "
            f"{folder} or change database.url"
        )


def _sqlite_transactions(engine: Engine, lock_timeout: float, wal: bool) -> None:
    # pysqlite opens transactions lazily (only before DML), so a read-then-write
    # run would not be one transaction. Take over BEGIN, as SQLAlchemy's docs advise.
    # Writers BEGIN IMMEDIATE: the write lock up front, so two writers queue instead of
    # deadlocking. Readers BEGIN (deferred) and, in WAL mode, never block a writer.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        # Temporary tables (the stage holds one batch), sorts and statement journals stay
        # in memory: a run never depends on room in TMPDIR, where SQLite would put them.
        dbapi_connection.execute("PRAGMA temp_store = MEMORY")
        if wal:
            # WAL: readers see the last commit while a writer writes, and a writer
            # commits while readers read. It is a property of the file, kept from
            # then on; an in-memory database stays in its own mode.
            mode = dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0]
            if mode not in ("wal", "memory"):
                dbapi_connection.execute("PRAGMA journal_mode=WAL")

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        options = connection.get_execution_options()
        if options.get(READ_ONLY_OPTION):
            connection.exec_driver_sql("BEGIN")
            return
        give_up = time.monotonic() + lock_timeout
        while True:
            try:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
                return
            except OperationalError as exc:
                if "locked" not in str(exc.orig) or time.monotonic() >= give_up:
                    raise
                if interrupt.stopping():  # SQLite cannot cancel its own wait
                    raise Cancelled() from None


def _mysql_statement_timeout(engine: Engine, statement_ms: int) -> None:
    # MariaDB bounds any statement (max_statement_time, seconds); MySQL only SELECTs
    # (max_execution_time, milliseconds). Which one is known once connected.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            if "mariadb" in dbapi_connection.get_server_info().lower():
                cursor.execute(f"SET SESSION max_statement_time = {statement_ms / 1000:.3f}")
            else:
                cursor.execute(f"SET SESSION max_execution_time = {statement_ms}")


def migrations_dir() -> Path:
    """Where the Alembic scripts are: inside the installed wheel, or migrations/ in a checkout."""
    spec = importlib.util.find_spec("sync.migrations")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "migrations"


@contextmanager
def _plain_mako() -> Iterator[None]:
    """While Alembic is first imported, keep Mako from loading Pygments."""
    # Alembic imports Mako, which it needs only to write new revision files (this tool
    # never does), and Mako then imports Pygments' lexers if Pygments is installed (pytest
    # and IPython bring it), to colour its HTML error pages: 0.05-0.1 s here, up to a third
    # of Alembic's import, on every run that migrates. A None in sys.modules makes that one
    # import fail, and Mako takes its own fallback (plain text). Only for this import: a
    # later import of the plugin, by anyone, works as usual.
    plugin = "mako.ext.pygmentplugin"
    blocked = "mako.exceptions" not in sys.modules and plugin not in sys.modules
    if blocked:
        sys.modules[plugin] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if blocked and plugin in sys.modules and sys.modules[plugin] is None:
            del sys.modules[plugin]


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config that needs no alembic.ini; with a connection, env.py uses it."""
    with _plain_mako():
        from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    """The newest migration this version of the tool ships, as Alembic reads the scripts."""
    with _plain_mako():
        from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at (None for an empty database)."""
    with reading(engine).connect() as connection:
        return _revision(connection)


def _revision(connection: Connection) -> str | None:
    # Alembic's own MigrationContext reads the same one-row table, but importing Alembic
    # costs a tenth of a second on every run; it is loaded only to migrate.
    if not inspect(connection).has_table("alembic_version"):
        return None
    versions = connection.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    if len(versions) > 1:
        raise DatabaseError(
            "the database's alembic_version table has several heads; it was not migrated by "
            "ideogram-sync"
        )
    return str(versions[0][0]) if versions else None


def known_revisions() -> set[str]:
    """Every migration this version of the tool ships."""
    with _plain_mako():
        from alembic.script import ScriptDirectory

    return {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


def refuse_newer(revision: str | None) -> None:
    """Raise MigrationRequired when a newer version of the tool migrated the database."""
    if revision is None or revision in known_revisions():
        return
    from sync import __version__

    raise MigrationRequired(
        f"the database is at migration {revision}, which this version of ideogram-sync "
        f"({__version__}) does not know: a newer version of ideogram-sync migrated it. "
        "Upgrade ideogram-sync here (pip install -U ideogram-dataset-sync); nothing was changed"
    )


# MariaDB/MySQL commits each schema change as it is made: a migration stopped half-way
# has left some of its changes, and is finished by running it again.
RESUME_MIGRATION = (
    "MariaDB/MySQL keeps the schema changes made so far (it commits each one at once); "
    "run `ideogram-sync migrate` again to finish the migration"
)


def migrate(
    engine: Engine, target: str = "head", schema: str | None = None
) -> tuple[str | None, str | None]:
    """Upgrade the database to `target` (creating PostgreSQL `schema` if missing)."""
    with _plain_mako():
        from alembic import command
        from alembic.util.exc import CommandError as AlembicError

    if schema:
        with engine.begin() as connection:
            connection.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    commits_ddl = engine.dialect.name in ("mysql", "mariadb")
    with _migration_lock(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Held until this transaction commits: the next process sees our version.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7318470021)")
        # Read under the lock: a process that waited finds what the one before it did.
        before = _revision(connection)
        refuse_newer(before)
        try:
            command.upgrade(alembic_config(connection), target)
        except AlembicError as exc:
            raise MigrationRequired(
                f"cannot migrate the database from {before or 'empty'}: {exc}; if a newer "
                "ideogram-sync migrated it, upgrade this installation"
            ) from None
        except SQLAlchemyError as exc:
            error = database_error(exc, engine.url, "migrating")
            if commits_ddl:
                raise DatabaseError(f"{error}. {RESUME_MIGRATION}") from exc
            raise error from exc
        except BaseException as exc:  # SIGTERM, Ctrl-C
            if commits_ddl:
                exc.add_note(f"the migration was stopped part-way. {RESUME_MIGRATION}")
            raise
        after = _revision(connection)
    if before != after:
        log.info("migrated database from %s to %s", before or "empty", after)
    return before, after


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that holds the database-wide write lock of this tool.

    Runs of different accounts may touch the same dataset row; serializing their
    short write transactions keeps each diff true to what it then writes.
    (SQLite needs nothing: BEGIN IMMEDIATE already serializes writers.)
    """
    with engine.connect() as conn:
        name = conn.dialect.name
        try:
            with conn.begin():
                if name == "postgresql":
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7318470022)")
                elif name in ("mysql", "mariadb"):
                    # Waits as long as any lock may: database.lock_timeout_seconds.
                    got = conn.exec_driver_sql(
                        f"SELECT GET_LOCK({_MYSQL_WRITE_LOCK}, @@SESSION.lock_wait_timeout)"
                    ).scalar()
                    if got != 1:
                        raise DatabaseError(
                            "timed out waiting for another run's write to finish (waited "
                            "database.lock_timeout_seconds); it is retried at the next run"
                        )
                try:
                    yield conn
                except BaseException as exc:
                    if not isinstance(exc, Exception):
                        # Stopped (SIGTERM, Ctrl-C) perhaps inside a driver call that
                        # SQLAlchemy did not make (COPY, a server-side cursor): the
                        # connection may be mid-statement, so it is dropped, not rolled
                        # back over; the server rolls the transaction back.
                        conn.invalidate()
                    raise
        finally:
            if name in ("mysql", "mariadb") and not conn.closed and not conn.invalidated:
                with suppress(SQLAlchemyError):
                    conn.exec_driver_sql(f"SELECT RELEASE_LOCK({_MYSQL_WRITE_LOCK})")


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    # Two processes starting on a new database must not both create the tables: the
    # second waits, then Alembic sees the first one's version and does nothing. MySQL's
    # named lock lives on its own connection and is released only after the migration
    # transaction has committed (released earlier, the next process would still read the
    # old version and migrate again). PostgreSQL takes a transaction-level advisory lock
    # in `migrate`; SQLite needs nothing: BEGIN IMMEDIATE already serializes writers.
    if engine.dialect.name not in ("mysql", "mariadb"):
        yield
        return
    with engine.connect() as holder:
        got = holder.exec_driver_sql(
            f"SELECT GET_LOCK({_MYSQL_MIGRATE_LOCK}, @@SESSION.lock_wait_timeout)"
        ).scalar()
        if got != 1:
            raise DatabaseError("timed out waiting for another process to finish migrating")
        try:
            yield
        finally:
            with suppress(SQLAlchemyError):
                holder.exec_driver_sql(f"SELECT RELEASE_LOCK({_MYSQL_MIGRATE_LOCK})")


def database_error(exc: BaseException, url: str | URL, doing: str) -> DatabaseError:
    """Turn a driver/SQLAlchemy exception into one clear, password-free line."""
    orig = getattr(exc, "orig", None) or exc
    detail = " ".join(str(orig).split())
    if len(detail) > 300:
        detail = detail[:299] + "…"
    return DatabaseError(
        redact.redact(
            f"database error while {doing} ({safe_url(url)}): {type(orig).__name__}: {detail}; "
            + _hint(exc, orig, url)
        )
    )


# What a failure was, from the server's own code: PostgreSQL SQLSTATEs, MariaDB/MySQL
# error numbers, SQLite result names.
_LOCK_WAIT = {"55P03", 1205, "SQLITE_BUSY", "SQLITE_LOCKED"}
_TOO_LONG = {"57014", 1969, 3024}
_DISK_FULL = {"53100", 1021, 1114, "SQLITE_FULL"}
_NO_CONNECTION = {1040, 1044, 1045, 1049, 1130, 1927}


def _error_code(orig: BaseException) -> str | int | None:
    if type(orig).__module__.startswith("pymysql"):
        # PyMySQL's errors carry a generic sqlstate (HY000); the number says what it was.
        return orig.args[0] if orig.args else None
    return getattr(orig, "sqlstate", None) or getattr(orig, "sqlite_errorname", None)


def _hint(exc: BaseException, orig: BaseException, url: str | URL) -> str:
    code = _error_code(orig)
    if code in _LOCK_WAIT:
        return (
            "another session held a lock it needs for longer than database.lock_timeout_seconds "
            "(another ideogram-sync run or migration, or a client such as a BI tool or pg_dump "
            "with a transaction open on these tables); nothing was changed, and the next run "
            "tries again"
        )
    if code in _TOO_LONG:
        return (
            "a statement ran longer than database.statement_timeout_seconds (or was cancelled); "
            "nothing was changed. Check the database's load, or raise the timeout"
        )
    if code in _DISK_FULL:
        return _disk_full_hint(url)
    mysql_client_error = isinstance(code, int) and 2000 <= code < 3000
    if code in _NO_CONNECTION or mysql_client_error:
        return "check that the database is reachable, writable and database.url is right"
    if isinstance(exc, InterfaceError) or (
        isinstance(exc, OperationalError) and (code is None or str(code).startswith("08"))
    ):
        return "check that the database is reachable, writable and database.url is right"
    return "the database refused a statement; rerun with -v and report it if it persists"


def _disk_full_hint(url: str | URL) -> str:
    parsed = url if isinstance(url, URL) else normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        return "the database server's disk is full; free space there, then run again"
    # Only the database's own folder: SQLite's temporary files are kept in memory.
    folder = Path(parsed.database or ".").resolve().parent
    return f"the disk of the database's folder {folder} is full ({_free(folder)} free); free space there, then run again"


def _free(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown"
