"""The command line: help, exit codes, status, --input, --no-migrate, secrets, a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from sync.cli import build_parser, main
from sync.db import make_engine, migrate
from sync.models import sync_runs
from tests.conftest import ALL_RESOURCES, API_KEY, ONLY_DATASETS, rows
from tests.fakeapi import FakeApi, Reply, dataset, model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "datasets.json"


def test_help_lists_every_command_and_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in (
        "run",
        "migrate",
        "status",
        "--config",
        "--database-url",
        "--log-level",
        "--verbose",
    ):
        assert word in out
    assert "3    the API rejected the key" in out


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2


def test_readme_documents_every_option() -> None:
    readme = (ROOT / "README.md").read_text()
    parser = build_parser()
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag not in ("--help", "--version"):
                assert flag in readme, f"{flag} is not documented in README.md"
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():  # type: ignore[union-attr]
        assert f"ideogram-sync {name}" in readme
        for action in sub._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert flag in readme, f"{name} {flag} is not documented in README.md"


def test_run_from_input_file_needs_no_key(cli, sqlite_url: str) -> None:
    result = cli("--database-url", sqlite_url, "run", "--input", str(EXAMPLE), key=None)
    assert result.code == 0, result.err
    assert len(rows(sqlite_url)) == 3


def test_run_from_stdin(sqlite_url: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sync", "--database-url", sqlite_url, "run", "--input", "-"],
        input=EXAMPLE.read_bytes(),
        capture_output=True,
        cwd=tmp_path,
        env=_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert len(rows(sqlite_url)) == 3


def test_missing_key_is_a_config_error(cli, sqlite_url: str) -> None:
    result = cli("--database-url", sqlite_url, "run", key=None)
    assert result.code == 2
    assert "set the environment variable IDEOGRAM_API_KEY" in result.err
    # Nothing reached the API.
    assert "Traceback" not in result.err


def test_missing_input_file_is_a_usage_error(cli, sqlite_url: str) -> None:
    result = cli("--database-url", sqlite_url, "run", "--input", "nope.json")
    assert result.code == 2
    assert "cannot read --input nope.json" in result.err


def test_unknown_config_key_exit_2(cli, tmp_path: Path) -> None:
    (tmp_path / "ideogram-sync.toml").write_text("[api]\nretries = 3\n")
    result = cli("run")
    assert result.code == 2
    assert "unknown key api.retries" in result.err


def test_no_migrate_refuses_a_database_behind(cli, sqlite_url: str) -> None:
    result = cli("--database-url", sqlite_url, "run", "--no-migrate", "--input", str(EXAMPLE))
    assert result.code == 2
    assert "ideogram-sync migrate" in result.err
    engine = make_engine(sqlite_url)
    assert sa.inspect(engine).get_table_names() == []
    engine.dispose()

    assert cli("--database-url", sqlite_url, "migrate").code == 0
    result = cli("--database-url", sqlite_url, "run", "--no-migrate", "--input", str(EXAMPLE))
    assert result.code == 0, result.err


def test_migrate_twice_is_a_no_op(cli, sqlite_url: str) -> None:
    assert cli("--database-url", sqlite_url, "migrate").code == 0
    result = cli("--database-url", sqlite_url, "migrate")
    assert result.code == 0
    assert "up to date" in result.err


def test_status_shows_runs_and_exit_code(cli, fake_api: FakeApi, sqlite_url: str) -> None:
    assert cli("--database-url", sqlite_url, "migrate").code == 0
    empty = cli("--database-url", sqlite_url, "status")
    assert empty.code == 1 and "no runs recorded yet" in empty.out

    fake_api.datasets = [dataset("a"), dataset("b")]
    assert cli("--database-url", sqlite_url, "run").code == 0
    ok = cli("--database-url", sqlite_url, "status")
    assert ok.code == 0
    header, line = ok.out.splitlines()[:2]
    assert header.split()[:6] == ["ACCOUNT", "RESOURCE", "RUN", "STARTED", "(UTC)", "DURATION"]
    assert line.split()[:2] == ["default", "datasets"] and "success" in line

    fake_api.push(Reply(401, {"detail": "bad key"}))
    assert cli("--database-url", sqlite_url, "run").code == 3
    failed = cli("--database-url", sqlite_url, "status")
    assert failed.code == 1
    assert "failed" in failed.out.splitlines()[1] and "HTTP 401" in failed.out


def test_status_limit(cli, sqlite_url: str) -> None:
    for _ in range(4):
        assert cli("--database-url", sqlite_url, "run", "--input", str(EXAMPLE)).code == 0
    result = cli("--database-url", sqlite_url, "status", "--limit", "2")
    assert len(result.out.splitlines()) == 3


def test_database_password_never_shown(cli, tmp_path: Path) -> None:
    url = "postgresql://sync:hunter2-secret@127.0.0.1:1/db"
    result = cli("--database-url", url, "-v", "run", "--input", str(EXAMPLE))
    assert result.code == 1
    assert "hunter2-secret" not in result.output
    assert "***" in result.err
    assert "database error" in result.err


def test_unreachable_database_is_one_line(cli, tmp_path: Path) -> None:
    url = "postgresql://sync:pw-xyz-123@127.0.0.1:1/db"
    result = cli("--database-url", url, "run", "--input", str(EXAMPLE))
    assert result.code == 1
    errors = [line for line in result.err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in result.err
    assert "pw-xyz-123" not in result.output


def test_key_never_in_output_even_at_debug(cli, fake_api: FakeApi, sqlite_url: str) -> None:
    fake_api.push(Reply(500, {"detail": f"echo {API_KEY}"}))
    result = cli(
        "--database-url", sqlite_url, "-v", "--log-level", "DEBUG", "run",
        env={"IDEOGRAM_SYNC_CONFIG": _fast_config()},
    )  # fmt: skip
    assert result.code == 1
    assert API_KEY not in result.output
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        errors = [r.error for r in conn.execute(sa.select(sync_runs.c.error))]
    engine.dispose()
    assert errors and all(API_KEY not in (e or "") for e in errors)


def _fast_config() -> str:
    Path("fast.toml").write_text("[api]\nmax_retries = 0\nbackoff_factor = 0\n")
    return "fast.toml"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEOGRAM_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def test_real_process_against_fake_api(fake_api: FakeApi, tmp_path: Path) -> None:
    fake_api.datasets = [dataset("a"), dataset("b")]
    env = _env(IDEOGRAM_API_KEY=API_KEY, IDEOGRAM_API_BASE_URL=fake_api.url)
    result = subprocess.run(
        [sys.executable, "-m", "sync", "run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ideogram_sync.db").is_file()  # the default database
    assert "inserted=2" in result.stderr
    assert API_KEY not in result.stderr + result.stdout


def test_wheel_ships_migrations_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    """A non-editable install must find its migrations without alembic.ini or the checkout."""
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(ROOT)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sync/migrations/env.py" in names
    assert "sync/migrations/script.py.mako" in names
    assert any(n.startswith("sync/migrations/versions/0001_") for n in names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _env(PYTHONPATH=str(site))
    result = subprocess.run(
        [sys.executable, "-m", "sync", "run", "--input", str(EXAMPLE)],
        capture_output=True, text=True, cwd=work, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    check = subprocess.run(
        [sys.executable, "-c", "import sync.db as d; print(d.migrations_dir())"],
        capture_output=True, text=True, cwd=work, env=env, check=True,
    )  # fmt: skip
    assert check.stdout.strip().startswith(str(site))
    assert len(rows(f"sqlite:///{work / 'ideogram_sync.db'}")) == 3


def test_migrate_command_on_every_backend(cli, db_url: str) -> None:
    assert cli("--database-url", db_url, "migrate").code == 0
    engine = make_engine(db_url)
    try:
        assert {"datasets", "sync_runs"} <= set(sa.inspect(engine).get_table_names())
        migrate(engine)  # idempotent
    finally:
        engine.dispose()


def test_status_json(cli, fake_api: FakeApi, sqlite_url: str) -> None:
    import json

    assert cli("--database-url", sqlite_url, "migrate").code == 0
    assert cli("--database-url", sqlite_url, "status", "--format", "json").out.strip() == "[]"
    fake_api.datasets = [dataset("a")]
    assert cli("--database-url", sqlite_url, "run").code == 0
    result = cli("--database-url", sqlite_url, "status", "--format", "json")
    assert result.code == 0
    (run,) = json.loads(result.out)
    assert run["account"] == "default" and run["status"] == "success"
    assert run["resource"] == "datasets"
    assert run["inserted"] == 1 and run["error"] is None
    assert run["started_at"].endswith("Z") and run["duration_seconds"] >= 0


def test_datasets_command_formats(cli, fake_api: FakeApi, db_url: str) -> None:
    import csv
    import io
    import json

    fake_api.datasets = [dataset("a", 'Alpha, "quoted"'), dataset("b", note={"k": [1]})]
    assert cli("--database-url", db_url, "run").code == 0
    fake_api.datasets = [dataset("a", 'Alpha, "quoted"')]
    assert cli("--database-url", db_url, "run").code == 0

    table = cli("--database-url", db_url, "datasets")
    assert table.code == 0
    assert table.out.splitlines()[0].split()[:3] == ["DATASET_ID", "NAME", "USER_ID"]
    assert len(table.out.splitlines()) == 2

    as_csv = cli("--database-url", db_url, "datasets", "--format", "csv", "--include-deleted")
    records = list(csv.DictReader(io.StringIO(as_csv.out)))
    assert {r["dataset_id"] for r in records} == {"a", "b"}
    a = next(r for r in records if r["dataset_id"] == "a")
    assert a["name"] == 'Alpha, "quoted"' and a["deleted_at"] == ""
    b = next(r for r in records if r["dataset_id"] == "b")
    assert json.loads(b["extra"]) == {"note": {"k": [1]}} and b["deleted_at"].endswith("Z")

    as_json = json.loads(cli("--database-url", db_url, "datasets", "--format", "json").out)
    assert [d["dataset_id"] for d in as_json] == ["a"]
    assert as_json[0]["creation_time"] == "2024-12-15T17:32:00.965408Z"


def test_datasets_on_a_migrated_database_without_rows(cli, sqlite_url: str) -> None:
    assert cli("--database-url", sqlite_url, "migrate").code == 0
    result = cli("--database-url", sqlite_url, "datasets", "--format", "json")
    assert result.code == 0 and result.out.strip() == "[]"


def test_schema_option_is_postgresql_only(cli, sqlite_url: str, tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text('[database]\nschema = "ideogram"\n')
    result = cli("--config", "s.toml", "--database-url", sqlite_url, "run", "--input", str(EXAMPLE))
    assert result.code == 2
    assert "only supported on PostgreSQL" in result.err


def test_postgresql_schema_holds_everything(cli, fake_api: FakeApi, tmp_path: Path) -> None:
    from tests.conftest import database_url_for

    for url in database_url_for("postgresql", tmp_path):
        (tmp_path / "s.toml").write_text('[database]\nschema = "ideogram"\n')
        fake_api.datasets = [dataset("a")]
        result = cli("--config", "s.toml", "--database-url", url, "run")
        assert result.code == 0, result.err
        assert cli("--config", "s.toml", "--database-url", url, "status").code == 0
        engine = make_engine(url)
        try:
            inspector = sa.inspect(engine)
            assert inspector.get_table_names(schema="public") == []
            assert inspector.get_view_names(schema="public") == []
            assert set(inspector.get_table_names(schema="ideogram")) == {
                "alembic_version", "datasets", "sync_runs", "dataset_history", "sync_locks",
                "dataset_files", "models", "model_history", "model_training_runs", "sync_notices",
            }  # fmt: skip
            assert set(inspector.get_view_names(schema="ideogram")) == {
                "datasets_current", "sync_runs_latest", "sync_daily", "models_current",
                "dataset_models",
            }  # fmt: skip
        finally:
            engine.dispose()
        # A second run finds the schema at head and changes nothing.
        again = cli("--config", "s.toml", "--database-url", url, "run", "--no-migrate")
        assert again.code == 0, again.err


def test_status_max_age(cli, fake_api: FakeApi, sqlite_url: str, tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from sync.models import sync_runs as runs_table

    assert cli("--database-url", sqlite_url, "migrate").code == 0
    never = cli("--database-url", sqlite_url, "status", "--max-age", "2h")
    assert never.code == 4 and "no successful run yet" in never.err

    fake_api.datasets = [dataset("a")]
    assert cli("--database-url", sqlite_url, "run").code == 0
    fresh = cli("--database-url", sqlite_url, "status", "--max-age", "2h")
    assert fresh.code == 0, fresh.err

    # Age the success: three hours ago is older than 2h but younger than 1d.
    engine = make_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(
            sa.update(runs_table).values(finished_at=datetime.now(UTC) - timedelta(hours=3))
        )
    engine.dispose()
    stale = cli("--database-url", sqlite_url, "status", "--max-age", "2h")
    assert stale.code == 4 and "stale: account default: last success" in stale.err
    assert cli("--database-url", sqlite_url, "status", "--max-age", "1d").code == 0

    fake_api.push(Reply(500))
    (tmp_path / "f.toml").write_text("[api]\nmax_retries = 0\n")
    assert cli("--config", "f.toml", "--database-url", sqlite_url, "run").code == 1
    failed = cli("--database-url", sqlite_url, "status", "--max-age", "1d")
    assert failed.code == 4 and "its last run failed" in failed.err

    bad = cli("--database-url", sqlite_url, "status", "--max-age", "soon")
    assert bad.code == 2 and "--max-age must be a duration" in bad.err


def test_status_checks_every_resource(cli, fake_api: FakeApi, sqlite_url: str) -> None:
    """Each configured resource is a row of its own in `status`, and --max-age checks each:
    a failing models resource names itself, and the model details that could not run."""
    import json

    fake_api.datasets = [dataset("a")]
    fake_api.models = [model("m1", dataset_id="a")]
    fake_api.refused["/models"] = 500
    env = {**ALL_RESOURCES, "IDEOGRAM_SYNC_CONFIG": _fast_config()}
    assert cli("--database-url", sqlite_url, "run", env=env).code == 1
    table = cli("--database-url", sqlite_url, "status")
    assert table.code == 1  # a resource's newest run failed
    by_resource = {line.split()[1]: line for line in table.out.splitlines()[1:]}
    assert set(by_resource) == {"datasets", "dataset_details", "models"}
    assert "success" in by_resource["datasets"] and "success" in by_resource["dataset_details"]
    assert "failed" in by_resource["models"]
    runs = json.loads(cli("--database-url", sqlite_url, "status", "--format", "json").out)
    assert {(run["resource"], run["status"]) for run in runs} == {
        ("datasets", "success"), ("dataset_details", "success"), ("models", "failed"),
    }  # fmt: skip
    stale = cli("--database-url", sqlite_url, "status", "--max-age", "1d")
    assert stale.code == 4
    problems = sorted(
        line.split("stale: ", 1)[1] for line in stale.err.splitlines() if "stale: " in line
    )
    assert problems == [
        "account default (model_details): no successful run yet",
        "account default (models): its last run failed",
    ]
    # Datasets alone configured: the other resources' runs are not checked.
    only = cli("--database-url", sqlite_url, "status", "--max-age", "1d", env=ONLY_DATASETS)
    assert only.code == 0, only.err
    assert cli("--database-url", sqlite_url, "status", env=ONLY_DATASETS).code == 0

    del fake_api.refused["/models"]
    assert cli("--database-url", sqlite_url, "run", env=env).code == 0
    fresh = cli("--database-url", sqlite_url, "status", "--max-age", "1d")
    assert fresh.code == 0, fresh.err
    assert cli("--database-url", sqlite_url, "status").code == 0
