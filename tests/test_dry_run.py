"""`run --dry-run` (issue 18, point 1): what a run would change, found exactly as a run finds
it, with nothing written, no run row, no lock, and the real run's exit code."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sync.db import make_engine
from tests.conftest import ALL_RESOURCES, rows
from tests.fakeapi import FakeApi, dataset, model

TABLES = ("datasets", "dataset_history", "sync_runs", "sync_locks", "models", "dataset_files")


def everything(url: str) -> dict[str, list[dict[str, Any]]]:
    return {table: rows(url, table) for table in TABLES}


def dry(cli: Any, url: str, *extra: str, env: dict[str, str] | None = None) -> Any:
    return cli("--database-url", url, "run", "--dry-run", *extra, env=env)


@pytest.fixture
def changed(cli: Any, fake_api: FakeApi, db_url: str) -> str:
    """A synced database (a, b, c; c then removed and synced), and a listing that renames a,
    brings c back, drops b, adds d and holds an invalid record."""
    fake_api.datasets = [dataset("a"), dataset("b"), dataset("c")]
    assert cli("--database-url", db_url, "run").code == 0
    fake_api.datasets = [dataset("a"), dataset("b")]
    assert cli("--database-url", db_url, "run").code == 0
    fake_api.datasets = [
        dataset("a", "renamed"),
        dataset("c"),
        dataset("d"),
        {"dataset_id": "e", "name": "no user"},
    ]
    return db_url


def test_a_dry_run_says_what_would_change_and_changes_nothing(cli: Any, changed: str) -> None:
    before = everything(changed)
    result = dry(cli, changed)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == (
        "account default, datasets: would insert 1, update 1, restore 1, soft-delete 1, "
        "reject 1 (0 unchanged, 4 listed)"
    )
    assert lines[1:] == [
        "  insert: d",
        "  update: a",
        "  restore: c",
        "  soft-delete: b",
        "  reject: e",
    ]
    assert "rejected dataset e: user_id" in result.err  # logged as a run logs it
    assert everything(changed) == before  # not a row, not a run, not a lease

    # A real run then does exactly that.
    assert cli("--database-url", changed, "run").code == 0
    last = rows(changed, "sync_runs", "id")[-1]
    counts = (last["inserted"], last["updated"], last["deleted"], last["rejected"])
    assert counts == (1, 2, 1, 1)  # updated counts the restore too


def test_json_and_the_first_20_ids(cli: Any, fake_api: FakeApi, sqlite_url: str) -> None:
    assert cli("--database-url", sqlite_url, "migrate").code == 0
    fake_api.datasets = [dataset(f"n{i:02d}") for i in range(25)]
    result = dry(cli, sqlite_url, "--format", "json")
    assert result.code == 0, result.err
    (found,) = json.loads(result.out)
    assert (found["account"], found["resource"], found["would_succeed"]) == (
        "default",
        "datasets",
        True,
    )
    assert found["counts"]["insert"] == 25 and found["exit_code"] == 0
    assert found["first_ids"]["insert"] == [f"n{i:02d}" for i in range(20)]
    assert rows(sqlite_url) == [] and rows(sqlite_url, "sync_runs") == []


def test_the_mass_delete_guard_is_reported_with_its_exit_code(
    cli: Any, fake_api: FakeApi, db_url: str, tmp_path: Path
) -> None:
    fake_api.datasets = [dataset("a"), dataset("b"), dataset("c")]
    assert cli("--database-url", db_url, "run").code == 0
    config = tmp_path / "guard.toml"
    config.write_text("[sync]\nmax_delete_fraction = 0.5\n")
    fake_api.datasets = []
    before = everything(db_url)
    refused = dry(cli, db_url, "--config", str(config))
    assert refused.code == 1
    assert "soft-delete 3" in refused.out
    assert "a run would fail (exit 1)" in refused.out and "max_delete_fraction" in refused.out
    allowed = dry(cli, db_url, "--config", str(config), "--allow-mass-delete")
    assert allowed.code == 0 and "a run would fail" not in allowed.out
    assert everything(db_url) == before


def test_the_real_runs_exit_codes(
    cli: Any, fake_api: FakeApi, sqlite_url: str, tmp_path: Path
) -> None:
    assert cli("--database-url", sqlite_url, "migrate").code == 0
    fake_api.datasets = [dataset("a")]
    fake_api.rejected_keys.add("sk-wrong")
    rejected = cli("--database-url", sqlite_url, "run", "--dry-run", key="sk-wrong")
    assert rejected.code == 3 and "rejected the key" in rejected.out
    assert "sk-wrong" not in rejected.output

    fake_api.refused["/models"] = 403
    models_refused = dry(cli, sqlite_url, env=ALL_RESOURCES)
    assert models_refused.code == 1
    assert "account default, datasets: would insert 1" in models_refused.out
    assert 'Remove "models" from [sync] resources' in models_refused.out

    strict = tmp_path / "strict.toml"
    strict.write_text('[sync]\non_invalid_record = "fail"\n')
    fake_api.datasets = [dataset("a"), {"dataset_id": "bad"}]
    failing = dry(cli, sqlite_url, "--config", str(strict))
    assert failing.code == 1 and "on_invalid_record" in failing.out
    assert rows(sqlite_url, "sync_runs") == []


def test_details_and_models_are_previewed(cli: Any, fake_api: FakeApi, sqlite_url: str) -> None:
    fake_api.datasets = [dataset("a"), dataset("b")]
    fake_api.models = [model("m1", dataset_id="a"), model("m2", owned=False)]
    assert (
        cli(
            "--database-url", sqlite_url, "run", env={"IDEOGRAM_SYNC_RESOURCES": "datasets,models"}
        ).code
        == 0
    )
    fake_api.models = [model("m1", "renamed", dataset_id="a")]
    fake_api.requests.clear()
    result = dry(cli, sqlite_url, env=ALL_RESOURCES)
    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        "account default, datasets: would insert 0, update 0, restore 0, soft-delete 0, reject 0 (2 unchanged, 2 listed)",
        "account default, dataset_details: would ask for the details of the 2 row(s) due now, and of those its listing inserts, updates or restores",
        "account default, models: would insert 0, update 1, restore 0, soft-delete 1, reject 0 (0 unchanged, 1 listed)",
        "  update: m1",
        "  soft-delete: m2",
        "account default, model_details: would ask for the details of the 1 row(s) due now, and of those its listing inserts, updates or restores",
    ]
    # The listings only: a dry run asks for no details.
    assert fake_api.paths() == ["/datasets", "/models"]


def test_a_dry_run_needs_no_lock(cli: Any, fake_api: FakeApi, sqlite_url: str) -> None:
    fake_api.datasets = [dataset("a")]
    assert cli("--database-url", sqlite_url, "run").code == 0
    engine = make_engine(sqlite_url)
    with engine.begin() as conn:  # another run's lease, alive for an hour
        now = datetime.now(UTC)
        conn.execute(
            sa.text(
                "INSERT INTO sync_locks (account, owner, acquired_at, expires_at) "
                "VALUES ('default', 'elsewhere:1:x:y', :now, :later)"
            ),
            {
                "now": now.replace(tzinfo=None),
                "later": (now + timedelta(hours=1)).replace(tzinfo=None),
            },
        )
    engine.dispose()
    fake_api.datasets = [dataset("a", "renamed")]
    # And SQLite's write lock held by another connection all along.
    writer = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), timeout=0)
    writer.execute("BEGIN IMMEDIATE")
    try:
        result = dry(cli, sqlite_url)
    finally:
        writer.rollback()
        writer.close()
    assert result.code == 0, result.err
    assert "update 1" in result.out
    assert cli("--database-url", sqlite_url, "run").code == 5  # the lease is still held


def test_a_database_behind_is_not_migrated(cli: Any, fake_api: FakeApi, db_url: str) -> None:
    fake_api.datasets = [dataset("a")]
    result = dry(cli, db_url)
    # An empty server database names the migration; a SQLite file is not even created.
    assert result.code == 2
    assert "ideogram-sync migrate" in result.err or "no synced database yet" in result.err
    if db_url.startswith("sqlite"):
        assert not Path(db_url.removeprefix("sqlite:///")).exists()
        return
    engine = make_engine(db_url)
    try:
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
