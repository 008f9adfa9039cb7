"""Faults injected for real: concurrent processes, kill -9, signals, dropped connections,
slow servers, mass deletes. Each checks the end state of the data and of sync_runs."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sync.db import make_engine, migrate, write_transaction
from sync.models import sync_locks, sync_runs
from tests.conftest import database_url_for, rows, subprocess_env
from tests.fakeapi import FakeApi, Reply, dataset, synthetic

ROOT = Path(__file__).resolve().parents[1]


env_for = subprocess_env


def start(
    args: list[str], env: dict[str, str], cwd: Path, hook: bool = False
) -> subprocess.Popen[str]:
    module = "tests.pausehook" if hook else "sync"
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen[str], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


def data(url: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return rows(url, "datasets", order="dataset_id"), rows(url, "dataset_history", order="id")


def runs(url: str) -> list[dict[str, Any]]:
    return rows(url, "sync_runs", order="id")


# -- overlapping runs -------------------------------------------------------------------


@pytest.mark.parametrize("processes", [2, 10])
def test_concurrent_runs_exactly_one_syncs(
    fake_api: FakeApi, db_url: str, tmp_path: Path, processes: int
) -> None:
    fake_api.datasets = synthetic(50)
    fake_api.gate = threading.Event()  # the winner waits in its fetch until the others are done
    env = env_for(fake_api, db_url)
    procs = [start(["run"], env, tmp_path) for _ in range(processes)]
    try:
        deadline = time.monotonic() + 120
        while sum(p.poll() is not None for p in procs) < processes - 1:
            assert time.monotonic() < deadline, "the losers did not exit"
            time.sleep(0.1)
    finally:
        fake_api.gate.set()
    results = [(p.wait(60), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    unexpected = [err for code, _, err in results if code not in (0, 5)]
    assert codes == [0] + [5] * (processes - 1), unexpected or results
    for code, _out, err in results:
        if code == 5:
            assert "another run for account default is in progress" in err, err
            assert "held by" in err and "Traceback" not in err
    assert len(rows(db_url)) == 50
    (run,) = runs(db_url)
    assert run["status"] == "success" and run["inserted"] == 50
    assert rows(db_url, "sync_locks") == []  # released


def test_lock_held_by_a_live_run_elsewhere(cli, synced: str) -> None:
    now = datetime.now(UTC)
    _put_lock(
        synced, "other-host:4242:abcd1234", now - timedelta(seconds=30), now + timedelta(minutes=5)
    )
    before = data(synced)
    result = cli("--database-url", synced, "run")
    assert result.code == 5
    assert "held by other-host (pid 4242) since" in result.err
    assert data(synced) == before
    assert runs(synced)[-1]["status"] == "success"  # no row for a run that never started


def test_expired_lease_is_taken_over(cli, synced: str) -> None:
    now = datetime.now(UTC)
    _put_lock(
        synced, "other-host:4242:abcd1234", now - timedelta(hours=1), now - timedelta(seconds=1)
    )
    result = cli("--database-url", synced, "run")
    assert result.code == 0, result.err
    assert "its lease expired" in result.err
    assert rows(synced, "sync_locks") == []


def test_dead_local_holder_is_taken_over_at_once(cli, synced: str) -> None:
    import socket

    from sync.lock import _pid_scope

    pid = _a_gone_pid()
    now = datetime.now(UTC)
    owner = f"{socket.gethostname()}:{pid}:{_pid_scope()}:abcd1234"
    _put_lock(synced, owner, now, now + timedelta(minutes=10))
    result = cli("--database-url", synced, "run")
    assert result.code == 0, result.err
    assert "its process no longer exists" in result.err


@pytest.mark.parametrize(
    "owner",
    [
        "{host}:{pid}:abcd1234",  # written by an older version: no scope to compare
        "{host}:{pid}:0123456789ab:abcd1234",  # another PID namespace or another boot
        "other-host:{pid}:{scope}:abcd1234",
    ],
)
def test_a_holder_is_dead_only_when_its_pid_is_ours_to_check(owner: str) -> None:
    import socket

    from sync.lock import _holder_is_dead, _pid_scope

    pid = _a_gone_pid()
    host, scope = socket.gethostname(), _pid_scope()
    assert _holder_is_dead(f"{host}:{pid}:{scope}:abcd1234")
    assert not _holder_is_dead(owner.format(host=host, pid=pid, scope=scope))


def test_lost_lease_fails_the_commit(db_url: str) -> None:
    from sync.errors import LockLost
    from sync.lock import Lease

    engine = make_engine(db_url)
    try:
        migrate(engine)
        lease = Lease(engine, "default", 600, lambda: datetime.now(UTC))
        lease.acquire()
        with engine.begin() as conn:
            conn.execute(sa.update(sync_locks).values(owner="thief:1:ffffffff"))
        with pytest.raises(LockLost, match="another run took it over"), engine.begin() as conn:
            lease.check(conn)
        lease.release()
        assert [r["owner"] for r in rows(db_url, "sync_locks")] == ["thief:1:ffffffff"]
    finally:
        engine.dispose()


def _a_gone_pid() -> int:
    """The pid of a process that has ended."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(gone.stdout)


def _put_lock(url: str, owner: str, acquired: datetime, expires: datetime) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sync_locks.insert().values(
                    account="default", owner=owner, acquired_at=acquired, expires_at=expires
                )
            )
    finally:
        engine.dispose()


# -- crashes and interruptions ---------------------------------------------------------


def test_kill_9_in_the_write_transaction(
    cli, fake_api: FakeApi, synced: str, tmp_path: Path
) -> None:
    before = data(synced)
    marker = tmp_path / "paused"
    env = env_for(fake_api, synced, PAUSE_MARKER=str(marker))
    proc = start(["run"], env, tmp_path, hook=True)
    wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)

    assert data(synced) == before
    orphan = runs(synced)[-1]
    assert orphan["status"] == "running"

    result = cli("--database-url", synced, "run")
    assert result.code == 0, result.err
    all_runs = runs(synced)
    assert all_runs[-2]["id"] == orphan["id"]
    assert all_runs[-2]["status"] == "abandoned"
    assert "stopped before finishing" in all_runs[-2]["error"]
    assert all_runs[-1]["status"] == "success"
    assert "abandoned" in result.err
    names = {r["dataset_id"]: r["name"] for r in rows(synced)}
    assert names["a"] == "renamed" and "d" in names


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_in_the_write_transaction(
    fake_api: FakeApi, synced: str, tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    before = data(synced)
    marker = tmp_path / "paused"
    env = env_for(fake_api, synced, PAUSE_MARKER=str(marker))
    proc = start(["run"], env, tmp_path, hook=True)
    wait_for(marker, proc)
    sent = time.monotonic()
    proc.send_signal(sig)
    assert proc.wait(15) == code
    assert time.monotonic() - sent < 10
    _, err = proc.communicate()
    assert "rolled back" in err and "Traceback" not in err
    assert data(synced) == before
    last = runs(synced)[-1]
    assert last["status"] == "failed" and last["error"].startswith("interrupted")
    assert rows(synced, "sync_locks") == []


def test_a_late_stop_does_not_cancel_the_record_of_the_failure(
    fake_api: FakeApi, server_synced: str, tmp_path: Path
) -> None:
    """SIGTERM cancels the run's statements from another thread. When that thread starts late
    (a loaded machine), it must not cancel the statement that records the run as failed
    (seen in a local run of the suite: the row stayed `running`)."""
    url = server_synced
    marker = tmp_path / "paused"
    env = env_for(fake_api, url, PAUSE_MARKER=str(marker), STOP_DELAY="1")
    proc = start(["run"], env, tmp_path, hook=True)
    wait_for(marker, proc)
    run_id = runs(url)[-1]["id"]
    engine = make_engine(url)
    try:
        # The record of the failure waits for this row lock, so it is still under way when
        # the late stop looks for statements to cancel.
        with engine.begin() as conn:
            conn.execute(sa.select(sync_runs).where(sync_runs.c.id == run_id).with_for_update())
            proc.send_signal(signal.SIGTERM)
            time.sleep(2)
    finally:
        engine.dispose()
    assert proc.wait(15) == 143
    _, err = proc.communicate()
    assert "could not record" not in err, err
    last = runs(url)[-1]
    assert (last["id"], last["status"], last["error"]) == (
        run_id,
        "failed",
        "interrupted (SIGTERM)",
    )


def test_sigterm_while_waiting_for_the_api(fake_api: FakeApi, synced: str, tmp_path: Path) -> None:
    before = data(synced)
    fake_api.gate = threading.Event()
    proc = start(["run"], env_for(fake_api, synced), tmp_path)
    deadline = time.monotonic() + 30
    # The download starts first (while the process sets up); the run has started once
    # its `running` row exists. The fixture's sync made the first request and run.
    while not fake_api.requests[1:] or runs(synced)[-1]["status"] != "running":
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 143
    assert data(synced) == before
    last = runs(synced)[-1]
    assert (last["status"], last["error"]) == ("failed", "interrupted (SIGTERM)")


def test_a_signal_right_after_the_run_row_is_recorded(
    cli, synced: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM between committing the `running` row and the download still fails the row."""
    from sync import job
    from sync.errors import Terminated

    def interrupted(*_args: Any) -> Any:
        # Where a signal handler's exception would surface: the first step after the row.
        raise Terminated()

    monkeypatch.setattr(job._Job, "_abandon_orphans", interrupted)
    before = data(synced)
    result = cli("--database-url", synced, "run")
    assert result.code == 143
    assert data(synced) == before
    last = runs(synced)[-1]
    assert (last["status"], last["error"]) == ("failed", "interrupted (SIGTERM)")
    assert rows(synced, "sync_locks") == []


def test_database_connection_dropped_mid_write(
    fake_api: FakeApi, server_synced: str, tmp_path: Path
) -> None:
    synced = server_synced
    backend = sa.make_url(synced).get_backend_name()
    before = data(synced)
    marker, resume = tmp_path / "paused", tmp_path / "resume"
    env = env_for(fake_api, synced, PAUSE_MARKER=str(marker), PAUSE_RESUME=str(resume))
    proc = start(["run"], env, tmp_path, hook=True)
    wait_for(marker, proc)
    engine = make_engine(synced)
    try:
        with engine.connect() as conn:
            if backend == "postgresql":
                conn.exec_driver_sql(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            else:
                ids = (
                    conn.exec_driver_sql(
                        "SELECT id FROM information_schema.processlist "
                        "WHERE db = DATABASE() AND id <> CONNECTION_ID()"
                    )
                    .scalars()
                    .all()
                )
                for conn_id in ids:
                    conn.exec_driver_sql(f"KILL CONNECTION {int(conn_id)}")
    finally:
        engine.dispose()
    resume.touch()
    assert proc.wait(60) == 1
    _, err = proc.communicate()
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "database error while writing the datasets" in errors[0], err
    assert "Traceback" not in err
    assert data(synced) == before
    last = runs(synced)[-1]
    assert last["status"] == "failed" and "database error" in last["error"]


# -- slow or oversized answers ------------------------------------------------------------


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "reliability.toml"
    path.write_text(text)
    return str(path)


def test_server_that_never_answers(cli, fake_api: FakeApi, synced: str, tmp_path: Path) -> None:
    before = data(synced)
    fake_api.gate = threading.Event()
    cfg = _config(tmp_path, "[api]\ntimeout_seconds = 0.5\nmax_retries = 1\nbackoff_factor = 0\n")
    started = time.monotonic()
    result = cli("--config", cfg, "--database-url", synced, "run")
    assert time.monotonic() - started < 0.5 * 2 + 5
    assert result.code == 1
    assert "did not answer within 0.5s (2 attempts)" in result.err
    assert data(synced) == before
    assert "did not answer" in runs(synced)[-1]["error"]


def test_server_that_trickles_hits_the_deadline(
    cli, fake_api: FakeApi, synced: str, tmp_path: Path
) -> None:
    before = data(synced)
    fake_api.push(Reply(200, {"datasets": [dataset("x")]}, trickle=0.5))
    cfg = _config(tmp_path, "[api]\ntimeout_seconds = 5\ndeadline_seconds = 2\n")
    started = time.monotonic()
    result = cli("--config", cfg, "--database-url", synced, "run")
    assert time.monotonic() - started < 2 + 5
    assert result.code == 1
    assert "within api.deadline_seconds (2s)" in result.err
    assert data(synced) == before
    assert runs(synced)[-1]["status"] == "failed"


def test_oversized_response_fails_cleanly(
    cli, fake_api: FakeApi, synced: str, tmp_path: Path
) -> None:
    before = data(synced)
    fake_api.datasets = synthetic(200)
    cfg = _config(tmp_path, "[api]\nmax_response_bytes = 4096\n")
    result = cli("--config", cfg, "--database-url", synced, "run")
    assert result.code == 1
    assert "larger than api.max_response_bytes (4096 bytes)" in result.err
    assert data(synced) == before


# -- guarding the data --------------------------------------------------------------------


def test_mass_delete_is_refused_unless_allowed(
    cli, fake_api: FakeApi, db_url: str, tmp_path: Path
) -> None:
    fake_api.datasets = synthetic(10)
    assert cli("--database-url", db_url, "run").code == 0
    before = data(db_url)
    cfg = _config(tmp_path, "[sync]\nmax_delete_fraction = 0.5\n")

    fake_api.datasets = []
    refused = cli("--config", cfg, "--database-url", db_url, "run")
    assert refused.code == 1
    assert "would soft-delete 10 of 10 active datasets" in refused.err
    assert "--allow-mass-delete" in refused.err
    assert data(db_url) == before
    assert runs(db_url)[-1]["status"] == "failed"

    fake_api.datasets = synthetic(10)[:6]  # 4 of 10 gone: under the limit
    assert cli("--config", cfg, "--database-url", db_url, "run").code == 0
    fake_api.datasets = []
    allowed = cli("--config", cfg, "--database-url", db_url, "run", "--allow-mass-delete")
    assert allowed.code == 0
    assert all(r["deleted_at"] is not None for r in rows(db_url))
    assert runs(db_url)[-1]["deleted"] == 6


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_the_write_lock_is_per_database(backend: str, tmp_path: Path) -> None:
    # Installations sharing a database server must not wait for each other's writes; two
    # runs on one database must (MySQL's named locks are server-wide unless named apart).
    fresh_database = contextlib.contextmanager(database_url_for)
    with fresh_database(backend, tmp_path) as first, fresh_database(backend, tmp_path) as second:
        engines = [make_engine(url) for url in (first, second, first)]
        waiting: list[threading.Thread] = []

        def writes_at_once(engine: sa.Engine, seconds: float) -> bool:
            done = threading.Event()

            def write() -> None:
                with write_transaction(engine):
                    done.set()

            thread = threading.Thread(target=write, daemon=True)
            thread.start()
            waiting.append(thread)
            return done.wait(seconds)

        try:
            with write_transaction(engines[0]):
                # Generous where it must get through (a connection on a loaded machine),
                # short where it must not.
                assert writes_at_once(engines[1], 15)
                assert not writes_at_once(engines[2], 2)
            for thread in waiting:
                thread.join(10)
                assert not thread.is_alive()
        finally:
            for engine in engines:
                engine.dispose()
