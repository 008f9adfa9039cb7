"""integrations/dbt: the dbt sources file and the comments the migrations write (issue 18).

- sources.yml describes every table, view and column the migrations make, with the same texts
  as the comments migration (one source of descriptions: they cannot drift apart);
- those comments are in the databases (PostgreSQL: tables, views, columns; MariaDB: tables and
  their columns), and writing them changes nothing else: no type, collation, nullability,
  default or check, no row; the downgrade takes them away again;
- dbt itself (the `dbt` extra: `pip install -e '.[test,dbt]'`, as .ci/run does) parses the
  example project, and `dbt source freshness` and `dbt test` pass against a PostgreSQL database
  after a real sync of every resource, connected as docs/bi.md's read-only user; freshness warns
  and then fails as the last success ages.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from alembic import command
from sqlalchemy.engine import URL, make_url

from sync.db import alembic_config, make_engine
from tests.conftest import ALL_RESOURCES, database_url_for
from tests.fakeapi import FakeApi, dataset, file, model, training_run
from tests.test_docs_queries import BI_PASSWORD, bi_recipe, run_as_client
from tests.test_migration_resume import seed, snapshot, upgrade

ROOT = Path(__file__).resolve().parents[1]
DBT_DIR = ROOT / "integrations" / "dbt"
SOURCES = DBT_DIR / "sources.yml"
SOURCE = "ideogram_sync"
SCHEMA = "ideogram"  # the dbt test syncs into a schema of its own, named through the var
DBT = Path(sys.executable).with_name("dbt")
# The four resources a sync of ALL_RESOURCES runs.
RESOURCES = ALL_RESOURCES["IDEOGRAM_SYNC_RESOURCES"].split(",")
# MariaDB's limits for a column's and a table's comment.
MAX_COLUMN_COMMENT = 1024
MAX_TABLE_COMMENT = 2048


@cache
def comments_migration() -> ModuleType:
    """The newest migration that carries COMMENTS: the descriptions as the database has them."""
    for path in sorted((ROOT / "migrations" / "versions").glob("[0-9]*.py"), reverse=True):
        if "\nCOMMENTS" not in path.read_text():
            continue
        spec = importlib.util.spec_from_file_location(f"_comments_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    raise AssertionError("no migration defines COMMENTS")


def comments() -> dict[str, tuple[str, dict[str, str]]]:
    return comments_migration().COMMENTS


def views() -> frozenset[str]:
    return comments_migration().VIEWS


def source() -> dict[str, Any]:
    sources = yaml.safe_load(SOURCES.read_text())["sources"]
    assert [s["name"] for s in sources] == [SOURCE]
    return sources[0]


def source_tables() -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in source()["tables"]}


# --- sources.yml and the comments ---------------------------------------------------------


def test_sources_carry_the_comments_of_the_migration() -> None:
    """Every description in sources.yml is the comment the migration writes, and the other
    way round: same objects, same columns in the same order, same texts."""
    tables = source_tables()
    assert list(tables) == list(comments())
    for name, (comment, columns) in comments().items():
        table = tables[name]
        assert table["description"] == comment, name
        listed = {c["name"]: c.get("description") for c in table["columns"]}
        assert list(listed) == list(columns), name
        for column, text in columns.items():
            assert listed[column] == text, f"{name}.{column}"


def test_descriptions_fit_every_database_and_dbt() -> None:
    for name, (comment, columns) in comments().items():
        assert comment and len(comment) <= MAX_TABLE_COMMENT, name
        for column, text in {"(table)": comment, **columns}.items():
            where = f"{name}.{column}"
            assert text and len(text) <= MAX_COLUMN_COMMENT, where
            # ASCII (MariaDB keeps comments in utf8mb3), nothing a driver or an SQL literal
            # would read as an escape or a placeholder, nothing dbt's Jinja would render.
            assert text.isascii() and "\\" not in text and "%" not in text, where
            assert not re.search(r"\{[{%#]", text), where
            assert text == text.strip() and "\n" not in text, where


def test_sources_list_every_table_view_and_column_of_the_migrations(sqlite_url: str) -> None:
    """A new table, view or column fails here until sources.yml (and a comments migration)
    describes it."""
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        inspector = sa.inspect(engine)
        live = {
            name: [c["name"] for c in inspector.get_columns(name)]
            for name in [*inspector.get_table_names(), *inspector.get_view_names()]
            if name != "alembic_version"
        }
        live_views = set(inspector.get_view_names())
    finally:
        engine.dispose()
    tables = source_tables()
    assert sorted(tables) == sorted(live)
    assert live_views == set(views())
    for name, columns in live.items():
        assert [c["name"] for c in tables[name]["columns"]] == columns, name


def test_sources_yml_is_set_up_for_the_schema_var_keys_and_freshness() -> None:
    src = source()
    assert src["schema"] == "{{ var('ideogram_sync_schema', 'public') }}"
    tables = source_tables()
    runs = tables["sync_runs"]["config"]
    assert runs["loaded_at_field"] == "finished_at"
    assert runs["freshness"]["filter"] == "status = 'success'"
    assert set(runs["freshness"]) == {"warn_after", "error_after", "filter"}
    # Only sync_runs has a freshness check (and no other table needs a loaded_at_field).
    assert [n for n, t in tables.items() if "freshness" in t.get("config", {})] == ["sync_runs"]
    # The primary keys of the tables for reporting, and the key of each view, are tested.
    keys = {
        "datasets": "dataset_id",
        "dataset_history": "id",
        "models": "model_id",
        "model_history": "id",
        "model_training_runs": "training_run_id",
        "sync_runs": "id",
        "datasets_current": "dataset_id",
        "models_current": "model_id",
        "sync_runs_latest": "run_id",
    }
    for name, key in keys.items():
        column = next(c for c in tables[name]["columns"] if c["name"] == key)
        assert {"unique", "not_null"} <= set(map(_test_name, column["data_tests"])), name
    for name in ("dataset_files", "dataset_models", "sync_runs_latest", "sync_daily"):
        assert "unique" in map(_test_name, tables[name]["data_tests"]), name
    # The internal tables, which the read-only user of docs/bi.md cannot read, have none.
    for name in ("sync_locks", "sync_notices"):
        assert "data_tests" not in tables[name]
        assert not any("data_tests" in c for c in tables[name]["columns"]), name


def _test_name(test: str | dict[str, Any]) -> str:
    return test if isinstance(test, str) else next(iter(test))


# --- The comments in the databases --------------------------------------------------------


def _catalog(url: str) -> list[tuple[Any, ...]]:
    """Every column of every table and view as information_schema has it, less the comment."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                query = (
                    "SELECT table_name, ordinal_position, column_name, column_default, "
                    "is_nullable, data_type, character_maximum_length, numeric_precision, "
                    "numeric_scale, datetime_precision, collation_name, udt_name, is_identity, "
                    "is_generated FROM information_schema.columns "
                    "WHERE table_schema = current_schema() ORDER BY 1, 2"
                )
            else:
                query = (
                    "SELECT TABLE_NAME, ORDINAL_POSITION, COLUMN_NAME, COLUMN_DEFAULT, "
                    "IS_NULLABLE, DATA_TYPE, CHARACTER_MAXIMUM_LENGTH, NUMERIC_PRECISION, "
                    "NUMERIC_SCALE, DATETIME_PRECISION, CHARACTER_SET_NAME, COLLATION_NAME, "
                    "COLUMN_TYPE, COLUMN_KEY, EXTRA, IS_GENERATED "
                    "FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
                    "ORDER BY 1, 2"
                )
            rows = [tuple(r) for r in conn.exec_driver_sql(query)]
            if conn.dialect.name != "postgresql":
                rows += [
                    ("check", *r)
                    for r in conn.exec_driver_sql(
                        "SELECT TABLE_NAME, CONSTRAINT_NAME, CHECK_CLAUSE "
                        "FROM information_schema.CHECK_CONSTRAINTS "
                        "WHERE CONSTRAINT_SCHEMA = DATABASE() ORDER BY 1, 2"
                    )
                ]
            return rows
    finally:
        engine.dispose()


_DDL_COMMENT = re.compile(r" COMMENT ?=? ?'(?:[^'\\]|''|\\.)*'")


def _without_comments(dump: dict[str, Any]) -> dict[str, Any]:
    """A snapshot (tests/test_migration_resume.py) with every comment taken out, and without
    alembic_version."""
    out: dict[str, Any] = {}
    for key, value in dump.items():
        if key == "table alembic_version":
            continue
        if isinstance(value, dict):
            value = dict(value)
            if "ddl" in value:
                value["ddl"] = _DDL_COMMENT.sub("", value["ddl"])
            if "options" in value:
                value["options"] = {k: v for k, v in value["options"].items() if "comment" not in k}
            if "checks" in value:
                value["checks"] = sorted(value["checks"], key=repr)
        out[key] = value
    return out


def _live_comments(url: str) -> dict[str, tuple[str | None, dict[str, str | None]]]:
    """Each table's and view's comment and its columns' comments, as the database has them."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                objects = conn.exec_driver_sql(
                    "SELECT c.relname, obj_description(c.oid, 'pg_class') FROM pg_class c "
                    "WHERE c.relnamespace = to_regnamespace(current_schema()) "
                    "AND c.relkind IN ('r', 'v')"
                ).all()
                columns = conn.exec_driver_sql(
                    "SELECT c.relname, a.attname, col_description(c.oid, a.attnum) "
                    "FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid "
                    "WHERE c.relnamespace = to_regnamespace(current_schema()) "
                    "AND c.relkind IN ('r', 'v') AND a.attnum > 0 AND NOT a.attisdropped"
                ).all()
            else:
                objects = conn.exec_driver_sql(
                    "SELECT TABLE_NAME, TABLE_COMMENT FROM information_schema.TABLES "
                    "WHERE TABLE_SCHEMA = DATABASE()"
                ).all()
                columns = conn.exec_driver_sql(
                    "SELECT TABLE_NAME, COLUMN_NAME, COLUMN_COMMENT FROM information_schema.COLUMNS "
                    "WHERE TABLE_SCHEMA = DATABASE()"
                ).all()
    finally:
        engine.dispose()
    live: dict[str, tuple[str | None, dict[str, str | None]]] = {
        name: (comment, {}) for name, comment in objects
    }
    for table, column, comment in columns:
        live[table][1][column] = comment
    live.pop("alembic_version", None)
    return live


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_the_comments_are_in_the_database_and_change_nothing_else(
    backend: str, tmp_path: Path
) -> None:
    migration = comments_migration()
    for url in database_url_for(backend, tmp_path):
        # Rows from an early version, carried through every migration.
        upgrade(url, "0001")
        seed(url)
        upgrade(url, migration.down_revision)
        before, catalog, described = snapshot(url), _catalog(url), _live_comments(url)

        upgrade(url, migration.revision)
        live = _live_comments(url)
        mariadb = backend == "mysql"
        for name, (comment, columns) in comments().items():
            table_comment, column_comments = live[name]
            if mariadb and name in views():
                # MariaDB/MySQL views cannot carry comments (information_schema shows a view
                # column that selects a table column with that column's comment).
                assert table_comment == "VIEW", name
                continue
            assert table_comment == comment, name
            assert column_comments == columns, name
        # Types, collations, nullability, defaults, checks, keys, indexes, rows: as before.
        assert _catalog(url) == catalog
        assert _without_comments(snapshot(url)) == _without_comments(before)

        # The downgrade puts the comments back as they were (none, before the first comments
        # migration), and changes nothing else; upgrading writes them again.
        commented = snapshot(url)
        engine = make_engine(url)
        try:
            with engine.begin() as conn:
                command.downgrade(alembic_config(conn), migration.down_revision)
        finally:
            engine.dispose()
        assert snapshot(url) == before
        assert _live_comments(url) == described
        upgrade(url)
        assert snapshot(url) == commented


# --- dbt -------------------------------------------------------------------------------------


def _catalogue(api: FakeApi) -> None:
    """Datasets with files (sizes partly unknown), owned and shared models, training runs."""
    api.datasets = [dataset("a", "Cats"), dataset("b", "Dogs"), dataset("c", "Empty", cover=None)]
    api.files = {
        "a": [file("a1.png", 100), file("a2.png", 250)],
        "b": [file("b1.png", None), file(None, None)],
    }
    api.models = [
        model("m1", "Cat model", dataset_id="a"),
        model("m2", "Shared cats", dataset_id="a", owned=False),
        model("m3", "Loose", status="TRAINING", updated=None),
    ]
    api.training_runs = {
        "m1": [
            training_run("t1", "ERRORED", created="2025-02-01T09:00:00+02:00"),
            training_run("t2", "COMPLETED", created="2025-02-02T09:00:00Z"),
        ],
        "m3": [training_run("t3", "TRAINING", updated=None)],
    }


def _dbt_env(parsed: URL, project: Path) -> dict[str, str]:
    """The example project's profile (profiles.yml reads these) pointed at `parsed`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDEOGRAM_", "DBT_"))}
    env.update(
        DBT_PROFILES_DIR=str(project),
        DBT_SEND_ANONYMOUS_USAGE_STATS="false",
        DBT_VERSION_CHECK="false",
        DBT_USE_COLORS="false",
        IDEOGRAM_DBT_HOST=parsed.host or "localhost",
        IDEOGRAM_DBT_PORT=str(parsed.port or 5432),
        IDEOGRAM_DBT_USER=parsed.username or "postgres",
        DBT_ENV_SECRET_IDEOGRAM_PASSWORD=parsed.password or "",
        IDEOGRAM_DBT_DBNAME=parsed.database or "",
    )
    return env


def _dbt(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DBT), *args, "--vars", json.dumps({"ideogram_sync_schema": SCHEMA})],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _freshness(project: Path) -> str:
    results = json.loads((project / "target" / "sources.json").read_text())["results"]
    assert [r["unique_id"].rsplit(".", 1)[-1] for r in results] == ["sync_runs"]
    return str(results[0]["status"])


def _age_the_successes(url: str, hours: float) -> None:
    """Every successful run ended `hours` ago; a failed one ended just now."""
    now = datetime.now(UTC)
    engine = make_engine(url, SCHEMA)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE sync_runs SET finished_at = :t WHERE status = 'success'"),
                {"t": now - timedelta(hours=hours)},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO sync_runs (account, resource, started_at, finished_at, status, "
                    "datasets_seen, inserted, updated, unchanged, deleted, rejected, error) "
                    "VALUES ('default', 'datasets', :t, :t, 'failed', 0, 0, 0, 0, 0, 0, 'boom')"
                ),
                {"t": now},
            )
    finally:
        engine.dispose()


def test_dbt_parses_checks_freshness_and_tests_the_sources(
    cli: Any, fake_api: FakeApi, tmp_path: Path
) -> None:
    if not DBT.exists() or importlib.util.find_spec("dbt.adapters.postgres") is None:
        pytest.skip(
            "dbt is not installed in this environment: pip install -e '.[test,dbt]' "
            "(.ci/run installs it)"
        )
    for url in database_url_for("postgresql", tmp_path):
        # The tool in a schema of its own, which dbt finds through the var.
        (tmp_path / "ideogram-sync.toml").write_text(f'[database]\nschema = "{SCHEMA}"\n')
        _catalogue(fake_api)
        assert cli("--database-url", url, "run", env=ALL_RESOURCES).code == 0
        # A second sync that changes, deletes and adds: every kind of history row.
        fake_api.datasets = [dataset("a", "Cats 2"), dataset("c", "Empty"), dataset("d")]
        fake_api.models = [model("m1", "Cat model", dataset_id="a"), model("m4", dataset_id="d")]
        fake_api.training_runs["m4"] = [training_run("t4")]
        result = cli("--database-url", url, "run", env=ALL_RESOURCES)
        assert result.code == 0, result.err

        # dbt connects as the read-only user of docs/bi.md, its grants made in this schema.
        database = make_url(url).database
        assert database
        user = f"bi_{database[-10:]}"
        admin = make_engine(url, SCHEMA)
        recipe = bi_recipe("postgresql", database, user)
        run_as_client(admin, [s.replace("SCHEMA public", f"SCHEMA {SCHEMA}") for s in recipe])
        try:
            _run_dbt(url, user, tmp_path)
        finally:
            # Revokes its grants here and on the database, so the role can go.
            run_as_client(admin, [f"DROP OWNED BY {user}", f"DROP ROLE IF EXISTS {user}"])
            admin.dispose()


def _run_dbt(url: str, user: str, tmp_path: Path) -> None:
    project = tmp_path / "dbt_project"
    # symlinks=False: the project's models/sources.yml is a link to ../../sources.yml.
    shutil.copytree(DBT_DIR / "example_project", project, symlinks=False)
    assert (project / "models" / "sources.yml").read_text() == SOURCES.read_text()
    env = _dbt_env(make_url(url).set(username=user, password=BI_PASSWORD), project)

    parsed = _dbt(project, env, "parse")
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr
    assert "deprecat" not in parsed.stdout.lower(), parsed.stdout
    manifest = json.loads((project / "target" / "manifest.json").read_text())
    assert {s["name"] for s in manifest["sources"].values()} == set(comments())
    assert {s["schema"] for s in manifest["sources"].values()} == {SCHEMA}
    tests = [n for n in manifest["nodes"].values() if n["resource_type"] == "test"]
    assert len(tests) >= 30
    assert "test.ideogram_sync_example.ideogram_sync_stale" in {n["unique_id"] for n in tests}

    fresh = _dbt(project, env, "source", "freshness")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert _freshness(project) == "pass"

    tested = _dbt(project, env, "test", "--select", f"source:{SOURCE}")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    results = json.loads((project / "target" / "run_results.json").read_text())["results"]
    assert len(results) == len(tests)
    assert {r["status"] for r in results} == {"pass"}, [
        (r["unique_id"], r["status"], r.get("message")) for r in results
    ]

    # The last success 3 hours ago (a failed run since, which does not count): a warning,
    # and dbt still exits 0; 7 hours ago: an error.
    _age_the_successes(url, 3)
    warned = _dbt(project, env, "source", "freshness")
    assert warned.returncode == 0, warned.stdout + warned.stderr
    assert _freshness(project) == "warn"
    _age_the_successes(url, 7)
    stale = _dbt(project, env, "source", "freshness")
    assert stale.returncode != 0, stale.stdout
    assert _freshness(project) == "error"
    # The example's singular test finds every account and resource past the error threshold.
    late = _dbt(project, env, "test", "--select", "ideogram_sync_stale")
    assert late.returncode != 0, late.stdout
    (result,) = json.loads((project / "target" / "run_results.json").read_text())["results"]
    assert (result["status"], result["failures"]) == ("fail", len(RESOURCES))
