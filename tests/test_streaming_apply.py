"""A listing that repeats ids across flush batches, synced through the real job on each backend.

store.apply stages every store.FLUSH_ROWS changed rows while the listing streams; an id that
comes again after its first record was staged withdraws it, so that only the last occurrence
counts. Each sync here is checked against what parse_listing
says of the same body: the rows, the rejects, the protected ids, the run's counts, and a
history with one open version per dataset and no two versions of one dataset from one run.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine

from sync import runs, store
from sync.config import DatabaseSettings, Settings
from sync.db import make_engine, migrate, write_transaction
from sync.errors import Cancelled
from sync.job import sync_account
from sync.jsonstream import ListingStream
from sync.models import dataset_history, datasets, sync_runs
from sync.records import CONTENT_COLUMNS, DATASETS, canonical
from tests.fakeapi import synthetic
from tests.listing import Listing, parse_listing

COUNTED = ("datasets_seen", "inserted", "updated", "unchanged", "deleted", "rejected")
CONTENT = ("account", *CONTENT_COLUMNS)
TOTAL = 1200
REPEATED = 10
# Where the repeats go: well past the second flush (at record 1000) in a first sync.
LATER = [1001 + 15 * i for i in range(REPEATED)]
# store.apply stages its changed rows every FLUSH_ROWS; the tests lower that to this so a
# listing of TOTAL records spans several flushes (one test keeps the real value).
FLUSH = 500
REAL_FLUSH_ROWS = store.FLUSH_ROWS


@dataclass
class State:
    """Every row of the three tables a sync writes."""

    datasets: dict[str, dict[str, Any]]
    history: list[dict[str, Any]]
    runs: dict[int, dict[str, Any]]


@dataclass
class Db:
    """A migrated database, its engine and a clock that ticks a second per call."""

    url: str
    engine: Engine
    clock: Callable[[], datetime]


@pytest.fixture
def db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Db]:
    """A freshly migrated database on each backend; store.apply flushes every FLUSH rows."""
    yield from migrated(db_url, monkeypatch)


def migrated(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Db]:
    """The `db` fixture's body, for other modules' fixtures."""
    monkeypatch.setattr(store, "FLUSH_ROWS", FLUSH)
    engine = make_engine(db_url)
    if engine.dialect.name == "sqlite":
        sa.event.listen(
            engine, "connect", lambda dbapi, _r: dbapi.execute("PRAGMA synchronous=OFF")
        )
    migrate(engine)
    ticks = itertools.count()
    start = datetime(2030, 1, 1, tzinfo=UTC)
    try:
        yield Db(db_url, engine, lambda: start + timedelta(seconds=next(ticks)))
    finally:
        engine.dispose()


def snapshot(engine: Engine) -> State:
    """The datasets (by id), the history (by id) and the runs (by id)."""
    with engine.connect() as conn:
        table = {r.dataset_id: dict(r._mapping) for r in conn.execute(sa.select(datasets))}
        history = [
            dict(r._mapping)
            for r in conn.execute(sa.select(dataset_history).order_by(dataset_history.c.id))
        ]
        runs = {r.id: dict(r._mapping) for r in conn.execute(sa.select(sync_runs))}
    return State(table, history, runs)


def body_of(records: list[dict[str, Any]]) -> bytes:
    """The listing as the API sends it."""
    return json.dumps({"datasets": records}).encode()


def sync(db: Db, body: bytes) -> int:
    """One real sync of `body` for the default account; returns the run's id."""
    settings = Settings(database=DatabaseSettings(url=db.url))
    (outcome,) = sync_account(settings, settings.accounts[0], db.engine, body=body, clock=db.clock)
    assert outcome.result is not None, outcome.error
    return outcome.result.run_id


def repeated(records: list[dict[str, Any]], again: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`records` with again[i] (a record of the same id as records[i]) inserted at LATER[i]."""
    result = list(records)
    for position, record in zip(LATER, again, strict=True):
        result.insert(position, record)
    assert [result[p]["dataset_id"] for p in LATER] == [r["dataset_id"] for r in records[:REPEATED]]
    return result


def renamed(name: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `records`, each named `name` and its id."""
    return [{**r, "name": f"{name} {r['dataset_id']}"} for r in records]


def invalid(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `records` that are rejected (creation_time is no date-time) but keep their id."""
    return [{**r, "name": "never stored", "creation_time": "nope"} for r in records]


def expected_counts(listing: Listing, before: State) -> dict[str, int]:
    """The run's counts as parse_listing and the table before the sync say they must be."""
    inserted = updated = unchanged = 0
    for dataset_id, row in listing.rows.items():
        old = before.datasets.get(dataset_id)
        if old is None:
            inserted += 1
        elif old["deleted_at"] is not None or not same_content(old, row):
            updated += 1
        else:
            unchanged += 1
    return {
        "datasets_seen": listing.seen,
        "inserted": inserted,
        "updated": updated,
        "unchanged": unchanged,
        "deleted": len(deleted_ids(listing, before)),
        "rejected": len(listing.rejects),
    }


def deleted_ids(listing: Listing, before: State) -> set[str]:
    """Active stored ids the listing drops (nothing when a reject had no usable id)."""
    if not listing.complete:
        return set()
    return {
        dataset_id
        for dataset_id, row in before.datasets.items()
        if row["deleted_at"] is None
        and dataset_id not in listing.rows
        and dataset_id not in listing.protected_ids
    }


def same_content(stored: dict[str, Any], row: Any) -> bool:
    """Whether a stored row says what a parsed row says."""
    return canonical([stored[c] for c in CONTENT_COLUMNS]) == canonical(
        attrgetter(*CONTENT_COLUMNS)(row)
    )


def unlike(row: dict[str, Any], old: dict[str, Any] | None) -> bool:
    """Whether a sync changed `row` (a new hash alone is no change: the same content)."""
    return old is None or {**row, "content_hash": None} != {**old, "content_hash": None}


def content(row: dict[str, Any]) -> tuple[Any, ...]:
    """What a datasets row or a history version says about the dataset."""
    return tuple(row[c] for c in CONTENT)


def check_sync(body: bytes, before: State, after: State, run_id: int) -> dict[str, int]:
    """The sync of `body` did what parse_listing says; returns the run's counts."""
    listing = parse_listing(body)
    run = after.runs[run_id]
    assert (run["status"], run["error"]) == ("success", None)
    counts = {c: run[c] for c in COUNTED}
    assert counts == expected_counts(listing, before)

    # The table: the last valid occurrence of each id; protected and untouched rows as they were.
    gone = deleted_ids(listing, before)
    assert set(after.datasets) == set(before.datasets) | set(listing.rows)
    changed = set()
    for dataset_id, row in after.datasets.items():
        if dataset_id in listing.rows:
            want = listing.rows[dataset_id]
            assert (row["name"], row["user_id"], row["creation_time"]) == (
                want.name,
                want.user_id,
                want.creation_time,
            )
            assert (row["cover_asset_type"], row["cover_asset_id"], row["extra"]) == (
                want.cover_asset_type,
                want.cover_asset_id,
                want.extra,
            )
            assert row["deleted_at"] is None
            if unlike(row, before.datasets.get(dataset_id)):
                changed.add(dataset_id)
                assert row["last_sync_run_id"] == run_id
        elif dataset_id in gone:
            assert row["deleted_at"] is not None and row["last_sync_run_id"] == run_id
            changed.add(dataset_id)
        else:  # protected by a reject (or already deleted): exactly as it was
            assert row == before.datasets[dataset_id]
    for dataset_id in listing.protected_ids & set(before.datasets):
        assert after.datasets[dataset_id] == before.datasets[dataset_id]
    assert len(changed) == counts["inserted"] + counts["updated"] + counts["deleted"]

    # The history: one new version per changed dataset, from this run; older ones only closed.
    new = after.history[len(before.history) :]
    assert sorted(v["dataset_id"] for v in new) == sorted(changed)
    assert all(v["sync_run_id"] == run_id for v in new)
    for old, now in zip(before.history, after.history, strict=False):
        if old["valid_to"] is None and now["valid_to"] is not None:
            assert old["dataset_id"] in changed
            assert now == {**old, "valid_to": now["valid_to"]}
        else:
            assert now == old
    check_history(after)
    return counts


def check_history(state: State) -> None:
    """One open version per stored dataset, saying what its row says; no run writes one twice."""
    open_versions = [v for v in state.history if v["valid_to"] is None]
    assert Counter(v["dataset_id"] for v in open_versions) == Counter(state.datasets.keys())
    for version in open_versions:
        row = state.datasets[version["dataset_id"]]
        assert content(version) == content(row)
        assert (version["change_type"] == "delete") == (row["deleted_at"] is not None)
    per_run = Counter((v["dataset_id"], v["sync_run_id"]) for v in state.history)
    assert max(per_run.values()) == 1


def test_repeat_after_a_flush_at_the_real_flush_size(
    db: Db, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "FLUSH_ROWS", REAL_FLUSH_ROWS)
    caplog.set_level(logging.WARNING, logger="sync.job")
    base = synthetic(REAL_FLUSH_ROWS + 10)
    body = body_of(base + renamed("Later", base[:3]))
    before = snapshot(db.engine)

    run_id = sync(db, body)

    after = snapshot(db.engine)
    counts = check_sync(body, before, after, run_id)
    assert counts == {
        "datasets_seen": REAL_FLUSH_ROWS + 13,
        "inserted": REAL_FLUSH_ROWS + 10,
        "updated": 0,
        "unchanged": 0,
        "deleted": 0,
        "rejected": 0,
    }
    for record in base[:3]:
        assert after.datasets[record["dataset_id"]]["name"] == f"Later {record['dataset_id']}"


def test_repeat_after_flush_stores_the_later_record(
    db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sync.job")
    base = synthetic(TOTAL)
    body = body_of(repeated(base, renamed("Later", base[:REPEATED])))
    before = snapshot(db.engine)

    run_id = sync(db, body)

    after = snapshot(db.engine)
    counts = check_sync(body, before, after, run_id)
    assert counts == {
        "datasets_seen": TOTAL + REPEATED,
        "inserted": TOTAL,
        "updated": 0,
        "unchanged": 0,
        "deleted": 0,
        "rejected": 0,
    }
    for record in base[:REPEATED]:
        dataset_id = record["dataset_id"]
        assert after.datasets[dataset_id]["name"] == f"Later {dataset_id}"
    assert after.datasets[base[REPEATED]["dataset_id"]]["name"] == base[REPEATED]["name"]
    assert len(after.history) == TOTAL
    assert {v["change_type"] for v in after.history} == {"insert"}
    assert not any(v["name"] == base[0]["name"] for v in after.history)


def test_invalid_repeat_after_flush_on_a_fresh_table_stores_nothing_for_it(
    db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sync.job")
    base = synthetic(TOTAL)
    body = body_of(repeated(base, invalid(base[:REPEATED])))
    listing = parse_listing(body)
    ids = {r["dataset_id"] for r in base[:REPEATED]}
    assert listing.protected_ids == ids
    before = snapshot(db.engine)

    run_id = sync(db, body)

    after = snapshot(db.engine)
    counts = check_sync(body, before, after, run_id)
    assert counts == {
        "datasets_seen": TOTAL + REPEATED,
        "inserted": TOTAL - REPEATED,
        "updated": 0,
        "unchanged": 0,
        "deleted": 0,
        "rejected": REPEATED,
    }
    assert not ids & set(after.datasets)
    assert not ids & {v["dataset_id"] for v in after.history}


@pytest.mark.parametrize("earlier", ["as stored", "changed"])
def test_invalid_repeat_protects_the_stored_row(
    db: Db, caplog: pytest.LogCaptureFixture, earlier: str
) -> None:
    caplog.set_level(logging.WARNING, logger="sync.job")
    base = synthetic(TOTAL)
    sync(db, body_of(base))
    before = snapshot(db.engine)
    caplog.clear()
    # "changed": every earlier record (and 590 more) renamed, so updates flush before the
    # repeats; "as stored": the earlier records match the table, nothing is written early.
    first = renamed("V2", base[:600]) if earlier == "changed" else base[:600]
    body = body_of(repeated(first + base[600:], invalid(base[:REPEATED])))

    run_id = sync(db, body)

    after = snapshot(db.engine)
    counts = check_sync(body, before, after, run_id)
    renames = 600 - REPEATED if earlier == "changed" else 0
    assert counts == {
        "datasets_seen": TOTAL + REPEATED,
        "inserted": 0,
        "updated": renames,
        "unchanged": TOTAL - REPEATED - renames,
        "deleted": 0,
        "rejected": REPEATED,
    }
    for record in base[:REPEATED]:
        row = after.datasets[record["dataset_id"]]
        assert row == before.datasets[record["dataset_id"]]
        assert row["name"] == record["name"] and row["deleted_at"] is None
    assert len(after.history) == TOTAL + renames


@pytest.mark.parametrize("later", ["newer", "as stored"])
def test_rerun_with_repeats_after_flush_counts_right(
    db: Db, caplog: pytest.LogCaptureFixture, later: str
) -> None:
    caplog.set_level(logging.WARNING, logger="sync.job")
    base = synthetic(TOTAL)
    sync(db, body_of(base))
    before = snapshot(db.engine)
    caplog.clear()
    # The first 600 records renamed (so they flush before the repeats come); the first ten
    # come again later, either renamed once more or exactly as they are stored.
    first = renamed("V2", base[:600])
    again = renamed("V3", base[:REPEATED]) if later == "newer" else base[:REPEATED]
    body = body_of(repeated(first + base[600:], again))

    run_id = sync(db, body)

    after = snapshot(db.engine)
    counts = check_sync(body, before, after, run_id)
    updated = 600 if later == "newer" else 600 - REPEATED
    assert counts == {
        "datasets_seen": TOTAL + REPEATED,
        "inserted": 0,
        "updated": updated,
        "unchanged": TOTAL - updated,
        "deleted": 0,
        "rejected": 0,
    }
    for record in base[:REPEATED]:
        dataset_id = record["dataset_id"]
        want = f"V3 {dataset_id}" if later == "newer" else record["name"]
        assert after.datasets[dataset_id]["name"] == want
        # No trace of the rolled-back first pass: no V2 version of a repeated dataset.
        names = [v["name"] for v in after.history if v["dataset_id"] == dataset_id]
        assert names == ([record["name"], want] if later == "newer" else [record["name"]])
    assert len(after.history) == TOTAL + updated


@pytest.mark.parametrize("spelling", ["same bytes", "respaced"])
def test_same_listing_with_repeats_twice_changes_nothing_the_second_time(
    db: Db, caplog: pytest.LogCaptureFixture, spelling: str
) -> None:
    caplog.set_level(logging.WARNING, logger="sync.job")
    base = synthetic(TOTAL)
    records = repeated(base, renamed("Later", base[:REPEATED]))
    body = body_of(records)
    sync(db, body)
    before = snapshot(db.engine)
    # "respaced": the same records in other bytes, so the run diffs them again; the first
    # occurrences differ from the table and wait to be written when their repeats come.
    if spelling == "respaced":
        body = json.dumps({"datasets": records}, separators=(",", ":")).encode()

    run_id = sync(db, body)

    after = snapshot(db.engine)
    counts = check_sync(body, before, after, run_id)
    assert counts == {
        "datasets_seen": TOTAL + REPEATED,
        "inserted": 0,
        "updated": 0,
        "unchanged": TOTAL,
        "deleted": 0,
        "rejected": 0,
    }
    assert set(after.datasets) == set(before.datasets)
    if spelling == "respaced":  # the same content: only the hashes of the new text
        for dataset_id, row in after.datasets.items():
            assert {**row, "content_hash": None} == {
                **before.datasets[dataset_id],
                "content_hash": None,
            }
    else:
        assert after.datasets == before.datasets
    assert after.history == before.history


def test_dropped_datasets_are_deleted_while_repeats_are_resolved(
    db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sync.job")
    base = synthetic(TOTAL + 20)
    sync(db, body_of(base))
    before = snapshot(db.engine)
    caplog.clear()
    # 20 datasets gone, the first 600 renamed, the first ten again (renamed once more),
    # and the ten after them again but rejected.
    kept = renamed("V2", base[:600]) + base[600:TOTAL]
    records = repeated(kept, renamed("V3", base[:REPEATED]))
    records[1150:1150] = invalid(base[REPEATED : 2 * REPEATED])
    body = body_of(records)

    run_id = sync(db, body)

    after = snapshot(db.engine)
    counts = check_sync(body, before, after, run_id)
    assert counts == {
        "datasets_seen": TOTAL + 2 * REPEATED,
        "inserted": 0,
        "updated": 600 - REPEATED,
        "unchanged": TOTAL - 600,
        "deleted": 20,
        "rejected": REPEATED,
    }
    for record in base[REPEATED : 2 * REPEATED]:
        assert after.datasets[record["dataset_id"]] == before.datasets[record["dataset_id"]]
    for record in base[TOTAL:]:
        assert after.datasets[record["dataset_id"]]["deleted_at"] is not None


@pytest.mark.parametrize("stop_at", [3, 4, 7])
def test_a_stop_between_batches_leaves_nothing(db: Db, stop_at: int) -> None:
    """A stop (cancel, SIGTERM, the deadline) at a checkpoint: the rollback leaves nothing."""
    body = body_of(synthetic(TOTAL * 3))
    run_id = runs.start_run(db.engine, "default", db.clock())
    before = snapshot(db.engine)
    calls = itertools.count(1)

    def checkpoint() -> None:
        if next(calls) == stop_at:
            raise Cancelled()

    with pytest.raises(Cancelled), write_transaction(db.engine) as conn:
        store.apply(
            conn,
            DATASETS,
            "default",
            ListingStream(io.BytesIO(body)),
            run_id,
            db.clock(),
            checkpoint=checkpoint,
        )
    assert snapshot(db.engine) == before
    # The connection is usable again: a full sync afterwards is right.
    run_id = sync(db, body)
    check_sync(body, before, snapshot(db.engine), run_id)
