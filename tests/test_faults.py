"""Faults that used to hang or wedge a run (issue 15), each injected for real.

A second run while the first writes, a live holder in another PID namespace, a reader that
keeps a SQLite read transaction open, a database that does not answer, SIGTERM while the
database waits. Every test checks the exit code, the data and the run rows.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine

from tests.conftest import subprocess_env
from tests.fakeapi import FakeApi
from tests.test_reliability import data, runs, start, wait_for

ROOT = Path(__file__).resolve().parents[1]


# -- the lease never queues behind its holder ---------------------------------------------


def test_a_second_run_exits_5_while_the_first_is_writing(
    fake_api: FakeApi, synced: str, tmp_path: Path
) -> None:
    """The first run pauses inside its write transaction; the second must not wait for it."""
    marker, resume = tmp_path / "paused", tmp_path / "resume"
    env = subprocess_env(fake_api, synced, PAUSE_MARKER=str(marker), PAUSE_RESUME=str(resume))
    first = start(["run"], env, tmp_path, hook=True)
    try:
        wait_for(marker, first)
        second = start(["run"], subprocess_env(fake_api, synced), tmp_path)
        # The first stays paused (for up to 120 s) until `resume` exists: a second run that
        # queued behind its transaction would still be waiting when this gives up.
        try:
            code = second.wait(20)
        finally:
            if second.poll() is None:
                second.kill()
        _, err = second.communicate()
        assert code == 5, err
        assert "another run for account default is in progress" in err
        assert first.poll() is None, "the first run must still be inside its transaction"
    finally:
        resume.touch()
    assert first.wait(60) == 0, first.communicate()
    assert [r["status"] for r in runs(synced)] == ["success", "success"]


# -- a holder is taken over only when provably dead ------------------------------------------


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, check=False
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    not _can_unshare(), reason="needs `unshare --pid --fork --mount-proc` (root on Linux)"
)
def test_a_live_holder_in_another_pid_namespace_is_not_taken_over(
    fake_api: FakeApi, synced: str, tmp_path: Path
) -> None:
    """Two containers sharing a hostname: the pid in the lease means nothing to the other."""
    marker, resume = tmp_path / "paused", tmp_path / "resume"
    env = subprocess_env(fake_api, synced, PAUSE_MARKER=str(marker), PAUSE_RESUME=str(resume))
    # In its own PID namespace the holder is pid 2 (the shell is pid 1 and waits for it)...
    first = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "sh",
            "-c",
            f'"{sys.executable}" -m tests.pausehook run; exit $?',
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(marker, first)  # type: ignore[arg-type]
        assert marker.read_text() == "2"
        # ...and the contender is pid 1 of another namespace, where no pid 2 exists.
        second = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "sync", "run"],
            env=subprocess_env(fake_api, synced),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 5, second.stderr
        assert "took over" not in second.stderr
        assert first.poll() is None
    finally:
        resume.touch()
    assert first.wait(60) == 0, first.communicate()
    statuses = [r["status"] for r in runs(synced)]
    assert statuses == ["success", "success"], statuses
    assert "abandoned" not in str(data(synced))


# -- migrations ---------------------------------------------------------------------------


def test_only_the_process_that_migrated_says_so(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Several processes migrate a new database at once: one migrates, the rest find it done."""
    from sync.db import make_engine, migrate

    engines = [make_engine(db_url) for _ in range(4)]
    start_together = threading.Barrier(len(engines))
    results: list[tuple[str | None, str | None]] = []

    def one(engine: Engine) -> None:
        start_together.wait()
        results.append(migrate(engine))

    caplog.set_level(logging.INFO, logger="sync.db")
    try:
        threads = [threading.Thread(target=one, args=(engine,)) for engine in engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        for engine in engines:
            engine.dispose()
    assert len(results) == len(engines)
    befores = sorted((before or "") for before, _after in results)
    assert befores[0] == "" and all(befores[1:]), results  # one saw it empty, the rest at head
    said = [r.getMessage() for r in caplog.records if "migrated database from" in r.getMessage()]
    assert len(said) == 1, said


def test_a_database_newer_than_the_code_says_upgrade_not_migrate(cli: Any, db_url: str) -> None:
    from sync.db import make_engine, migrate

    engine = make_engine(db_url)
    try:
        migrate(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    finally:
        engine.dispose()
    for command in (["run", "--no-migrate"], ["run"], ["migrate"]):
        result = cli("--database-url", db_url, *command)
        assert result.code == 2, (command, result.err)
        assert "newer version of ideogram-sync" in result.err, (command, result.err)
        assert "Upgrade ideogram-sync" in result.err
        assert "run `ideogram-sync migrate`" not in result.err


# -- reading commands ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["status", "--format", "json"],
        ["status", "--max-age", "1h"],
        ["datasets"],
        ["datasets", "--format", "csv"],
    ],
)
def test_reading_commands_do_not_create_a_database(
    cli: Any, tmp_path: Path, command: list[str]
) -> None:
    """In a folder without a database: say so, exit 2, create nothing."""
    result = cli(*command)  # the default URL: ./ideogram_sync.db
    assert result.code == 2, result.err
    assert "there is no synced database yet" in result.err
    assert "ideogram_sync.db" in result.err
    assert result.out == ""
    assert list(tmp_path.iterdir()) == []


def test_reading_commands_on_a_server_database_without_tables(cli: Any, db_url: str) -> None:
    """An empty PostgreSQL/MariaDB database: the same message, the URL's password hidden."""
    url = sa.make_url(db_url)
    if url.get_backend_name() == "sqlite":
        pytest.skip("SQLite: covered by test_reading_commands_do_not_create_a_database")
    with_password = url.set(password="s3cret-pw").render_as_string(hide_password=False)
    for command in (["status"], ["datasets"]):
        result = cli("--database-url", db_url, *command)
        assert result.code == 2, result.err
        assert "there is no synced database yet" in result.err
        hidden = cli("--database-url", with_password, *command)
        assert "s3cret-pw" not in hidden.output
    engine = sa.create_engine(db_url)
    try:
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
