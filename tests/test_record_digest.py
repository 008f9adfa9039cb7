"""Records recognised by their text (datasets.record_digest), synced through the real job.

A re-run looks up each record's stored digest and hands out a record whose text is exactly
the stored one without decoding it (sync.jsonstream.Known). What is checked here: the same
rows, counts and history as a full decode would give (tests.test_streaming_apply.check_sync,
which compares with parse_listing), every row's digest is that of its record's text, only
the records that differ are decoded, and a listing whose records are spelled differently
refreshes the digests without counting or recording a change.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest

from sync import store
from sync.jsonstream import ListingStream
from tests.fakeapi import dataset, synthetic
from tests.test_streaming_apply import Db, State, check_sync, migrated, snapshot, sync

COUNT = 1200


@pytest.fixture
def db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Db]:
    """A freshly migrated database on each backend; store.apply flushes every 500 rows."""
    yield from migrated(db_url, monkeypatch)


def digests_of(body: bytes) -> dict[str, str | None]:
    """The record digest of the last record of each id in `body`."""
    stream = ListingStream(io.BytesIO(body))
    return {record["dataset_id"]: stream.digest() for record in stream}


def decoded_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Ids of the records the diff decoded and compared by content (not recognised by text)."""
    seen: list[str] = []
    real = store.quick_hash

    def counting(record: Any) -> str | None:
        seen.append(record.get("dataset_id"))
        return real(record)

    monkeypatch.setattr(store, "quick_hash", counting)
    return seen


def checked_sync(db: Db, body: bytes) -> tuple[State, State, dict[str, int]]:
    """Sync `body`, check it against parse_listing and the digests; (before, after, counts)."""
    before = snapshot(db.engine)
    run_id = sync(db, body)
    after = snapshot(db.engine)
    counts = check_sync(body, before, after, run_id)
    assert {i: r["record_digest"] for i, r in after.datasets.items()} == digests_of(body)
    return before, after, counts


def renamed_every(step: int, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**r, "name": r["name"] + " (renamed)"} if i % step == 0 else r
        for i, r in enumerate(records)
    ]


def test_rerun_decodes_only_what_changed(db: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    base = synthetic(COUNT)
    checked_sync(db, json.dumps({"datasets": base}).encode())

    decoded = decoded_lookups(monkeypatch)
    changed = renamed_every(100, base)
    _, _, counts = checked_sync(db, json.dumps({"datasets": changed}).encode())
    assert (counts["updated"], counts["unchanged"]) == (COUNT // 100, COUNT - COUNT // 100)
    # The renamed ones, plus at most the first record (read to learn the separator) and
    # the last (not followed by one): the rest were recognised by their text.
    renamed_ids = {r["dataset_id"] for i, r in enumerate(changed) if i % 100 == 0}
    assert set(decoded) - renamed_ids <= {changed[0]["dataset_id"], changed[-1]["dataset_id"]}
    assert len(decoded) <= len(renamed_ids) + 2


def test_same_content_spelled_differently_refreshes_only_the_digests(
    db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = synthetic(COUNT)
    pretty = json.dumps({"datasets": base}, indent=2).encode()
    sync(db, pretty)
    before = snapshot(db.engine)

    compact = json.dumps({"datasets": base}, separators=(",", ":")).encode()
    before, after, counts = checked_sync(db, compact)
    assert (counts["inserted"], counts["updated"], counts["unchanged"]) == (0, 0, COUNT)
    assert after.history == before.history
    for dataset_id, row in after.datasets.items():
        old = before.datasets[dataset_id]
        assert {**row, "record_digest": None} == {**old, "record_digest": None}

    # Recognised in the new spelling from now on.
    decoded = decoded_lookups(monkeypatch)
    checked_sync(
        db, json.dumps({"datasets": renamed_every(300, base)}, separators=(",", ":")).encode()
    )
    assert len(decoded) <= COUNT // 300 + 2


def test_text_that_looks_like_a_boundary_is_not_one(db: Db) -> None:
    """Names holding `}, {` and whole records' text; a stored record's text inside a string."""
    plain = [dataset(f"id-{i}") for i in range(5)]
    inner = json.dumps(plain[1])[1:-1]
    tricky = [
        plain[0],
        {**plain[1], "name": "a}, {" + inner},
        plain[2],
        {**plain[3], "name": "}, {"},
        plain[4],
    ]
    for records in (plain, tricky, plain, list(reversed(tricky)), tricky):
        checked_sync(db, json.dumps({"datasets": records}).encode())


def test_a_repeated_record_recognised_by_its_text_counts_once(db: Db) -> None:
    base = synthetic(50)
    sync(db, json.dumps({"datasets": base}).encode())
    # The same text twice, and a recognised record followed by a changed one of its id.
    again = [*base, base[10], {**base[20], "name": "later"}]
    for records in (again, [*base, base[10]]):
        checked_sync(db, json.dumps({"datasets": records}).encode())


def test_repeats_inside_a_run_of_recognised_records(db: Db) -> None:
    """Recognised records come in runs: a repeat within one, or of a record from an earlier one."""
    base = synthetic(60)
    sync(db, json.dumps({"datasets": base}).encode())
    for records in (
        [*base[:30], base[10], *base[30:]],
        [*base[:5], base[5], *base[5:]],
        [*base, *base[:20]],
    ):
        checked_sync(db, json.dumps({"datasets": records}).encode())


def test_careful_pass_over_recognised_records(db: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repeat of a record already written forces the careful pass, which meets runs too."""
    base = synthetic(COUNT)
    sync(db, json.dumps({"datasets": base}).encode())
    passes: list[bool] = []
    real = store.apply

    def apply(*args: Any, **kwargs: Any) -> Any:
        passes.append(args[7] is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "apply", apply)
    changed = renamed_every(2, base)
    # 600 changed rows: the first 500 are written before the repeat of the first one.
    _, _, counts = checked_sync(db, json.dumps({"datasets": [*changed, changed[0]]}).encode())
    assert counts["unchanged"] == COUNT // 2
    assert passes == [False, True]


def test_an_update_that_moves_an_indexed_column_is_written_in_full(db: Db) -> None:
    """SQLite skips setting the indexed columns when no row of a batch changes one of them:
    a new user, creation time or account, or a restore, must still land."""
    base = synthetic(30)
    sync(db, json.dumps({"datasets": base}).encode())
    renamed = {**base[3], "name": "renamed"}
    for records in (
        [*base[:3], renamed, *base[4:]],
        [*base[:3], {**renamed, "user_id": "someone-else"}, *base[4:]],
        [*base[:3], {**renamed, "creation_time": "2020-02-02T02:02:02+00:00"}, *base[4:]],
    ):
        checked_sync(db, json.dumps({"datasets": records}).encode())
    sync(db, json.dumps({"datasets": base[:29]}).encode())  # soft-deletes the last one
    _, after, _ = checked_sync(
        db, json.dumps({"datasets": [*base[:29], {**base[29], "name": "back"}]}).encode()
    )
    assert after.datasets[base[29]["dataset_id"]]["deleted_at"] is None
