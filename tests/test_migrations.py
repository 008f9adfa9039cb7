"""Migrations build exactly the models' schema, and go down and up again, on every backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from sync.db import (
    SCHEMA_HEAD,
    alembic_config,
    current_revision,
    head_revision,
    make_engine,
    migrate,
)
from sync.models import metadata

ROOT = Path(__file__).resolve().parents[1]


# Comments (migration 0013) live in the database only: sync/models.py does not repeat them,
# and tests/test_dbt.py checks them.
COMMENT_CHANGES = {"modify_comment", "add_table_comment", "remove_table_comment"}


def _without_comments(diff: list[Any]) -> list[Any]:
    kept = []
    for change in diff:
        if isinstance(change, list):  # the changes of one column
            change = [c for c in change if c[0] not in COMMENT_CHANGES]
            if change:
                kept.append(change)
        elif change[0] not in COMMENT_CHANGES:
            kept.append(change)
    return kept


def test_migrations_match_models(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrate(engine)
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = _without_comments(compare_metadata(context, metadata))
        assert diff == [], diff
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) is None
        migrate(engine)
        assert current_revision(engine) == head_revision()
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "base")
        assert current_revision(engine) is None
        assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
        migrate(engine)
        assert {"datasets", "sync_runs"} <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_alembic_ini_from_a_checkout(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'alembic.db'}"
    env = {**os.environ, "IDEOGRAM_SYNC_DATABASE_URL": url}
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "upgrade", "head"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    engine = make_engine(url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_backfilled_hashes_make_the_next_run_unchanged(cli, fake_api, db_url: str) -> None:
    from tests.conftest import rows
    from tests.fakeapi import dataset

    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0004")
    finally:
        engine.dispose()
    listing = [dataset("a", sharing=[{"x": 1}]), dataset("b", cover=None)]
    fake_api.datasets = listing
    # Rows written by a version before 0005, i.e. without a digest.
    engine = make_engine(db_url)
    try:
        from tests.listing import parse_listing

        parsed = parse_listing(json.dumps({"datasets": listing}))
        meta = sa.MetaData()
        # MariaDB reflects JSON as LONGTEXT: say what the column holds.
        extra = sa.Column("extra", sa.JSON(none_as_null=True))
        datasets = sa.Table("datasets", meta, extra, autoload_with=engine)
        with engine.begin() as conn:
            for row in parsed.rows.values():
                conn.execute(
                    datasets.insert().values(
                        dataset_id=row.dataset_id, account="default", name=row.name,
                        user_id=row.user_id, creation_time=row.creation_time.replace(tzinfo=None),
                        cover_asset_type=row.cover_asset_type, cover_asset_id=row.cover_asset_id,
                        extra=row.extra, first_seen_at=row.creation_time.replace(tzinfo=None),
                        updated_at=row.creation_time.replace(tzinfo=None), last_sync_run_id=1,
                    )
                )  # fmt: skip
    finally:
        engine.dispose()
    result = cli("--database-url", db_url, "run")
    assert result.code == 0, result.err
    run = rows(db_url, "sync_runs", order="id")[-1]
    assert (run["inserted"], run["updated"], run["unchanged"]) == (0, 0, 2)


def test_schema_head_constant_matches_the_migrations() -> None:
    """db.SCHEMA_HEAD (read without importing Alembic) must name the newest migration."""
    assert head_revision() == SCHEMA_HEAD


def test_migrating_does_not_load_pygments(tmp_path: Path) -> None:
    """Alembic's Mako would import Pygments' lexers (a third of Alembic's import time)
    to colour HTML error pages no run shows; the plugin still imports afterwards."""
    pytest.importorskip("pygments")
    url = f"sqlite:///{tmp_path / 'm.db'}"
    script = (
        "import sys\n"
        "from sync.db import make_engine, migrate\n"
        f"migrate(make_engine({url!r}))\n"
        "assert 'pygments' not in sys.modules, 'pygments was imported'\n"
        "assert 'mako.exceptions' in sys.modules\n"
        "import mako.ext.pygmentplugin\n"
        "assert 'pygments' in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_downgrading_0009_restores_0008(db_url: str) -> None:
    """0009's downgrade puts sync_daily back exactly as 0002 made it (and nothing else moves)."""
    from tests.test_migration_resume import snapshot

    engine = make_engine(db_url)
    try:
        migrate(engine, "0008")
        at_0008 = snapshot(db_url)
        migrate(engine, "0009")
        assert snapshot(db_url) != at_0008
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0008")
        assert snapshot(db_url) == at_0008
    finally:
        engine.dispose()
