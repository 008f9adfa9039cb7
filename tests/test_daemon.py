"""The daemon as a real process: slots, signals, failures, start-up retries, metrics,
/healthz, JSON logs, and several replicas sharing one database."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sync.config import RESOURCES, ScheduleSettings
from sync.schedule import Schedule
from tests.conftest import ALL_RESOURCES, database_url_for, free_port, rows, subprocess_env
from tests.fakeapi import FakeApi, Reply, dataset, model

ROOT = Path(__file__).resolve().parents[1]


def daemon(
    fake_api: FakeApi,
    db_url: str,
    tmp_path: Path,
    config: str,
    *extra: str,
    name: str = "d",
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """A daemon process with `config`; it syncs only datasets unless `env` says otherwise
    (ALL_RESOURCES)."""
    path = tmp_path / f"{name}.toml"
    path.write_text(config)
    env = subprocess_env(fake_api, db_url, **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "sync", "--config", str(path), *extra, "daemon"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def until(
    check: Callable[[], Any], seconds: float = 60, proc: subprocess.Popen[str] | None = None
) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}: {proc.communicate()}")
        try:
            value = check()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def stop(
    proc: subprocess.Popen[str], sig: int = signal.SIGTERM, seconds: float = 30
) -> tuple[int, str]:
    proc.send_signal(sig)
    code = proc.wait(seconds)
    _, err = proc.communicate()
    return code, err


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback only
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def successes(url: str) -> list[dict[str, Any]]:
    return [r for r in rows(url, "sync_runs", order="id") if r["status"] == "success"]


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[str]:
    yield from database_url_for("sqlite", tmp_path)


def test_slots_metrics_health_and_sigterm(
    fake_api: FakeApi, sqlite_db: str, tmp_path: Path
) -> None:
    fake_api.datasets = [dataset("a"), dataset("b")]
    port = free_port()
    config = f'[schedule]\ninterval = "1s"\nmax_age = "1h"\n[metrics]\nport = {port}\nhost = "127.0.0.1"\n'
    proc = daemon(fake_api, sqlite_db, tmp_path, config, "--log-format", "json")
    until(lambda: len(successes(sqlite_db)) >= 3, proc=proc)

    status, body = get(f"http://127.0.0.1:{port}/healthz")
    assert (status, body.strip()) == (200, "ok")
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    assert (
        'ideogram_sync_runs_total{account="default",resource="datasets",status="success"}' in text
    )
    assert (
        'ideogram_sync_rows_total{account="default",change="inserted",resource="datasets"} 2.0'
        in text
    )
    assert 'ideogram_sync_datasets_active{account="default"} 2.0' in text
    assert (
        'ideogram_sync_last_success_timestamp_seconds{account="default",resource="datasets"}'
        in text
    )
    assert "ideogram_sync_run_duration_seconds_bucket" in text
    # Only the configured resources (datasets, here) have series.
    assert 'resource="models"' not in text and "ideogram_sync_models_active{" not in text

    code, err = stop(proc)
    assert code == 0, err
    lines = [json.loads(line) for line in err.splitlines()]
    assert all({"ts", "level", "event", "message"} <= set(line) for line in lines)
    ran = [line for line in lines if line["event"] == "run_succeeded"]
    assert ran and {"account", "run_id", "inserted", "updated", "duration_s"} <= set(ran[0])
    assert ran[0]["resource"] == "datasets"
    assert any(line["event"] == "next_run" for line in lines)
    assert lines[-1]["event"] == "daemon_stopped"
    # Epoch-aligned one-second slots, each synced once.
    slots = [r["scheduled_for"] for r in successes(sqlite_db)]
    assert len(set(slots)) == len(slots)
    assert all(s.microsecond == 0 for s in slots)


def test_after_the_start_up_run_the_slots_are_aligned_to_the_epoch(
    fake_api: FakeApi, sqlite_db: str, tmp_path: Path
) -> None:
    """Issue 15: the start-up run happens whenever the daemon starts; the runs after it fire
    on the epoch-aligned slots, not at start + k x interval."""
    fake_api.datasets = [dataset("a")]
    interval = timedelta(seconds=3)
    config = '[schedule]\ninterval = "3s"\n'  # run_on_start = true, the default
    proc = daemon(fake_api, sqlite_db, tmp_path, config, "--log-format", "json")
    until(lambda: len(successes(sqlite_db)) >= 2, proc=proc)
    code, err = stop(proc)
    assert code == 0, err
    lines = [json.loads(line) for line in err.splitlines()]
    announced = [
        datetime.fromisoformat(line["next_run"]) for line in lines if line["event"] == "next_run"
    ]
    assert announced, err
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    # The first one is logged right after the start-up run.
    assert all((when - epoch) % interval == timedelta(0) for when in announced), announced
    first, second = successes(sqlite_db)[:2]
    # The start-up run syncs the current slot, the next run a slot that was announced (the
    # first one, unless the start-up run was still going at that slot: max_instances=1).
    assert second["scheduled_for"].replace(tzinfo=UTC) in announced
    assert first["scheduled_for"] < second["scheduled_for"]


def test_every_accounts_series_starts_at_0_before_any_run(
    fake_api: FakeApi, sqlite_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: increase() over a series that appears at its first failure misses that
    failure; every account's series exist at 0 from the start, without *_created series."""
    import sync

    monkeypatch.setenv("KEY_ONE", "sk-one")
    monkeypatch.setenv("KEY_TWO", "sk-two")
    port = free_port()
    config = (
        # No run during the test: a yearly slot and none at start-up.
        '[schedule]\ncron = "0 0 1 1 *"\nrun_on_start = false\n'
        f'[metrics]\nport = {port}\nhost = "127.0.0.1"\n'
        '[[accounts]]\nname = "one"\napi_key_env = "KEY_ONE"\n'
        '[[accounts]]\nname = "two"\napi_key_env = "KEY_TWO"\n'
    )
    proc = daemon(fake_api, sqlite_db, tmp_path, config, env=ALL_RESOURCES)

    def ours() -> tuple[int, str] | None:
        # Our daemon's answer, not another test's server that took the same free port first.
        answer = get(f"http://127.0.0.1:{port}/metrics")
        return answer if 'account="one"' in answer[1] else None

    status, text = until(ours, proc=proc)
    code, err = stop(proc)
    assert code == 0, err
    assert status == 200
    assert rows(sqlite_db, "sync_runs") == []  # really before any run
    samples = set(text.splitlines())
    for account in ("one", "two"):
        for resource in RESOURCES:
            of = f'account="{account}",resource="{resource}"'
            for run_status in ("success", "failed", "locked", "skipped"):
                line = f'ideogram_sync_runs_total{{{of},status="{run_status}"}} 0.0'
                assert line in samples, text
            for change in ("inserted", "updated", "unchanged", "deleted", "rejected"):
                line = (
                    f'ideogram_sync_rows_total{{account="{account}",change="{change}",'
                    f'resource="{resource}"}} 0.0'
                )
                assert line in samples, text
            assert f"ideogram_sync_run_duration_seconds_count{{{of}}} 0.0" in samples, text
        # Absent means never succeeded; 0 would read as "last success in 1970".
        assert "ideogram_sync_last_success_timestamp_seconds{" not in text
    assert "_created" not in text, text
    assert f'ideogram_sync_build_info{{version="{sync.__version__}"}} 1.0' in samples, text


def test_failing_runs_do_not_stop_it_and_health_says_why(
    fake_api: FakeApi, sqlite_db: str, tmp_path: Path
) -> None:
    fake_api.push(*[Reply(500, {"detail": "down"})] * 4)
    fake_api.datasets = [dataset("a")]
    port = free_port()
    config = (
        '[api]\nmax_retries = 0\n[schedule]\ninterval = "1s"\nmax_age = "1h"\n'
        f'[metrics]\nport = {port}\nhost = "127.0.0.1"\n'
    )
    proc = daemon(fake_api, sqlite_db, tmp_path, config)
    until(lambda: any(r["status"] == "failed" for r in rows(sqlite_db, "sync_runs")), proc=proc)
    status, body = get(f"http://127.0.0.1:{port}/healthz")
    if not successes(sqlite_db):
        assert (status, body) == (503, "default: no successful sync yet\n")
    until(lambda: successes(sqlite_db), proc=proc)
    assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    _, metrics = get(f"http://127.0.0.1:{port}/metrics")
    assert 'ideogram_sync_runs_total{account="default",resource="datasets",status="failed"}' in (
        metrics
    )
    code, err = stop(proc)
    assert code == 0
    assert "HTTP 500" in err and "next run at" in err


def test_a_failing_resource_is_named_by_health_and_metrics(
    fake_api: FakeApi, sqlite_db: str, tmp_path: Path
) -> None:
    """With every resource synced, one that keeps failing (models, and the model details
    built on it) makes /healthz name it, counts its failures under its own resource, and
    costs the others nothing."""
    fake_api.datasets = [dataset("a")]
    fake_api.models = [model("m1", dataset_id="a")]
    fake_api.refused["/models"] = 500
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = (
        '[api]\nmax_retries = 0\n[schedule]\ninterval = "1s"\nmax_age = "1h"\n'
        f'[metrics]\nport = {port}\nhost = "127.0.0.1"\n'
    )
    proc = daemon(fake_api, sqlite_db, tmp_path, config, env=ALL_RESOURCES)
    models_failed = re.compile(
        r'^ideogram_sync_runs_total\{account="default",resource="models",status="failed"\} '
        r"[1-9]",
        re.M,
    )
    details_synced = re.compile(
        r'^ideogram_sync_last_success_timestamp_seconds\{account="default",'
        r'resource="dataset_details"\} [1-9]',
        re.M,
    )
    metrics = until(
        lambda: (
            (text := get(f"{base}/metrics")[1])
            and models_failed.search(text)
            and details_synced.search(text)
            and text
        ),
        proc=proc,
    )
    assert get(f"{base}/healthz") == (
        503,
        "default (models): no successful sync yet; "
        "default (model_details): no successful sync yet\n",
    )
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line[:1] != "#")

    def runs(resource: str, status: str) -> float:
        return float(
            samples[
                f'ideogram_sync_runs_total{{account="default",resource="{resource}",'
                f'status="{status}"}}'
            ]
        )

    assert runs("datasets", "success") >= 1 and runs("dataset_details", "success") >= 1
    assert runs("datasets", "failed") == 0 and runs("dataset_details", "failed") == 0
    assert runs("models", "success") == 0
    # Never run: skipped for the failure of the models it builds on.
    assert runs("model_details", "failed") == 0 and runs("model_details", "success") == 0
    last = "ideogram_sync_last_success_timestamp_seconds"
    assert f'{last}{{account="default",resource="datasets"}}' in samples
    assert not any(
        f'resource="{name}"' in line
        for line in samples
        if last in line
        for name in ("models", "model_details")
    )
    assert samples['ideogram_sync_models_active{account="default"}'] == "0.0"
    assert samples['ideogram_sync_datasets_active{account="default"}'] == "1.0"

    # The API lets the models through again: every resource syncs, and health recovers.
    del fake_api.refused["/models"]
    until(lambda: get(f"{base}/healthz") == (200, "ok\n"), proc=proc)
    # The gauges are read from the database once the run has returned, after the commits.
    until(
        lambda: (
            (text := get(f"{base}/metrics")[1])
            and 'ideogram_sync_models_active{account="default"} 1.0' in text
            and f'{last}{{account="default",resource="model_details"}}' in text
        ),
        proc=proc,
    )
    code, err = stop(proc)
    assert code == 0, err
    assert "run failed for account default (models)" in err


def test_sigterm_lets_the_run_finish_then_aborts_it_after_the_grace(
    fake_api: FakeApi, sqlite_db: str, tmp_path: Path
) -> None:
    fake_api.gate = threading.Event()  # the API never answers
    config = '[schedule]\ninterval = "1h"\nshutdown_grace_seconds = 1\n'
    proc = daemon(fake_api, sqlite_db, tmp_path, config)
    until(lambda: fake_api.requests, proc=proc)
    started = time.monotonic()
    code, err = stop(proc)
    assert code == 0, err
    assert time.monotonic() - started < 10
    (run,) = rows(sqlite_db, "sync_runs")
    assert (run["status"], run["error"]) == ("failed", "interrupted (shutting down)")
    assert rows(sqlite_db, "sync_locks") == []
    assert "Traceback" not in err


def test_sigint_while_idle_exits_0(fake_api: FakeApi, sqlite_db: str, tmp_path: Path) -> None:
    fake_api.datasets = [dataset("a")]
    proc = daemon(fake_api, sqlite_db, tmp_path, '[schedule]\ncron = "0 0 1 1 *"\n')
    until(lambda: successes(sqlite_db), proc=proc)
    code, err = stop(proc, signal.SIGINT)
    assert code == 0, err


def test_unreachable_database_at_start_is_retried(fake_api: FakeApi, tmp_path: Path) -> None:
    url = "postgresql://sync:pw-daemon-77@127.0.0.1:1/nowhere"
    proc = daemon(fake_api, url, tmp_path, '[schedule]\ninterval = "1s"\n')
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr or ():
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # Retried, not a crash loop: the process is still there after the second attempt.
    until(lambda: sum("database not ready" in line for line in lines) >= 2, proc=proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    reader.join(10)
    err = "".join(lines)
    retries = [line for line in lines if "database not ready" in line]
    assert "retrying in" in retries[0]
    assert "pw-daemon-77" not in err


def test_replicas_sync_each_slot_exactly_once(fake_api: FakeApi, tmp_path: Path) -> None:
    for url in database_url_for("postgresql", tmp_path):
        _replicas(fake_api, url, tmp_path)


def _replicas(fake_api: FakeApi, url: str, tmp_path: Path) -> None:
    keys = {"KEY_ONE": "sk-one", "KEY_TWO": "sk-two"}
    fake_api.by_key = {"sk-one": [dataset("a")], "sk-two": [dataset("b")]}
    os.environ.update(keys)
    try:
        config = (
            '[schedule]\ninterval = "2s"\nrun_on_start = false\n'
            '[[accounts]]\nname = "one"\napi_key_env = "KEY_ONE"\n'
            '[[accounts]]\nname = "two"\napi_key_env = "KEY_TWO"\n'
        )
        # Migrate first so the replicas start their schedules together.
        from sync.db import make_engine, migrate

        engine = make_engine(url)
        migrate(engine)
        engine.dispose()
        replicas = [daemon(fake_api, url, tmp_path, config, name=f"r{i}") for i in range(3)]
        until(lambda: len(successes(url)) >= 2 * 7, seconds=90, proc=replicas[0])
        results = [stop(proc) for proc in replicas]
    finally:
        for name in keys:
            os.environ.pop(name, None)
    assert [code for code, _ in results] == [0, 0, 0], results
    all_runs = [r for r in rows(url, "sync_runs", order="id") if r["status"] != "running"]
    for account in ("one", "two"):
        mine = [r for r in all_runs if r["account"] == account]
        assert all(r["status"] == "success" for r in mine), mine
        # No two runs of an account overlap.
        spans = sorted((r["started_at"], r["finished_at"]) for r in mine)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start
        # Every slot from the first to the last has exactly one run.
        slots = sorted(r["scheduled_for"] for r in mine)
        assert len(slots) == len(set(slots)), slots
        expected = [slots[0] + timedelta(seconds=2 * i) for i in range(len(slots))]
        assert slots == expected
    # Each replica did some of the work (none starved by another's lock on a different account).
    assert sum("run " in err and "succeeded" in err for _, err in results) >= 2


# -- schedule arithmetic ------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "days"),
    [
        ("1-5", "mon,tue,wed,thu,fri"),
        ("0", "sun"),
        ("7", "sun"),
        ("*/2", "sun,tue,thu,sat"),
        ("sat,sun", "sun,sat"),
        ("5-1", "sun,mon,fri,sat"),
        ("mon-wed", "mon,tue,wed"),
        ("*", "*"),
    ],
)
def test_cron_weekdays_are_standard(field: str, days: str) -> None:
    from sync.schedule import _weekdays

    assert _weekdays(field) == days


def test_interval_slots_are_aligned_to_the_epoch() -> None:
    schedule = Schedule(ScheduleSettings(interval_seconds=1800))
    now = datetime(2026, 11, 25, 10, 44, 59, 999999, tzinfo=UTC)
    assert schedule.slot_for(now) == datetime(2026, 11, 25, 10, 30, tzinfo=UTC)
    nxt = schedule.trigger().get_next_fire_time(None, now)
    assert nxt == datetime(2026, 11, 25, 11, 0, tzinfo=UTC)


def test_an_off_slot_start_up_run_is_followed_by_the_aligned_slots() -> None:
    """Issue 15: started at :01.25 with a 10 s interval, the start-up run belongs to the :00
    slot and the scheduler fires next at :10, :20, :30, not at :11.25, :21.25."""
    schedule = Schedule(ScheduleSettings(interval_seconds=10))
    trigger = schedule.trigger()
    start = datetime(2026, 11, 25, 10, 0, 1, 250000, tzinfo=UTC)
    assert schedule.slot_for(start) == datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    fires = []
    previous = start  # APScheduler passes the start-up run's time as the previous fire time
    for _ in range(3):
        previous = trigger.get_next_fire_time(previous, start)
        fires.append(previous)
    assert fires == [datetime(2026, 11, 25, 10, 0, s, tzinfo=UTC) for s in (10, 20, 30)]
    # A start-up run exactly on a slot is that slot's run: the next one is a full step on.
    on_slot = datetime(2026, 11, 25, 10, 0, 10, tzinfo=UTC)
    assert trigger.get_next_fire_time(on_slot, on_slot) == on_slot + timedelta(seconds=10)
    # Without a previous run (run_on_start = false): the first slot at or after now.
    assert trigger.get_next_fire_time(None, start) == fires[0]
    assert trigger.get_next_fire_time(None, on_slot) == on_slot


def test_cron_slots_in_a_time_zone() -> None:
    schedule = Schedule(ScheduleSettings(cron="15 9 * * 1-5", timezone="Europe/Paris"))
    # Wednesday 2026-11-25 10:00 UTC is 11:00 in Paris: today's 09:15 Paris slot = 08:15 UTC.
    assert schedule.slot_for(datetime(2026, 11, 25, 10, 0, tzinfo=UTC)) == datetime(
        2026, 11, 25, 8, 15, tzinfo=UTC
    )
    # Monday 07:00 UTC: the last slot was Friday's.
    assert schedule.slot_for(datetime(2026, 11, 30, 7, 0, tzinfo=UTC)) == datetime(
        2026, 11, 27, 8, 15, tzinfo=UTC
    )
    every = Schedule(ScheduleSettings(cron="*/30 * * * *"))
    assert every.slot_for(datetime(2026, 11, 25, 10, 0, tzinfo=UTC)) == datetime(
        2026, 11, 25, 10, 0, tzinfo=UTC
    )
    assert Schedule(ScheduleSettings()).interval == 1800  # the default


def test_schedule_config_is_checked(tmp_path: Path) -> None:
    from sync.config import load_settings, parse_duration
    from sync.errors import ConfigError

    assert [parse_duration(v) for v in ("45s", "30m", "2h", "1d", "1h30m", 90, "90")] == [
        45,
        1800,
        7200,
        86400,
        5400,
        90,
        90,
    ]
    for bad in ("* * *", "61 * * * *", "0 0 * * 8", "0 0 * * funday"):
        with pytest.raises(ConfigError, match=r"schedule\.cron"):
            Schedule(ScheduleSettings(cron=bad))
    for text, message in (
        ('[schedule]\ncron = "* * * * *"\ninterval = "5m"\n', "not both"),
        ('[schedule]\ninterval = "soon"\n', "must be a duration"),
        ('[schedule]\ntimezone = "Mars/Olympus"\n', "not a known time zone"),
        ("[metrics]\nport = 70000\n", "between 1 and 65535"),
        ('[schedule]\nrun_on_start = "yes"\n', "must be bool"),
    ):
        path = tmp_path / "s.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_settings(str(path), env={})


def test_a_stop_arriving_as_a_slot_starts_is_waited_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """SIGTERM just after a slot looked at `stopping`: the shutdown must see the slot as
    busy, or it disposes of the engine under a run that is starting anyway."""
    import sync.daemon
    from sync.config import load_settings

    settings = load_settings(env={"IDEOGRAM_API_KEY": "sk-test"}, database_url="sqlite://")
    daemon_ = sync.daemon.Daemon(settings)
    monkeypatch.setattr(sync.daemon, "sync_accounts", lambda *_a, **_k: [])
    shutdown_saw_idle: list[bool] = []

    class SignalRightAfterTheCheck(threading.Event):
        def is_set(self) -> bool:
            was = super().is_set()
            if not was and not shutdown_saw_idle:
                self.set()  # the signal handler, between the slot's check and its run
                shutdown_saw_idle.append(daemon_.idle.is_set())
            return was

    daemon_.stopping = SignalRightAfterTheCheck()
    daemon_.tick()
    assert shutdown_saw_idle == [False]
    assert daemon_.idle.is_set()  # and free again once the slot is over
