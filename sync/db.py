"""Engines and migrations: `make_engine`, `migrate`, `current_revision`, `head_revision`."""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError, SQLAlchemyError

from sync import redact
from sync.errors import ConfigError, DatabaseError, MigrationRequired

if TYPE_CHECKING:  # Alembic is imported only when migrating: `status` starts faster without it
    from alembic.config import Config

log = logging.getLogger(__name__)

# The newest migration in migrations/versions; tests/test_migrations.py checks it
# against Alembic's head, so a new migration cannot be forgotten here.
SCHEMA_HEAD = "0008"

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


def make_engine(url: str, schema: str | None = None) -> Engine:
    """Create an Engine for `url` (and PostgreSQL `schema`); sessions run in UTC."""
    parsed = normalize_url(url)
    backend = parsed.get_backend_name()
    if schema and backend != "postgresql":
        raise ConfigError(
            f"database.schema is only supported on PostgreSQL, not {backend}; "
            "on MariaDB/MySQL a schema is a database: name it in database.url"
        )
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            folder = Path(database).expanduser().resolve().parent
            if not folder.is_dir():
                raise ConfigError(
                    f"the folder for the SQLite database {database} does not exist; create "
                    f"{folder} or change database.url"
                )
        kwargs["connect_args"] = {"timeout": 30}
    elif backend == "postgresql":
        options = "-c timezone=UTC"
        if schema:
            # Unqualified names (our tables, views, alembic_version) all resolve here.
            options += f" -c search_path={schema}"
        kwargs["connect_args"] = {"options": options, "connect_timeout": 15}
    elif backend in ("mysql", "mariadb"):
        kwargs["connect_args"] = {"init_command": "SET time_zone = '+00:00'", "connect_timeout": 15}
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
    if backend == "sqlite":
        _sqlite_transactions(engine)
    return engine


def _sqlite_transactions(engine: Engine) -> None:
    # pysqlite opens transactions lazily (only before DML), so a read-then-write
    # run would not be one transaction. Take over BEGIN, as SQLAlchemy's docs advise;
    # IMMEDIATE takes the write lock up front so two writers queue instead of deadlocking.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


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
    # Alembic's own MigrationContext reads the same one-row table, but importing Alembic
    # costs a tenth of a second on every run; it is loaded only to migrate.
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        versions = connection.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    if len(versions) > 1:
        raise DatabaseError(
            "the database's alembic_version table has several heads; it was not migrated by "
            "ideogram-sync"
        )
    return str(versions[0][0]) if versions else None


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
    before = current_revision(engine)
    with _migration_lock(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Held until this transaction commits: the next process sees our version.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7318470021)")
        try:
            command.upgrade(alembic_config(connection), target)
        except AlembicError as exc:
            raise MigrationRequired(
                f"cannot migrate the database from {before or 'empty'}: {exc}; if a newer "
                "ideogram-sync migrated it, upgrade this installation"
            ) from None
    after = current_revision(engine)
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
                    got = conn.exec_driver_sql(
                        f"SELECT GET_LOCK({_MYSQL_WRITE_LOCK}, 300)"
                    ).scalar()
                    if got != 1:
                        raise DatabaseError(
                            "timed out after 300s waiting for another run's write to finish"
                        )
                yield conn
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
        got = holder.exec_driver_sql(f"SELECT GET_LOCK({_MYSQL_MIGRATE_LOCK}, 120)").scalar()
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
    if isinstance(exc, OperationalError | InterfaceError):
        hint = "check that the database is reachable, writable and database.url is right"
    else:
        hint = "the database refused a statement; rerun with -v and report it if it persists"
    return DatabaseError(
        redact.redact(
            f"database error while {doing} ({safe_url(url)}): {type(orig).__name__}: {detail}; "
            + hint
        )
    )
