"""Notices without Prometheus (issue 18, point 2): a webhook told of failures, recoveries and
stale accounts, once per event, in JSON or Slack's format, never with a secret, and never
at the cost of a run."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sync import notify
from sync.config import load_settings
from sync.db import make_engine
from tests.conftest import API_KEY, rows
from tests.fakeapi import FakeApi, Reply, dataset

SECRET_HOOK_TOKEN = "T000/B000/hooksecret42"


class Webhook:
    """A local HTTP server that records what is POSTed to it, answering `status` (or
    hanging for `hang` seconds first)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.status = 200
        self.hang = 0.0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                hook.bodies.append(json.loads(self.rfile.read(length)))
                if hook.hang:
                    time.sleep(hook.hang)
                self.send_response(hook.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/{SECRET_HOOK_TOKEN}"


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.server.shutdown()


def config(tmp_path: Path, **notify: Any) -> str:
    lines = ["[api]", "max_retries = 0", "", "[notify]"]
    for key, value in notify.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path = tmp_path / "notify.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_failure_then_recovery_in_json(
    cli: Any, fake_api: FakeApi, db_url: str, webhook: Webhook, tmp_path: Path
) -> None:
    conf = config(tmp_path, format="json")
    hook_env = {"IDEOGRAM_SYNC_WEBHOOK_URL": webhook.url}
    fake_api.datasets = [dataset("a")]
    assert cli("--config", conf, "--database-url", db_url, "run", env=hook_env).code == 0
    assert webhook.bodies == []  # a success after nothing is no news

    fake_api.push(Reply(500, {"detail": f"boom {API_KEY}"}))
    failed = cli("--config", conf, "--database-url", db_url, "run", env=hook_env)
    assert failed.code == 1
    (notice,) = webhook.bodies
    assert (notice["event"], notice["account"], notice["resource"]) == (
        "failure",
        "default",
        "datasets",
    )
    assert notice["run_id"] == rows(db_url, "sync_runs", "id")[-1]["id"]
    assert "HTTP 500" in notice["error"] and notice["counts"]["inserted"] == 0
    assert notice["started_at"].endswith("Z") and notice["finished_at"].endswith("Z")
    assert API_KEY not in json.dumps(notice) and SECRET_HOOK_TOKEN not in failed.output

    recovered = cli("--config", conf, "--database-url", db_url, "run", env=hook_env)
    assert recovered.code == 0
    assert [b["event"] for b in webhook.bodies] == ["failure", "recovery"]
    assert webhook.bodies[1]["run_id"] == notice["run_id"] + 1
    assert cli("--config", conf, "--database-url", db_url, "run", env=hook_env).code == 0
    assert len(webhook.bodies) == 2  # recovered once, not on every success after


def test_slack_format_and_the_events_chosen(
    cli: Any, fake_api: FakeApi, sqlite_url: str, webhook: Webhook, tmp_path: Path
) -> None:
    url_file = tmp_path / "hook-url"
    url_file.write_text(webhook.url + "\n")
    conf = config(tmp_path, format="slack", on=["recovery"], webhook_url_file=str(url_file))
    fake_api.push(Reply(500, {"detail": "boom"}))
    assert cli("--config", conf, "--database-url", sqlite_url, "run").code == 1
    assert webhook.bodies == []  # failures not asked for
    assert cli("--config", conf, "--database-url", sqlite_url, "run").code == 0
    (message,) = webhook.bodies
    assert set(message) == {"text"}
    assert message["text"].startswith(":white_check_mark: ideogram-sync: run 2 of account default")


def test_an_undeliverable_notice_changes_nothing(
    cli: Any, fake_api: FakeApi, sqlite_url: str, webhook: Webhook, tmp_path: Path
) -> None:
    conf = config(tmp_path, timeout_seconds=0.5, max_retries=1)
    hook_env = {"IDEOGRAM_SYNC_WEBHOOK_URL": webhook.url}
    webhook.status = 500
    fake_api.push(Reply(500, {"detail": "boom"}))
    failing = cli("--config", conf, "--database-url", sqlite_url, "run", env=hook_env)
    assert failing.code == 1  # the run's own code, not the webhook's
    assert len(webhook.bodies) == 2  # bounded: one retry
    assert failing.err.count("could not deliver the failure notice") == 1
    assert SECRET_HOOK_TOKEN not in failing.err

    webhook.status, webhook.hang = 200, 3.0  # a webhook that hangs past the timeout
    started = time.monotonic()
    hung = cli("--config", conf, "--database-url", sqlite_url, "run", env=hook_env)
    assert hung.code == 0 and time.monotonic() - started < 2.9 * 2
    assert "could not deliver the recovery notice" in hung.err
    assert rows(sqlite_url, "sync_runs", "id")[-1]["status"] == "success"

    nowhere = {"IDEOGRAM_SYNC_WEBHOOK_URL": "http://127.0.0.1:9/closed"}
    fake_api.push(Reply(500, {"detail": "boom"}))
    assert cli("--config", conf, "--database-url", sqlite_url, "run", env=nowhere).code == 1


def test_stale_notice_once_across_replicas(
    cli: Any, fake_api: FakeApi, db_url: str, webhook: Webhook, tmp_path: Path
) -> None:
    fake_api.datasets = [dataset("a")]
    assert cli("--database-url", db_url, "run").code == 0
    settings = load_settings(
        config(tmp_path, stale_after="1h"),
        env={"IDEOGRAM_SYNC_WEBHOOK_URL": webhook.url, "IDEOGRAM_SYNC_RESOURCES": "datasets"},
        database_url=db_url,
    )
    engines = [make_engine(db_url) for _ in range(3)]  # three daemon replicas
    try:
        notify.check_stale(settings, engines[0], datetime.now(UTC))
        assert webhook.bodies == []  # fresh
        later = datetime.now(UTC) + timedelta(hours=2)
        threads = [
            threading.Thread(target=notify.check_stale, args=(settings, engine, later))
            for engine in engines
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for engine in engines:  # and again, slot after slot
            notify.check_stale(settings, engine, later + timedelta(minutes=30))
    finally:
        for engine in engines:
            engine.dispose()
    (stale,) = webhook.bodies
    assert (stale["event"], stale["account"], stale["resource"]) == ("stale", "default", "datasets")
    assert stale["last_success_at"].endswith("Z")
    (recorded,) = rows(db_url, "sync_notices")
    assert (
        recorded["delivered"] is True
        and recorded["key"] == f"stale:default:datasets:{stale['run_id']}"
    )

    # Without stale among the events: nothing, even when stale.
    quiet = replace(settings, notify=replace(settings.notify, on=("failure",)))
    engine = make_engine(db_url)
    try:
        notify.check_stale(quiet, engine, later + timedelta(days=1))
    finally:
        engine.dispose()
    assert len(webhook.bodies) == 1


def test_notify_settings_are_checked(cli: Any, sqlite_url: str, tmp_path: Path) -> None:
    bad = config(tmp_path, format="teams")
    result = cli("--config", bad, "--database-url", sqlite_url, "run")
    assert result.code == 2 and 'notify.format must be "json" or "slack"' in result.err
    bad = config(tmp_path, on=["failure", "success"])
    result = cli("--config", bad, "--database-url", sqlite_url, "run")
    assert result.code == 2 and "notify.on: unknown 'success'" in result.err


def test_daemon_replicas_send_each_notice_once(
    fake_api: FakeApi, sqlite_url: str, webhook: Webhook, tmp_path: Path
) -> None:
    """Two daemons share a database and a failing API: one notice per failed run, one
    recovery, one stale notice, whichever replica ran or saw it."""
    from tests.test_daemon import daemon, stop, successes, until

    fake_api.datasets = [dataset("a")]
    conf = '[schedule]\ninterval = "2s"\n\n[api]\nmax_retries = 0\n\n[notify]\nstale_after = "3s"\n'
    hook = {"IDEOGRAM_SYNC_WEBHOOK_URL": webhook.url}
    first = daemon(fake_api, sqlite_url, tmp_path, conf, name="one", env=hook)
    # A success, not just a row: the first run's `running` row is committed before it
    # fetches, and an API broken before that fetch would leave nothing to go stale.
    until(lambda: successes(sqlite_url), proc=first)
    fake_api.refused["/datasets"] = 500  # every run fails from now on
    second = daemon(fake_api, sqlite_url, tmp_path, conf, name="two", env=hook)
    try:
        until(lambda: any(b["event"] == "stale" for b in webhook.bodies), proc=second)
        del fake_api.refused["/datasets"]
        until(lambda: any(b["event"] == "recovery" for b in webhook.bodies), proc=first)
    finally:
        for proc in (first, second):
            stop(proc)
    failed = [r["id"] for r in rows(sqlite_url, "sync_runs", "id") if r["status"] == "failed"]
    failures = [b["run_id"] for b in webhook.bodies if b["event"] == "failure"]
    assert sorted(failures) == failed  # each failed run once, by whichever replica ran it
    assert [b["event"] for b in webhook.bodies].count("stale") == 1
    assert [b["event"] for b in webhook.bodies].count("recovery") == 1
