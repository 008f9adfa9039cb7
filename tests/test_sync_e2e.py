"""End-to-end: the CLI against the fake API, on every database backend."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from tests.conftest import API_KEY, rows
from tests.fakeapi import FakeApi, Reply, dataset, synthetic


@pytest.fixture
def writes() -> Iterator[list[str]]:
    """Every INSERT/UPDATE/DELETE statement sent to `datasets` while the test runs."""
    seen: list[str] = []

    def listener(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        text = " ".join(statement.split()).upper()
        if text.startswith(("INSERT INTO DATASETS", "UPDATE DATASETS", "DELETE FROM DATASETS")):
            seen.append(text)

    event.listen(sa.Engine, "before_cursor_execute", listener)
    yield seen
    event.remove(sa.Engine, "before_cursor_execute", listener)


def by_id(url: str) -> dict[str, dict[str, Any]]:
    return {r["dataset_id"]: r for r in rows(url)}


def runs(url: str) -> list[dict[str, Any]]:
    return rows(url, "sync_runs", order="id")


def test_first_sync_stores_every_dataset(cli, fake_api: FakeApi, db_url: str) -> None:
    fake_api.datasets = [
        dataset("a", "Cats", created="2000-01-23 04:56:07+00:00"),
        dataset("b", "Dogs", created="2024-12-15T19:32:00.965408+02:00", cover=None),
        dataset("c", "Birds", created="2024-12-15T17:32:00Z", sharing=[{"user": "x"}]),
    ]
    result = cli("--database-url", db_url, "run")
    assert result.code == 0, result.err

    stored = by_id(db_url)
    assert set(stored) == {"a", "b", "c"}
    a, b, c = stored["a"], stored["b"], stored["c"]
    assert a["name"] == "Cats" and a["user_id"] == "user-1" and a["account"] == "default"
    assert a["creation_time"] == datetime(2000, 1, 23, 4, 56, 7, tzinfo=UTC)
    assert a["cover_asset_type"] == "RESPONSE" and a["cover_asset_id"] == "cov-a"
    assert a["extra"] is None and a["deleted_at"] is None
    assert b["creation_time"] == datetime(2024, 12, 15, 17, 32, 0, 965408, tzinfo=UTC)
    assert b["creation_time"].utcoffset().total_seconds() == 0
    assert b["cover_asset_type"] is None and b["cover_asset_id"] is None
    assert c["extra"] == {"sharing": [{"user": "x"}]}

    (run,) = runs(db_url)
    assert run["status"] == "success" and run["error"] is None
    assert (run["datasets_seen"], run["inserted"], run["updated"], run["unchanged"]) == (3, 3, 0, 0)
    assert (run["deleted"], run["rejected"]) == (0, 0)
    assert a["last_sync_run_id"] == run["id"]
    assert run["started_at"] <= run["finished_at"]
    assert run["started_at"].tzinfo is not None
    # Request carried the key, a User-Agent naming the tool, and no `search` parameter.
    (request,) = fake_api.requests
    assert request.path == "/datasets"
    assert request.headers["Api-Key"] == API_KEY
    assert request.headers["User-Agent"].startswith("ideogram-dataset-sync/")


def test_unchanged_rerun_writes_nothing(cli, fake_api: FakeApi, db_url: str, writes) -> None:
    fake_api.datasets = synthetic(30)
    assert cli("--database-url", db_url, "run").code == 0
    before = by_id(db_url)
    writes.clear()

    assert cli("--database-url", db_url, "run").code == 0

    assert writes == []
    assert by_id(db_url) == before
    last = runs(db_url)[-1]
    assert (last["inserted"], last["updated"], last["unchanged"], last["deleted"]) == (0, 0, 30, 0)


def test_changes_removal_and_return(cli, fake_api: FakeApi, db_url: str) -> None:
    fake_api.datasets = [dataset("a"), dataset("b"), dataset("c")]
    assert cli("--database-url", db_url, "run").code == 0
    first = by_id(db_url)

    # Rename a, change b's cover, drop c.
    fake_api.datasets = [
        dataset("a", "Renamed"),
        dataset("b", cover={"asset_type": "UPLOAD", "asset_id": "new-cover"}),
    ]
    assert cli("--database-url", db_url, "run").code == 0
    second = by_id(db_url)
    run2 = runs(db_url)[-1]
    assert (run2["inserted"], run2["updated"], run2["unchanged"], run2["deleted"]) == (0, 2, 0, 1)
    assert second["a"]["name"] == "Renamed"
    assert second["a"]["updated_at"] > first["a"]["updated_at"]
    assert second["a"]["first_seen_at"] == first["a"]["first_seen_at"]
    assert second["a"]["last_sync_run_id"] == run2["id"]
    assert (second["b"]["cover_asset_type"], second["b"]["cover_asset_id"]) == (
        "UPLOAD",
        "new-cover",
    )
    assert second["c"]["deleted_at"] is not None
    assert second["c"]["name"] == first["c"]["name"]

    # A deleted dataset stays deleted while it is absent: no new writes.
    assert cli("--database-url", db_url, "run").code == 0
    run3 = runs(db_url)[-1]
    assert (run3["updated"], run3["deleted"], run3["unchanged"]) == (0, 0, 2)
    assert by_id(db_url)["c"]["deleted_at"] == second["c"]["deleted_at"]

    # c comes back.
    fake_api.datasets = [dataset("a", "Renamed"), dataset("b", cover=None), dataset("c")]
    assert cli("--database-url", db_url, "run").code == 0
    fourth = by_id(db_url)
    run4 = runs(db_url)[-1]
    assert (run4["inserted"], run4["updated"], run4["unchanged"], run4["deleted"]) == (0, 2, 1, 0)
    assert fourth["c"]["deleted_at"] is None
    assert fourth["c"]["first_seen_at"] == first["c"]["first_seen_at"]
    assert fourth["b"]["cover_asset_type"] is None


def test_ids_are_case_sensitive(cli, fake_api: FakeApi, db_url: str) -> None:
    fake_api.datasets = [dataset("AbC"), dataset("abc")]
    assert cli("--database-url", db_url, "run").code == 0
    assert set(by_id(db_url)) == {"AbC", "abc"}


FAILURES = {
    "http-500-until-retries-run-out": [Reply(500, {"detail": "boom"})] * 3,
    "http-503-html": [Reply(503, "<html>down</html>", {"Content-Type": "text/html"})] * 3,
    "truncated-json": [Reply(200, '{"datasets": [{"dataset_id": "x"')],
    "cut-connection": [Reply(200, json.dumps({"datasets": []}) * 50, truncate_to=10)],
    "html-200": [Reply(200, "<html>login</html>", {"Content-Type": "text/html"})],
    "no-datasets-field": [Reply(200, {"data": []})],
    "datasets-not-a-list": [Reply(200, {"datasets": {"a": 1}})],
    "top-level-array": [Reply(200, [])],
    "json-null": [Reply(200, "null")],
    "not-json": [Reply(200, b"\xff\xfe garbage")],
    "http-404": [Reply(404, {"detail": "Not Found"})],
    "redirect": [Reply(302, b"", {"Location": "http://elsewhere.invalid/datasets"})],
}


@pytest.mark.parametrize("name", list(FAILURES))
def test_failures_leave_data_untouched(cli, fake_api: FakeApi, db_url: str, name: str) -> None:
    fake_api.datasets = [dataset("a"), dataset("b")]
    assert cli("--database-url", db_url, "run").code == 0
    before = by_id(db_url)

    fake_api.datasets = [dataset("a", "changed")]
    fake_api.push(*FAILURES[name])
    result = cli(
        "--database-url", db_url, "run",
        env={"IDEOGRAM_SYNC_CONFIG": _fast_retries()},
    )  # fmt: skip

    assert result.code == 1, result.err
    assert by_id(db_url) == before
    run = runs(db_url)[-1]
    assert run["status"] == "failed"
    assert run["error"]
    assert run["finished_at"] is not None
    error_lines = [line for line in result.err.splitlines() if " ERROR " in line]
    assert len(error_lines) == 1, result.err
    assert run["error"] in error_lines[0]
    assert "Traceback" not in result.output
    assert API_KEY not in result.output and API_KEY not in run["error"]
    if name.startswith("http-5"):
        assert "HTTP 50" in run["error"]


def _fast_retries() -> str:
    with open("fast.toml", "w") as fh:
        fh.write("[api]\nmax_retries = 2\nbackoff_factor = 0\ntimeout_seconds = 5\n")
    return "fast.toml"


def test_api_rejects_key_exit_3(cli, fake_api: FakeApi, db_url: str) -> None:
    fake_api.datasets = [dataset("a")]
    assert cli("--database-url", db_url, "run").code == 0
    before = by_id(db_url)
    fake_api.push(Reply(401, {"detail": "Invalid API key"}))

    result = cli("--database-url", db_url, "run", key="sk-wrong-key-123")

    assert result.code == 3
    assert "rejected the key" in result.err and "HTTP 401" in result.err
    assert "sk-wrong-key-123" not in result.output
    assert by_id(db_url) == before
    assert runs(db_url)[-1]["status"] == "failed"
    assert "HTTP 401" in runs(db_url)[-1]["error"]
    assert len(fake_api.requests) == 2  # no retry on 401


def test_retry_after_is_honoured_then_succeeds(cli, fake_api: FakeApi, db_url: str) -> None:
    fake_api.datasets = [dataset("a")]
    fake_api.push(
        Reply(429, {"detail": "slow down"}, {"Retry-After": "1"}),
        Reply(503, b"", {"Retry-After": "0"}),
    )
    result = cli("--database-url", db_url, "run", env={"IDEOGRAM_SYNC_CONFIG": _fast_retries()})
    assert result.code == 0, result.err
    assert len(fake_api.requests) == 3
    assert set(by_id(db_url)) == {"a"}


def test_rejected_records_are_counted_and_protected(cli, fake_api: FakeApi, db_url: str) -> None:
    fake_api.datasets = [dataset("a"), dataset("b"), dataset("c")]
    assert cli("--database-url", db_url, "run").code == 0
    before = by_id(db_url)

    bad_b = dataset("b", "new name", created="not a time")
    fake_api.datasets = [dataset("a"), bad_b, dataset("d", user_id=None)]
    result = cli("--database-url", db_url, "run")

    assert result.code == 0, result.err
    after = by_id(db_url)
    assert after["b"] == before["b"]  # rejected: left as it was, not deleted
    assert after["c"]["deleted_at"] is not None  # really gone
    assert "d" not in after
    run = runs(db_url)[-1]
    assert (run["datasets_seen"], run["rejected"], run["deleted"], run["unchanged"]) == (3, 2, 1, 1)
    assert "rejected dataset b: creation_time" in result.err
    assert "rejected dataset d: user_id" in result.err


def test_reject_without_id_prevents_soft_deletes(cli, fake_api: FakeApi, db_url: str) -> None:
    fake_api.datasets = [dataset("a"), dataset("b")]
    assert cli("--database-url", db_url, "run").code == 0
    fake_api.datasets = [dataset("a"), {"name": "no id"}]
    result = cli("--database-url", db_url, "run")
    assert result.code == 0
    assert by_id(db_url)["b"]["deleted_at"] is None
    assert "soft-deletes nothing" in result.err
    assert runs(db_url)[-1]["deleted"] == 0


def test_on_invalid_record_fail(cli, fake_api: FakeApi, db_url: str, tmp_path) -> None:
    (tmp_path / "strict.toml").write_text('[sync]\non_invalid_record = "fail"\n')
    fake_api.datasets = [dataset("a"), {"dataset_id": "b", "name": 7}]
    result = cli("--config", "strict.toml", "--database-url", db_url, "run")
    assert result.code == 1
    assert "name is a JSON number" in result.err
    assert rows(db_url) == []
    run = runs(db_url)[-1]
    assert run["status"] == "failed" and run["rejected"] == 1


def test_duplicates_count_once_last_wins(cli, fake_api: FakeApi, db_url: str) -> None:
    fake_api.datasets = [dataset("a", "first"), dataset("b"), dataset("a", "second")]
    result = cli("--database-url", db_url, "run")
    assert result.code == 0
    assert by_id(db_url)["a"]["name"] == "second"
    run = runs(db_url)[-1]
    assert (run["datasets_seen"], run["inserted"]) == (3, 2)
    assert "listed more than once" in result.err


def test_bounded_statements_for_many_rows(cli, fake_api: FakeApi, db_url: str, writes) -> None:
    fake_api.datasets = synthetic(2000)
    assert cli("--database-url", db_url, "run").code == 0
    assert len(rows(db_url)) == 2000
    # 2,000 rows: a handful of statements, not one per row (SQLite and PostgreSQL stage
    # them first, PostgreSQL by COPY on the driver's cursor, which this listener does not see).
    assert 1 <= len(writes) <= 8, len(writes)


def test_unknown_fields_compare_as_json_not_as_python(cli, fake_api: FakeApi, db_url: str) -> None:
    """`true` is not `1`, and 1e23 stays unchanged even where JSONB hands it back as an int."""
    fake_api.datasets = [dataset("a", flag=1, score=1e23)]
    assert cli("--database-url", db_url, "run").code == 0
    assert cli("--database-url", db_url, "run").code == 0
    assert runs(db_url)[-1]["unchanged"] == 1

    fake_api.datasets = [dataset("a", flag=True, score=1e23)]
    assert cli("--database-url", db_url, "run").code == 0
    assert runs(db_url)[-1]["updated"] == 1
    assert by_id(db_url)["a"]["extra"]["flag"] is True


def test_mass_soft_delete_is_a_few_statements(cli, fake_api: FakeApi, db_url: str, writes) -> None:
    """Right after a bulk load PostgreSQL has no statistics: ids go as one array, not IN lists
    (each IN batch became a full table scan: 90 s for 100,000 ids)."""
    fake_api.datasets = synthetic(1200)
    assert cli("--database-url", db_url, "run").code == 0
    writes.clear()
    fake_api.datasets = []
    assert cli("--database-url", db_url, "run", "--allow-mass-delete").code == 0
    assert all(r["deleted_at"] is not None for r in rows(db_url))
    soft_deletes = [w for w in writes if w.startswith("UPDATE DATASETS")]
    expected = 1 if db_url.startswith("postgresql") else 3  # batches of 500
    assert len(soft_deletes) == expected, soft_deletes
    if db_url.startswith("postgresql"):
        assert "ANY" in soft_deletes[0]
