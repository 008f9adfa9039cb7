"""Custom models and dataset details (issue 17): every resource end to end against the fake
API, on every backend: what is fetched, what is stored, and what one resource's failure costs."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sync import models as tables
from sync.db import make_engine
from sync.output import Progress
from tests.conftest import ALL_RESOURCES, rows, subprocess_env
from tests.fakeapi import FakeApi, Reply, dataset, file, model, training_run

ROOT = Path(__file__).resolve().parents[1]


def runs(url: str) -> list[dict[str, Any]]:
    return rows(url, "sync_runs", "id")


def by_key(url: str, table: str, key: str) -> dict[str, dict[str, Any]]:
    return {row[key]: row for row in rows(url, table)}


def catalogue(api: FakeApi) -> None:
    """Three datasets (files known, sizes partly unknown, none), two models on `a` (one
    owned with two training runs, one shared), one owned model on no dataset."""
    api.datasets = [dataset("a", "Cats"), dataset("b", "Dogs"), dataset("c", "Empty")]
    api.files = {
        "a": [file("a1.png", 100), file("a2.png", 250)],
        "b": [file("b1.png", None), file(None, None)],
    }
    api.models = [
        model("m1", "Cat model", dataset_id="a"),
        model("m2", "Shared cats", dataset_id="a", owned=False, status="COMPLETED"),
        model("m3", "Loose", status="TRAINING", updated=None),
    ]
    api.training_runs = {
        "m1": [
            training_run("t1", "ERRORED", created="2025-02-01T09:00:00+02:00"),
            training_run("t2", "COMPLETED", created="2025-02-02T09:00:00Z"),
        ],
        "m3": [training_run("t3", "TRAINING", updated=None)],
    }


def sync(cli: Any, url: str, *extra: str, env: dict[str, str] | None = None) -> Any:
    return cli("--database-url", url, "run", *extra, env={**ALL_RESOURCES, **(env or {})})


def test_every_resource_lands_and_a_quiet_rerun_asks_only_the_two_listings(
    cli: Any, fake_api: FakeApi, db_url: str
) -> None:
    catalogue(fake_api)
    first = sync(cli, db_url)
    assert first.code == 0, first.err
    # One request per listing, per dataset and per OWNED model (m2 is shared: no details).
    assert Counter(fake_api.paths()) == Counter(
        [
            "/datasets",
            "/datasets/a",
            "/datasets/b",
            "/datasets/c",
            "/models",
            "/models/m1",
            "/models/m3",
        ]
    )

    datasets = by_key(db_url, "datasets", "dataset_id")
    assert (datasets["a"]["file_count"], datasets["a"]["total_file_bytes"]) == (2, 350)
    # Sizes unknown: the total is unknown (NULL), not 0; no files at all: 0 files, NULL bytes.
    assert (datasets["b"]["file_count"], datasets["b"]["total_file_bytes"]) == (2, None)
    assert (datasets["c"]["file_count"], datasets["c"]["total_file_bytes"]) == (0, None)
    assert datasets["a"]["custom_model_ids"] == ["m1", "m2"]
    assert all(d["details_synced_at"] is not None for d in datasets.values())
    files = rows(db_url, "dataset_files", "dataset_id, position")
    assert [
        (f["dataset_id"], f["position"], f["file_name"], f["file_size_bytes"]) for f in files
    ] == [
        ("a", 0, "a1.png", 100),
        ("a", 1, "a2.png", 250),
        ("b", 0, "b1.png", None),
        ("b", 1, None, None),
    ]

    models = by_key(db_url, "models", "model_id")
    m1, m2, m3 = models["m1"], models["m2"], models["m3"]
    assert (m1["name"], m1["status"], m1["dataset_id"], m1["is_owned"]) == (
        "Cat model",
        "COMPLETED",
        "a",
        True,
    )
    assert (
        m1["custom_model_uri"] == "model/m1/version/1" and m1["is_available_for_generation"] is True
    )
    assert m1["creation_time"] == datetime(2025, 2, 1, 10, 0, tzinfo=UTC)
    assert (m2["is_owned"], m2["details_synced_at"]) == (False, None)
    assert (m3["dataset_id"], m3["last_update_time"], m3["account"]) == (None, None, "default")
    assert m1["deleted_at"] is None and m1["extra"] is None
    history = rows(db_url, "model_history", "id")
    assert sorted((h["model_id"], h["change_type"], h["valid_to"]) for h in history) == [
        ("m1", "insert", None),
        ("m2", "insert", None),
        ("m3", "insert", None),
    ]
    training = by_key(db_url, "model_training_runs", "training_run_id")
    assert set(training) == {"t1", "t2", "t3"}
    assert training["t1"]["creation_time"] == datetime(2025, 2, 1, 7, 0, tzinfo=UTC)
    assert (training["t2"]["model_id"], training["t2"]["lora_rank"], training["t2"]["ema"]) == (
        "m1",
        16,
        0.999,
    )

    recorded = runs(db_url)
    assert [(r["resource"], r["status"]) for r in recorded] == [
        ("datasets", "success"),
        ("dataset_details", "success"),
        ("models", "success"),
        ("model_details", "success"),
    ]
    assert [(r["datasets_seen"], r["inserted"]) for r in recorded] == [
        (3, 3),
        (3, 3),
        (3, 3),
        (2, 2),
    ]

    fake_api.requests.clear()
    again = sync(cli, db_url)
    assert again.code == 0, again.err
    # Nothing changed and every detail is fresh: exactly the two listings.
    assert fake_api.paths() == ["/datasets", "/models"]
    assert rows(db_url, "dataset_files", "dataset_id, position") == files


def test_models_update_soft_delete_and_restore_with_history(
    cli: Any, fake_api: FakeApi, db_url: str
) -> None:
    catalogue(fake_api)
    assert sync(cli, db_url).code == 0
    fake_api.models = [model("m1", "Cat model v2", dataset_id="a"), fake_api.models[2]]
    fake_api.training_runs["m1"].append(training_run("t4", "TRAINING"))
    assert sync(cli, db_url).code == 0
    models = by_key(db_url, "models", "model_id")
    assert models["m1"]["name"] == "Cat model v2" and models["m1"]["deleted_at"] is None
    assert models["m2"]["deleted_at"] is not None  # gone from the listing: soft-deleted
    # m1 changed, so its details were fetched again: its new training run is there.
    assert "t4" in by_key(db_url, "model_training_runs", "training_run_id")
    models_run = [r for r in runs(db_url) if r["resource"] == "models"][-1]
    assert (models_run["updated"], models_run["deleted"], models_run["unchanged"]) == (1, 1, 1)

    fake_api.models.append(model("m2", "Shared cats", dataset_id="a", owned=False))
    assert sync(cli, db_url).code == 0
    assert by_key(db_url, "models", "model_id")["m2"]["deleted_at"] is None
    changes = [(h["model_id"], h["change_type"]) for h in rows(db_url, "model_history", "id")]
    assert changes.count(("m2", "delete")) == 1 and changes[-1] == ("m2", "restore")
    assert ("m1", "update") in changes
    open_versions = Counter(
        h["model_id"] for h in rows(db_url, "model_history") if h["valid_to"] is None
    )
    assert open_versions == {"m1": 1, "m2": 1, "m3": 1}


def test_changed_details_replace_the_files_and_a_restored_dataset_is_asked_again(
    cli: Any, fake_api: FakeApi, db_url: str
) -> None:
    catalogue(fake_api)
    assert sync(cli, db_url).code == 0
    fake_api.requests.clear()
    # Only the listing of `a` changes: its details are asked for again, no one else's.
    fake_api.datasets[0] = dataset("a", "Cats v2")
    fake_api.files["a"] = [file("new.png", 7)]
    assert sync(cli, db_url).code == 0
    assert sorted(fake_api.paths("/datasets/")) == ["/datasets/a"]
    files = rows(db_url, "dataset_files", "dataset_id, position")
    assert [(f["dataset_id"], f["file_name"]) for f in files] == [
        ("a", "new.png"),
        ("b", "b1.png"),
        ("b", None),
    ]
    assert by_key(db_url, "datasets", "dataset_id")["a"]["total_file_bytes"] == 7
    details_run = [r for r in runs(db_url) if r["resource"] == "dataset_details"][-1]
    assert (details_run["datasets_seen"], details_run["updated"]) == (1, 1)

    # `b` leaves the listing (soft-deleted, its files kept as they were) and comes back.
    fake_api.datasets = [d for d in fake_api.datasets if d["dataset_id"] != "b"]
    assert sync(cli, db_url).code == 0
    assert by_key(db_url, "datasets", "dataset_id")["b"]["deleted_at"] is not None
    fake_api.requests.clear()
    fake_api.datasets.append(dataset("b", "Dogs"))
    assert sync(cli, db_url).code == 0
    assert fake_api.paths("/datasets/") == ["/datasets/b"]  # restored: its details again


def test_a_detail_that_vanished_waits_for_the_next_listing(
    cli: Any, fake_api: FakeApi, db_url: str
) -> None:
    catalogue(fake_api)
    fake_api.push(Reply(404, {"detail": "Dataset not found"}), path="/datasets/b")
    fake_api.push(Reply(404, {"detail": "Model not found"}), path="/models/m1")
    result = sync(cli, db_url)
    assert result.code == 0, result.err
    datasets = by_key(db_url, "datasets", "dataset_id")
    assert datasets["b"]["details_synced_at"] is None and datasets["b"]["file_count"] is None
    assert datasets["a"]["file_count"] == 2
    assert "t1" not in by_key(db_url, "model_training_runs", "training_run_id")
    assert "gone (404)" in result.err
    fake_api.requests.clear()
    assert sync(cli, db_url).code == 0
    assert sorted(fake_api.paths("/datasets/") + fake_api.paths("/models/")) == [
        "/datasets/b",
        "/models/m1",
    ]
    assert by_key(db_url, "datasets", "dataset_id")["b"]["file_count"] == 2


def test_a_key_refused_on_models_keeps_the_datasets_and_names_the_setting(
    cli: Any, fake_api: FakeApi, db_url: str
) -> None:
    catalogue(fake_api)
    fake_api.refused["/models"] = 403
    result = sync(cli, db_url)
    assert result.code == 1
    assert 'Remove "models" from [sync] resources' in result.err
    assert "Traceback" not in result.err
    assert set(by_key(db_url, "datasets", "dataset_id")) == {"a", "b", "c"}
    assert len(rows(db_url, "dataset_files")) == 4
    assert rows(db_url, "models") == []
    recorded = [(r["resource"], r["status"]) for r in runs(db_url)]
    # model_details builds on the models listing: not run, no row.
    assert recorded == [
        ("datasets", "success"),
        ("dataset_details", "success"),
        ("models", "failed"),
    ]
    assert "[sync] resources" in runs(db_url)[-1]["error"]

    # Turned off, the run is whole again.
    off = cli(
        "--database-url", db_url, "run", env={"IDEOGRAM_SYNC_RESOURCES": "datasets,dataset_details"}
    )
    assert off.code == 0, off.err


def test_a_429_storm_during_details_slows_every_worker(
    cli: Any, fake_api: FakeApi, sqlite_url: str
) -> None:
    fake_api.datasets = [dataset(f"d{i}") for i in range(12)]
    fake_api.detail_delay = 0.05
    pause = 2.0
    storm = [Reply(429, {"detail": "slow down"}, {"Retry-After": str(pause)}) for _ in range(3)]
    fake_api.push(*storm, path="/datasets/")
    result = sync(cli, sqlite_url, env={"IDEOGRAM_SYNC_RESOURCES": "datasets,dataset_details"})
    assert result.code == 0, result.err
    assert len(rows(sqlite_url, "dataset_files")) == 0
    assert all(d["details_synced_at"] for d in rows(sqlite_url))
    detail_times = [
        t
        for t, seen in zip(fake_api.times, fake_api.requests, strict=True)
        if seen.path.startswith("/datasets/")
    ]
    assert len(detail_times) == 12 + len(storm)
    # Each 429 is answered at once; after the first, no worker sends anything for the pause
    # (a request already on its way, from a worker slowed by a loaded machine, may still
    # arrive a little after the 429: hence the half second).
    first = detail_times[0]
    quiet = [t for t in detail_times if first + 0.5 < t < first + pause - 0.1]
    assert quiet == [], [round(t - first, 3) for t in detail_times]
    # The storm's 429s may come together (each worker's first request); the pause holds all.
    assert detail_times[-1] - first >= pause * 0.9


def test_detail_requests_stay_within_the_concurrency_bound(
    cli: Any, fake_api: FakeApi, sqlite_url: str, tmp_path: Path
) -> None:
    fake_api.datasets = [dataset(f"d{i:02d}") for i in range(16)]
    fake_api.detail_delay = 0.05
    config = tmp_path / "c.toml"
    config.write_text("[sync]\ndetails_concurrency = 3\n")
    result = cli(
        "--config",
        str(config),
        "--database-url",
        sqlite_url,
        "run",
        env={"IDEOGRAM_SYNC_RESOURCES": "datasets,dataset_details"},
    )
    assert result.code == 0, result.err
    assert fake_api.max_in_flight == 3  # used, and never more


def test_the_age_policy(cli: Any, fake_api: FakeApi, sqlite_url: str, tmp_path: Path) -> None:
    catalogue(fake_api)
    hourly = tmp_path / "hourly.toml"
    hourly.write_text('[sync]\ndetails_max_age = "1h"\n')
    assert (
        cli("--config", str(hourly), "--database-url", sqlite_url, "run", env=ALL_RESOURCES).code
        == 0
    )
    fake_api.requests.clear()
    # Within the age: nothing asked again.
    assert (
        cli("--config", str(hourly), "--database-url", sqlite_url, "run", env=ALL_RESOURCES).code
        == 0
    )
    assert fake_api.paths() == ["/datasets", "/models"]
    # Two hours pass, moved back in the database rather than slept, so a slow machine cannot
    # blur the age. The listing's change stays older than the fetch: only the age makes it due.
    engine = make_engine(sqlite_url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            for table in (tables.datasets, tables.models):
                conn.execute(
                    sa.update(table).values(
                        details_synced_at=now - timedelta(hours=2),
                        updated_at=now - timedelta(hours=3),
                    )
                )
    finally:
        engine.dispose()
    fake_api.requests.clear()
    assert (
        cli("--config", str(hourly), "--database-url", sqlite_url, "run", env=ALL_RESOURCES).code
        == 0
    )
    # Older than details_max_age: every dataset and owned model asked again, nothing changed.
    assert sorted(fake_api.paths("/datasets/")) == ["/datasets/a", "/datasets/b", "/datasets/c"]
    assert sorted(fake_api.paths("/models/")) == ["/models/m1", "/models/m3"]
    details_run = [r for r in runs(sqlite_url) if r["resource"] == "dataset_details"][-1]
    assert (details_run["unchanged"], details_run["updated"]) == (3, 0)


def test_the_deadline_covers_the_details(
    cli: Any, fake_api: FakeApi, sqlite_url: str, tmp_path: Path
) -> None:
    fake_api.datasets = [dataset(f"d{i}") for i in range(4)]
    fake_api.detail_delay = 30
    config = tmp_path / "c.toml"
    config.write_text("[sync]\ndeadline_seconds = 2\n")
    started = time.monotonic()
    result = cli(
        "--config",
        str(config),
        "--database-url",
        sqlite_url,
        "run",
        env={"IDEOGRAM_SYNC_RESOURCES": "datasets,dataset_details"},
    )
    assert time.monotonic() - started < 15
    assert result.code == 1 and "sync.deadline_seconds" in result.err
    recorded = [(r["resource"], r["status"]) for r in runs(sqlite_url)]
    assert recorded == [("datasets", "success"), ("dataset_details", "failed")]
    assert all(d["details_synced_at"] is None for d in rows(sqlite_url))


def test_an_invalid_detail_is_rejected_alone(cli: Any, fake_api: FakeApi, db_url: str) -> None:
    catalogue(fake_api)
    fake_api.push(
        Reply(200, {"dataset": dataset("b"), "file_count": "many", "files": []}), path="/datasets/b"
    )
    result = sync(cli, db_url)
    assert result.code == 0, result.err
    assert "rejected dataset details of b: file_count" in result.err
    datasets = by_key(db_url, "datasets", "dataset_id")
    assert datasets["b"]["details_synced_at"] is None and datasets["a"]["file_count"] == 2
    details_run = [r for r in runs(db_url) if r["resource"] == "dataset_details"][-1]
    assert (details_run["status"], details_run["rejected"], details_run["inserted"]) == (
        "success",
        1,
        2,
    )


def test_status_views_and_max_age_report_each_resource(
    cli: Any, fake_api: FakeApi, sqlite_url: str
) -> None:
    catalogue(fake_api)
    assert sync(cli, sqlite_url).code == 0
    fake_api.refused["/models"] = 404
    assert sync(cli, sqlite_url).code == 1
    status = cli("--database-url", sqlite_url, "status", "--format", "json", env=ALL_RESOURCES)
    newest = {}
    for run in json.loads(status.out):
        newest.setdefault(run["resource"], run["status"])
    assert newest == {
        "datasets": "success",
        "dataset_details": "success",
        "models": "failed",
        "model_details": "success",
    }
    assert status.code == 1
    stale = cli("--database-url", sqlite_url, "status", "--max-age", "1h", env=ALL_RESOURCES)
    assert stale.code == 4 and "stale: account default (models): its last run failed" in stale.err
    assert "(dataset_details)" not in stale.err
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        latest = {
            r.resource: r.status for r in conn.execute(sa.text("SELECT * FROM sync_runs_latest"))
        }
    engine.dispose()
    assert latest == newest


def test_views_follow_a_dataset_into_its_models(cli: Any, fake_api: FakeApi, db_url: str) -> None:
    catalogue(fake_api)
    assert sync(cli, db_url).code == 0
    engine = make_engine(db_url)
    with engine.connect() as conn:
        linked = conn.execute(
            sa.text(
                "SELECT dataset_id, model_id, model_status, latest_training_run_id, "
                "latest_training_status FROM dataset_models ORDER BY model_id"
            )
        ).all()
        current = conn.execute(
            sa.text("SELECT model_id FROM models_current ORDER BY model_id")
        ).all()
        sizes = conn.execute(
            sa.text(
                "SELECT dataset_id, file_count, total_file_bytes FROM datasets_current ORDER BY dataset_id"
            )
        ).all()
    engine.dispose()
    assert [tuple(r) for r in linked] == [
        ("a", "m1", "COMPLETED", "t2", "COMPLETED"),
        ("a", "m2", "COMPLETED", None, None),
    ]
    assert [r[0] for r in current] == ["m1", "m2", "m3"]
    assert [tuple(r) for r in sizes] == [("a", 2, 350), ("b", 2, None), ("c", 0, None)]


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_models_command(cli: Any, fake_api: FakeApi, sqlite_url: str, fmt: str) -> None:
    catalogue(fake_api)
    assert sync(cli, sqlite_url).code == 0
    shown = cli("--database-url", sqlite_url, "models", "--format", fmt)
    assert shown.code == 0, shown.err
    if fmt == "json":
        assert {m["model_id"]: m["status"] for m in json.loads(shown.out)} == {
            "m1": "COMPLETED",
            "m2": "COMPLETED",
            "m3": "TRAINING",
        }
    elif fmt == "csv":
        header, *lines = shown.out.splitlines()
        assert header.startswith("model_id,account,name,status,dataset_id") and len(lines) == 3
    else:
        assert shown.out.splitlines()[0].split() == [
            "MODEL_ID",
            "NAME",
            "STATUS",
            "DATASET_ID",
            "IS_OWNED",
            "CREATION_TIME",
        ]
        assert "Cat model" in shown.out and "Loose" in shown.out


def test_progress_shows_on_a_terminal_only(fake_api: FakeApi, sqlite_url: str) -> None:
    fake_api.datasets = [dataset(f"d{i}") for i in range(5)]
    env = subprocess_env(fake_api, sqlite_url, IDEOGRAM_SYNC_RESOURCES="datasets,dataset_details")
    plain = subprocess.run(
        [sys.executable, "-m", "sync", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert plain.returncode == 0, plain.stderr
    assert "dataset_details of default:" not in plain.stderr

    fake_api.datasets.append(dataset("d5"))
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sync", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=follower,
        cwd=ROOT,
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, seen
    assert b"dataset_details of default: 1/1 (" in seen and b"ETA" in seen


def test_progress_line() -> None:
    class Out:
        text = ""

        def write(self, part: str) -> None:
            self.text += part

        def flush(self) -> None:
            pass

    out = Out()
    progress = Progress(out, every=0)  # type: ignore[arg-type]
    progress("dataset_details of default", 1, 4)
    progress("dataset_details of default", 4, 4)
    lines = out.text.split("\r\x1b[2K")[1:]
    assert lines[0].startswith("dataset_details of default: 1/4 (") and "ETA" in lines[0]
    assert lines[1].startswith("dataset_details of default: 4/4 (") and lines[1].endswith("\n")


def test_resources_setting_is_checked(
    cli: Any, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IDEOGRAM_SYNC_RESOURCES")
    config = tmp_path / "c.toml"
    config.write_text('[sync]\nresources = ["datasets", "files"]\n')
    result = cli("--config", str(config), "--database-url", sqlite_url, "run")
    assert result.code == 2 and "sync.resources: unknown 'files'" in result.err


def test_a_listing_change_keeps_the_stored_details(
    cli: Any, fake_api: FakeApi, db_url: str
) -> None:
    catalogue(fake_api)
    assert sync(cli, db_url).code == 0
    fake_api.datasets[0] = dataset("a", "Cats renamed")
    fake_api.models[0] = model("m1", "Cat model renamed", dataset_id="a")
    listings_only = {"IDEOGRAM_SYNC_RESOURCES": "datasets,models"}
    assert cli("--database-url", db_url, "run", env=listings_only).code == 0
    a = by_key(db_url, "datasets", "dataset_id")["a"]
    assert (a["name"], a["file_count"], a["total_file_bytes"]) == ("Cats renamed", 2, 350)
    assert a["details_synced_at"] is not None and a["custom_model_ids"] == ["m1", "m2"]
    assert by_key(db_url, "models", "model_id")["m1"]["details_hash"] is not None


def test_the_examples_fake_api_serves_all_four_endpoints(tmp_path: Path) -> None:
    """README's trial: examples/fake_api.py and a real run of every resource against it."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "fake_api.py"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert "serving" in (server.stdout.readline() if server.stdout else "")
        env = {k: v for k, v in os.environ.items() if not k.startswith("IDEOGRAM_")}
        env.update(
            PYTHONPATH=str(ROOT),
            IDEOGRAM_API_KEY="anything",
            IDEOGRAM_API_BASE_URL=f"http://127.0.0.1:{port}",
        )
        url = f"sqlite:///{tmp_path / 'trial.db'}"
        done = subprocess.run(
            [sys.executable, "-m", "sync", "--database-url", url, "run"],
            env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        recorded = [(r["resource"], r["status"], r["inserted"]) for r in runs(url)]
        assert recorded == [
            ("datasets", "success", 3),
            ("dataset_details", "success", 3),
            ("models", "success", 3),
            ("model_details", "success", 2),
        ]
        assert len(rows(url, "dataset_files")) == 5 and len(rows(url, "model_training_runs")) == 2
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_status_leaves_out_a_resource_turned_off(
    cli: Any, fake_api: FakeApi, sqlite_url: str
) -> None:
    catalogue(fake_api)
    fake_api.refused["/models"] = 403
    assert sync(cli, sqlite_url).code == 1
    assert cli("--database-url", sqlite_url, "status", env=ALL_RESOURCES).code == 1
    # The models' failed run stays in sync_runs, but they are no longer synced.
    off = {"IDEOGRAM_SYNC_RESOURCES": "datasets,dataset_details"}
    assert cli("--database-url", sqlite_url, "status", env=off).code == 0
    assert cli("--database-url", sqlite_url, "status", "--max-age", "1h", env=off).code == 0


@pytest.mark.parametrize("first", ["owner", "viewer"])
def test_a_model_owned_by_one_account_and_shared_with_another(
    cli: Any, fake_api: FakeApi, db_url: str, tmp_path: Path, first: str
) -> None:
    """The owner's account has the row (is_owned true), whichever account synced first;
    the viewer's runs leave it alone, and the owner gets its training runs."""
    config = tmp_path / "two.toml"
    config.write_text(
        '[[accounts]]\nname = "owner"\napi_key_env = "KEY_OWNER"\n\n'
        '[[accounts]]\nname = "viewer"\napi_key_env = "KEY_VIEWER"\n'
    )
    keys = {"KEY_OWNER": "sk-owner-1", "KEY_VIEWER": "sk-viewer-2"}
    fake_api.datasets = [dataset("a")]
    fake_api.models_by_key = {
        "sk-owner-1": [model("m1", dataset_id="a")],
        "sk-viewer-2": [model("m1", dataset_id="a", owned=False)],
    }
    fake_api.training_runs = {"m1": [training_run("t1")]}
    env = {**ALL_RESOURCES, **keys}
    order = ["owner", "viewer"] if first == "owner" else ["viewer", "owner"]
    for _ in range(2):
        for account in order:
            result = cli(
                "--config",
                str(config),
                "--database-url",
                db_url,
                "run",
                "--account",
                account,
                env=env,
            )
            assert result.code == 0, result.err
    m1 = by_key(db_url, "models", "model_id")["m1"]
    assert (m1["account"], m1["is_owned"], m1["deleted_at"]) == ("owner", True, None)
    assert set(by_key(db_url, "model_training_runs", "training_run_id")) == {"t1"}
    history = [
        (h["account"], h["is_owned"], h["change_type"]) for h in rows(db_url, "model_history", "id")
    ]
    if first == "owner":
        assert history == [("owner", True, "insert")]  # no flip-flop
    else:
        assert history[-1] == ("owner", True, "update") and len(history) == 2  # taken over once
    fake_api.requests.clear()
    for account in order:
        assert (
            cli(
                "--config",
                str(config),
                "--database-url",
                db_url,
                "run",
                "--account",
                account,
                env=env,
            ).code
            == 0
        )
    assert sorted(fake_api.paths()) == ["/datasets", "/datasets", "/models", "/models"]


def test_one_failing_detail_costs_only_itself(
    cli: Any, fake_api: FakeApi, sqlite_url: str, tmp_path: Path
) -> None:
    catalogue(fake_api)
    config = tmp_path / "c.toml"
    config.write_text("[api]\nmax_retries = 0\n")
    fake_api.push(Reply(500, {"detail": "boom"}), path="/datasets/b")
    fake_api.push(
        Reply(200, "<html>login</html>", {"Content-Type": "text/html"}), path="/datasets/c"
    )
    result = cli("--config", str(config), "--database-url", sqlite_url, "run", env=ALL_RESOURCES)
    assert result.code == 0, result.err
    assert "rejected dataset details of b: the Ideogram API failed (HTTP 500" in result.err
    assert "rejected dataset details of c:" in result.err and "instead of JSON" in result.err
    datasets = by_key(sqlite_url, "datasets", "dataset_id")
    assert datasets["a"]["file_count"] == 2
    assert datasets["b"]["details_synced_at"] is None and datasets["c"]["details_synced_at"] is None
    details_run = [r for r in runs(sqlite_url) if r["resource"] == "dataset_details"][-1]
    assert (details_run["status"], details_run["inserted"], details_run["rejected"]) == (
        "success",
        1,
        2,
    )
    fake_api.requests.clear()
    assert (
        cli("--config", str(config), "--database-url", sqlite_url, "run", env=ALL_RESOURCES).code
        == 0
    )
    assert sorted(fake_api.paths("/datasets/")) == ["/datasets/b", "/datasets/c"]  # due again


def test_details_refused_for_every_item_name_the_setting(
    cli: Any, fake_api: FakeApi, sqlite_url: str
) -> None:
    catalogue(fake_api)
    fake_api.refused["/models/"] = 403
    result = sync(cli, sqlite_url)
    assert result.code == 1
    assert 'Remove "model_details" from [sync] resources' in result.err
    assert [(r["resource"], r["status"]) for r in runs(sqlite_url)][-1] == (
        "model_details",
        "failed",
    )


def test_a_large_first_sync_of_details_spans_runs(
    cli: Any, fake_api: FakeApi, sqlite_url: str, tmp_path: Path
) -> None:
    # About 6 s of details at concurrency 2; fetching stops at 3/4 of the 6 s deadline,
    # which leaves 1.5 s to write them even on a slow machine.
    fake_api.datasets = [dataset(f"d{i:02d}") for i in range(60)]
    fake_api.detail_delay = 0.2
    config = tmp_path / "c.toml"
    config.write_text("[sync]\ndeadline_seconds = 6\ndetails_concurrency = 2\n")
    only = {"IDEOGRAM_SYNC_RESOURCES": "datasets,dataset_details"}
    first = cli("--config", str(config), "--database-url", sqlite_url, "run", env=only)
    assert first.code == 0, first.err
    assert "the others are due at the next run" in first.err
    done = sum(1 for d in rows(sqlite_url) if d["details_synced_at"] is not None)
    assert 5 < done < 60
    for _ in range(6):
        if all(d["details_synced_at"] for d in rows(sqlite_url)):
            break
        assert cli("--config", str(config), "--database-url", sqlite_url, "run", env=only).code == 0
    assert all(d["details_synced_at"] for d in rows(sqlite_url))


def test_a_rejected_key_is_one_problem_not_four(
    cli: Any, fake_api: FakeApi, sqlite_url: str
) -> None:
    catalogue(fake_api)
    fake_api.rejected_keys.add("sk-bad")
    result = cli("--database-url", sqlite_url, "run", env=ALL_RESOURCES, key="sk-bad")
    assert result.code == 3
    assert "Remove" not in result.err and "rejected its key" in result.err
    assert [(r["resource"], r["status"]) for r in runs(sqlite_url)] == [("datasets", "failed")]


def test_reading_commands_on_an_older_database_say_to_migrate(
    cli: Any, fake_api: FakeApi, sqlite_url: str
) -> None:
    from sync.db import make_engine, migrate

    engine = make_engine(sqlite_url)
    try:
        migrate(engine, target="0010")
    finally:
        engine.dispose()
    for command in (["status"], ["status", "--max-age", "1h"], ["datasets"], ["models"]):
        result = cli("--database-url", sqlite_url, *command)
        assert result.code == 2, (command, result.err)
        assert "ideogram-sync migrate" in result.err and "Traceback" not in result.err
