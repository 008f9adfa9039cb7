"""Alembic environment: runs on the CLI's connection, or on the configured URL from a checkout."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from sync.models import metadata

config = context.config
target_metadata = metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Migrate over the CLI's connection, or build an engine from the tool's own settings."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    # Imported here: only `alembic` run from a checkout needs the settings machinery.
    from logging.config import fileConfig

    from sync.config import load_settings
    from sync.db import make_engine

    if config.config_file_name:
        fileConfig(config.config_file_name, disable_existing_loggers=False)

    database = load_settings().database
    url = config.get_main_option("sqlalchemy.url") or database.url
    engine = make_engine(url, database.schema)
    if database.schema:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{database.schema}"')
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) mode is not supported; run against a database")
run_online()
