"""Faults that used to hang or wedge a run (issue 15), each injected for real.

A second run while the first writes, a live holder in another PID namespace, a reader that
keeps a SQLite read transaction open, a database that does not answer, SIGTERM while the
database waits. Every test checks the exit code, the data and the run rows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine

from sync.db import make_engine, migrate
from tests.conftest import database_url_for, handles_signal, rows, subprocess_env
from tests.fakeapi import FakeApi, Reply, dataset, synthetic
from tests.tcpproxy import FreezingProxy
from tests.test_reliability import data, runs, start, wait_for

ROOT = Path(__file__).resolve().parents[1]


def finish(proc: subprocess.Popen[str], seconds: float) -> tuple[int, str]:
    """Wait up to `seconds` for `proc` to exit (killing it if it does not); (code, stderr)."""
    try:
        code = proc.wait(seconds)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    return code, err


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
        code, err = finish(second, 20)
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


# -- nothing waits on the database without bound ---------------------------------------------


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "faults.toml"
    path.write_text(text)
    return str(path)


@contextlib.contextmanager
def _held_lock(url: str) -> Iterator[None]:
    """Another session holds a lock that the run's statements need, until the block ends."""
    backend = sa.make_url(url).get_backend_name()
    if backend == "sqlite":
        # The write lock: another writer with its transaction open.
        other = sqlite3.connect(sa.make_url(url).database, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.close()
        return
    engine = sa.create_engine(sa.make_url(url).set(drivername=_driver(backend)))
    try:
        with engine.connect() as conn:
            if backend == "postgresql":
                conn.exec_driver_sql("BEGIN")
                conn.exec_driver_sql("LOCK TABLE datasets IN ACCESS EXCLUSIVE MODE")
            else:
                conn.exec_driver_sql("LOCK TABLES datasets WRITE")
            yield
            conn.rollback()
    finally:
        engine.dispose()


def _driver(backend: str) -> str:
    return "postgresql+psycopg" if backend == "postgresql" else "mysql+pymysql"


def test_a_lock_held_by_another_session_ends_the_run_after_lock_timeout(
    fake_api: FakeApi, synced: str, tmp_path: Path
) -> None:
    before = data(synced)
    cfg = _config(tmp_path, "[database]\nlock_timeout_seconds = 2\n")
    with _held_lock(synced):
        proc = start(["--config", cfg, "run"], subprocess_env(fake_api, synced), tmp_path)
        code, err = finish(proc, 60)
    assert code == 1, err
    assert "longer than database.lock_timeout_seconds" in err
    assert "Traceback" not in err
    assert data(synced) == before
    if sa.make_url(synced).get_backend_name() != "sqlite":
        # SQLite: the run could not even take its lease (the write lock was held).
        last = runs(synced)[-1]
        assert last["status"] == "failed" and "lock_timeout_seconds" in last["error"]


def test_sigterm_while_the_run_waits_for_a_lock(
    fake_api: FakeApi, synced: str, tmp_path: Path
) -> None:
    before = data(synced)
    with _held_lock(synced):
        proc = start(["run"], subprocess_env(fake_api, synced), tmp_path)
        deadline = time.monotonic() + 60
        while not handles_signal(proc.pid, signal.SIGTERM) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        time.sleep(1)  # on to the lock it waits for (lock_timeout: 60 s); none is observable
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc, 10)
    assert code == 143, err
    assert "Traceback" not in err
    assert data(synced) == before
    assert "running" not in [r["status"] for r in runs(synced)]


def test_a_first_load_behind_an_idle_reader_does_not_hang(
    fake_api: FakeApi, tmp_path: Path
) -> None:
    """The reported case: a BI session idle in transaction after reading `datasets`."""
    for url in database_url_for("postgresql", tmp_path):
        engine = make_engine(url)
        try:
            migrate(engine)
            with engine.connect() as reader:
                reader.exec_driver_sql("SELECT count(*) FROM datasets").all()  # idle in transaction
                fake_api.datasets = synthetic(6000)
                cfg = _config(tmp_path, "[database]\nlock_timeout_seconds = 2\n")
                proc = start(["--config", cfg, "run"], subprocess_env(fake_api, url), tmp_path)
                code, err = finish(proc, 120)
                reader.rollback()
        finally:
            engine.dispose()
        # Either the load needed no lock the reader holds, or it gave up with the reason.
        assert code in (0, 1), err
        if code == 1:
            assert "longer than database.lock_timeout_seconds" in err
            assert rows(url) == []
        else:
            assert len(rows(url)) == 6000


def _backend_pid(url: str) -> int:
    """The server process of the (paused) run: the other session of its database."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            pids = (
                conn.exec_driver_sql(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND state = 'idle in transaction'"
                )
                .scalars()
                .all()
            )
    finally:
        engine.dispose()
    assert len(pids) == 1, pids
    return int(pids[0])


@contextlib.contextmanager
def _frozen_database(url: str, tmp_path: Path) -> Iterator[tuple[str, Callable[[], None]]]:
    """Yield (the URL the run uses, freeze()): freeze stops the run's server from answering.

    PostgreSQL: kill -STOP of the run's backend process (thawed at the end). MariaDB: one
    process serves every session, so the run goes through a relay that stops relaying.
    """
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "postgresql":
        stopped: list[int] = []

        def freeze() -> None:
            pid = _backend_pid(url)
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)

        try:
            yield url, freeze
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        return
    proxy = FreezingProxy(parsed.host or "127.0.0.1", parsed.port or 3306)
    try:
        yield parsed.set(port=proxy.port).render_as_string(hide_password=False), proxy.freeze
    finally:
        proxy.close()


@pytest.mark.parametrize("how", ["deadline", "sigterm"])
def test_a_database_that_stops_answering_mid_run(
    fake_api: FakeApi, server_synced: str, tmp_path: Path, how: str
) -> None:
    """The server stops answering inside the write transaction: the run still ends."""
    before = data(server_synced)
    marker, resume = tmp_path / "paused", tmp_path / "resume"
    deadline = 8 if how == "deadline" else 900
    cfg = _config(tmp_path, f"[sync]\ndeadline_seconds = {deadline}\n")
    with _frozen_database(server_synced, tmp_path) as (url, freeze):
        env = subprocess_env(fake_api, url, PAUSE_MARKER=str(marker), PAUSE_RESUME=str(resume))
        proc = start(["--config", cfg, "run"], env, tmp_path, hook=True)
        try:
            wait_for(marker, proc)
            freeze()
            resume.touch()  # the run's next statement goes to a server that does not answer
            if how == "sigterm":
                time.sleep(1)
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(10)
            else:
                code = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
        _, err = proc.communicate()
    assert "Traceback" not in err
    last = runs(server_synced)[-1]
    if how == "sigterm":
        assert code == 143, err
        assert last["status"] == "failed" and last["error"] == "interrupted (SIGTERM)"
    else:
        assert code == 1, err
        assert "did not finish within sync.deadline_seconds (8s)" in err
        assert last["status"] == "failed" and "sync.deadline_seconds" in last["error"]
    assert data(server_synced) == before


# -- SQLite readers never block the writer ---------------------------------------------------


def test_a_paused_sqlite_reader_does_not_block_a_run(
    cli: Any, fake_api: FakeApi, sqlite_url: str, tmp_path: Path
) -> None:
    """`ideogram-sync datasets | less`, left paused, holds its read transaction open."""
    fake_api.datasets = synthetic(5000)
    assert cli("--database-url", sqlite_url, "run").code == 0
    reader = subprocess.Popen(
        [sys.executable, "-m", "sync", "--database-url", sqlite_url, "datasets"],
        env=subprocess_env(fake_api, sqlite_url),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert reader.stdout is not None
        reader.stdout.readline()  # it has started printing; nobody reads the rest
        time.sleep(1)  # the pipe fills, and the reader waits with its cursor open
        assert reader.poll() is None
        fake_api.datasets = [*synthetic(5000)[1:], dataset("new")]
        result = cli("--database-url", sqlite_url, "run")
        assert result.code == 0, result.err
        assert runs(sqlite_url)[-1]["inserted"] == 1
        status = cli("--database-url", sqlite_url, "status")
        assert status.code == 0, status.err
        assert reader.poll() is None  # still paused, all along
    finally:
        reader.kill()
        reader.communicate()


# -- the daemon's shutdown -----------------------------------------------------------------


def test_the_daemon_aborts_a_run_that_waits_on_the_database(
    fake_api: FakeApi, synced: str, tmp_path: Path
) -> None:
    """After the grace period the run's statement is cancelled, not waited for."""
    before = data(synced)
    config = tmp_path / "daemon.toml"
    config.write_text('[schedule]\ninterval = "1h"\nshutdown_grace_seconds = 1\n')
    fake_api.gate = threading.Event()  # the start-up run waits for its listing...
    proc = subprocess.Popen(
        [sys.executable, "-m", "sync", "--config", str(config), "daemon"],
        env=subprocess_env(fake_api, synced),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(fake_api.requests) < 2:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        with _held_lock(synced):
            fake_api.gate.set()  # ...gets it, and waits for the lock (lock_timeout: 60 s)
            time.sleep(2)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(1 + 10 + 5)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, err = proc.communicate()
    assert code == 0, err
    assert "Traceback" not in err
    assert data(synced) == before
    last = runs(synced)[-1]
    if sa.make_url(synced).get_backend_name() == "sqlite":
        # The other writer held SQLite's only write lock throughout: the failed row could
        # not be written either; the next run marks it abandoned.
        assert last["status"] in ("failed", "running"), last
    else:
        assert (last["status"], last["error"]) == ("failed", "interrupted (shutting down)")


# -- the command line ---------------------------------------------------------------------


def test_every_json_line_about_a_run_carries_its_account_and_run_id(
    fake_api: FakeApi, sqlite_url: str, tmp_path: Path
) -> None:
    # After the run row exists: a first answer that comes too late (urllib3 logs its
    # retry, in the download's own thread) and a listing with an invalid record.
    migrated = subprocess.run(
        [sys.executable, "-m", "sync", "migrate"],
        env=subprocess_env(fake_api, sqlite_url),
        cwd=tmp_path,
        check=False,
    )
    assert migrated.returncode == 0
    fake_api.push(Reply(200, {"datasets": []}, delay=4))
    fake_api.datasets = [dataset("a"), {"dataset_id": "b", "name": None}]
    cfg = _config(tmp_path, "[api]\ntimeout_seconds = 2\nbackoff_factor = 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "sync", "--config", cfg, "--log-format", "json", "run"],
        env=subprocess_env(fake_api, sqlite_url),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    started = next(
        i for i, line in enumerate(lines) if line["message"] == "run 1 started for account default"
    )
    assert all(line["account"] == "default" for line in lines), lines
    assert all(line["run_id"] == 1 for line in lines[started:]), lines[started:]
    messages = [line["message"] for line in lines[started:]]
    assert any(m.startswith("Retrying") for m in messages), messages  # urllib3's
    assert any(m.startswith("rejected dataset b") for m in messages), messages


def test_global_options_are_accepted_after_the_command(cli: Any, sqlite_url: str) -> None:
    example = str(ROOT / "examples" / "datasets.json")
    result = cli("run", "--database-url", sqlite_url, "--log-level", "warning", "--input", example)
    assert result.code == 0, result.err
    assert result.err == ""  # WARNING: a successful run says nothing
    assert len(rows(sqlite_url)) == 3
    # Before the command and after it: the one after wins, the one before still counts.
    both = cli("--log-level", "warning", "status", "--database-url", sqlite_url, "-v")
    assert both.code == 0, both.err
    assert "success" in both.out


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version_flag(flag: str) -> None:
    from sync import __version__

    shown = subprocess.run(
        [sys.executable, "-m", "sync", flag],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert shown.returncode == 0
    assert shown.stdout.strip() == f"ideogram-sync {__version__}"


# -- full disks ---------------------------------------------------------------------------


@contextlib.contextmanager
def _tiny_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (needs root; skips otherwise)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> None:
    with contextlib.suppress(OSError), (folder / "filler").open("wb") as fh:
        while True:
            fh.write(b"\0" * 4096)
            fh.flush()


def test_a_full_tmpdir_does_not_fail_a_run(cli: Any, sqlite_url: str, tmp_path: Path) -> None:
    """SQLite's temporary tables and sorts stay in memory: TMPDIR may be full."""
    listing = tmp_path / "listing.json"
    listing.write_text(json.dumps({"datasets": synthetic(20000)}))
    with _tiny_disk(tmp_path / "tmp", "64k") as tmp:
        _fill(tmp)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "sync",
                "--database-url",
                sqlite_url,
                "run",
                "--input",
                str(listing),
            ],
            env={**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert len(rows(sqlite_url)) == 20000


def test_a_full_database_disk_is_named(tmp_path: Path) -> None:
    with _tiny_disk(tmp_path / "disk", "1m") as disk:
        url = f"sqlite:///{disk / 'sync.db'}"
        listing = tmp_path / "listing.json"
        listing.write_text(json.dumps({"datasets": synthetic(20000)}))
        result = subprocess.run(
            [sys.executable, "-m", "sync", "--database-url", url, "run", "--input", str(listing)],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 1, result.stderr
    assert f"the disk of the database's folder {disk} is full" in result.stderr
    assert "database.url" not in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_in_the_middle_of_a_migration_says_what_it_left(
    db_url: str, tmp_path: Path
) -> None:
    """MariaDB commits DDL as it goes: the message must not claim a rollback there."""
    from tests.test_migration_resume import paused_migrate

    proc, env = paused_migrate(db_url, tmp_path)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc, 10)
    assert code == 143, err
    assert "Traceback" not in err
    if sa.make_url(db_url).get_backend_name() in ("mysql", "mariadb"):
        assert "keeps the schema changes made so far" in err
        assert "run `ideogram-sync migrate` again to finish the migration" in err
        assert "rolled back" not in err
    else:
        assert "any open transaction was rolled back" in err
    again = subprocess.run(
        [sys.executable, "-m", "sync", "migrate"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 0, again.stderr
