"""Hostile bodies, hand-written and generated: never a traceback; a reject or a cleanly failed
run; the data from an earlier good sync untouched; what the parser accepts stores everywhere."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync.errors import ResponseError
from sync.records import parse_listing
from tests.conftest import rows
from tests.fakeapi import FakeApi, Reply, dataset

MEGA = "x" * 1_000_000
HAND_WRITTEN: dict[str, bytes] = {
    "megabyte-name": json.dumps({"datasets": [dataset("m", MEGA)]}).encode(),
    "megabyte-id": json.dumps({"datasets": [dataset(MEGA)]}).encode(),
    "nul-in-name": json.dumps({"datasets": [dataset("n", "a\x00b")]}).encode(),
    "lone-surrogate": b'{"datasets": [{"dataset_id": "s", "name": "\\ud800", "user_id": "u", "creation_time": "2024-01-01T00:00:00Z"}]}',
    "encoded-surrogate": b'{"datasets": [{"dataset_id": "s", "name": "\xed\xa0\x80", "user_id": "u", "creation_time": "2024-01-01T00:00:00Z"}]}',
    "invalid-utf8": b'{"datasets": [{"dataset_id": "\xff\xfe"}]}',
    "array-at-top": b"[]",
    "null": b"null",
    "datasets-null": b'{"datasets": null}',
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep-extra": b'{"datasets": [{"dataset_id": "d", "name": "n", "user_id": "u", "creation_time": "2024-01-01T00:00:00Z", "x": '
    + b"[" * 50_000
    + b"]" * 50_000
    + b"}]}",
    "huge-number": b'{"datasets": [{"dataset_id": "h", "name": "n", "user_id": "u", "creation_time": "2024-01-01T00:00:00Z", "x": 1e999999}]}',
    "duplicate-keys": b'{"datasets": [{"dataset_id": "k", "dataset_id": "k2", "name": "n", "user_id": "u", "creation_time": "2024-01-01T00:00:00Z"}]}',
    "wrong-types": json.dumps(
        {
            "datasets": [
                1,
                "s",
                None,
                [],
                {"dataset_id": {"a": 1}},
                {"dataset_id": "t", "cover_asset_identifier": 5},
            ]
        }
    ).encode(),
    "odd-unicode": json.dumps(
        {
            "datasets": [
                dataset(
                    "ü🙂", "名前 \u202e\u200b \U0001f600" * 40, user_id="ユーザー", note="\ufeff"
                )
            ]
        }
    ).encode(),
}


@pytest.mark.parametrize("name", list(HAND_WRITTEN))
def test_hand_written_bodies(cli, fake_api: FakeApi, db_url: str, name: str) -> None:
    fake_api.datasets = [dataset("keep-1"), dataset("keep-2")]
    assert cli("--database-url", db_url, "run").code == 0
    before = {r["dataset_id"]: r for r in rows(db_url)}

    fake_api.push(Reply(200, HAND_WRITTEN[name]))
    result = cli("--database-url", db_url, "run")

    assert result.code in (0, 1), result.err
    assert "Traceback" not in result.output
    run = rows(db_url, "sync_runs", order="id")[-1]
    after = {r["dataset_id"]: r for r in rows(db_url)}
    if result.code == 1:
        assert run["status"] == "failed" and run["error"]
        assert after == before
    else:
        assert run["status"] == "success"
        # The earlier rows are untouched unless this listing is complete and lacks them.
        for dataset_id, row in before.items():
            if run["deleted"] == 0:
                assert after[dataset_id] == row
        new = set(after) - set(before)
        assert len(new) == run["inserted"]
        for dataset_id in new:
            assert after[dataset_id]["name"] is not None


def test_odd_unicode_round_trips(cli, fake_api: FakeApi, db_url: str) -> None:
    name = ("名前 \u202e\u200b \U0001f600" * 60)[:1024]
    fake_api.datasets = [dataset("ü🙂", name, user_id="ユーザー", note={"🙂": "\ufeff"})]
    assert cli("--database-url", db_url, "run").code == 0
    (row,) = rows(db_url)
    assert (row["dataset_id"], row["name"], row["user_id"]) == ("ü🙂", name, "ユーザー")
    assert row["extra"] == {"note": {"🙂": "\ufeff"}}
    assert cli("--database-url", db_url, "run").code == 0
    assert rows(db_url, "sync_runs", order="id")[-1]["unchanged"] == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "dataset_id": json_values | st.text(min_size=1, max_size=300),
        "name": json_values | st.text(max_size=1100),
        "user_id": json_values | st.text(min_size=1),
        "creation_time": json_values
        | st.datetimes().map(lambda d: d.isoformat())
        | st.sampled_from(["2024-01-01 00:00:00+00:00", "2024-13-01T00:00:00Z", "2024-01-01"]),
        "cover_asset_identifier": json_values
        | st.fixed_dictionaries(
            {},
            optional={"asset_type": json_values | st.text(), "asset_id": json_values | st.text()},
        ),
        "extra_field": json_values,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fields | json_values, max_size=6) | json_values)
def test_generated_bodies_never_raise_anything_else(payload: Any) -> None:
    body = json.dumps({"datasets": payload} if isinstance(payload, list) else payload)
    try:
        listing = parse_listing(body)
    except ResponseError:
        return
    assert len(listing.rejects) + len(listing.rows) + len(listing.duplicates) >= 0
    for row in listing.rows.values():
        assert isinstance(row.dataset_id, str) and row.dataset_id.strip()
        assert row.creation_time.tzinfo is not None
        row.name.encode("utf-8")  # storable everywhere
    assert sum(1 for _ in listing.rejects) <= listing.seen


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(fields, min_size=1, max_size=4))
def test_generated_records_store_or_reject_on_sqlite(
    cli, fake_api: FakeApi, sqlite_url: str, records: list[dict[str, Any]]
) -> None:
    fake_api.push(Reply(200, {"datasets": records}))
    result = cli("--database-url", sqlite_url, "run")
    assert result.code == 0, result.err
    assert "Traceback" not in result.output
    run = rows(sqlite_url, "sync_runs", order="id")[-1]
    assert run["datasets_seen"] == len(records)
