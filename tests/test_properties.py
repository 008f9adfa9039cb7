"""Property-based tests: random sequences of listings, synced for real, checked against a model.

Each hypothesis example starts from an empty database and syncs a few listings (each one
twice) through `sync.job.sync_account`. A small independent model of the rules (last
occurrence wins, a rejected record protects its stored row, a reject without a usable id
makes the listing incomplete so nothing is soft-deleted) predicts the table and the counts;
`dataset_history` must rebuild every earlier listing, both by time and by run id.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from alembic import command
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from sync.config import DatabaseSettings, Settings
from sync.db import alembic_config, make_engine, migrate
from sync.job import sync_account
from sync.models import dataset_history, datasets, metadata, sync_runs

# Examples per backend: SQLite is fast; the servers get fewer to keep the file under a minute.
EXAMPLES = {"sqlite": 40, "postgresql": 10, "mysql": 10}
# Case matters ("a" vs "A"), ids may be any Unicode and up to 255 characters long.
IDS = ("a", "b", "c", "A", "ü-😀", "L" * 255)
# Text without NUL and lone surrogates: everything a valid record may carry.
ODD_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=24)

Stored = tuple[Any, ...]  # (name, user_id, creation_time, cover type, cover id, extra as JSON)


def canonical(extra: Any) -> str | None:
    """JSON text that tells `true` from `1` and ignores key order: the strict comparison."""
    return None if extra is None else json.dumps(extra, sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class Cover:
    asset_type: str
    asset_id: str
    extra: dict[str, Any]


@dataclass(frozen=True)
class Content:
    """What a valid record says about one dataset."""

    name: str
    user_id: str
    created: datetime
    cover: Cover | None
    extra: dict[str, Any]

    def stored(self) -> Stored:
        """The row this content must become (the parser's documented mapping)."""
        extra = dict(self.extra)
        if self.cover is not None and self.cover.extra:
            extra["cover_asset_identifier"] = dict(self.cover.extra)
        return (
            self.name,
            self.user_id,
            self.created,
            self.cover.asset_type if self.cover else None,
            self.cover.asset_id if self.cover else None,
            canonical(extra or None),
        )


@dataclass(frozen=True)
class Render:
    """How a record is spelled; never changes what it means."""

    time_format: str
    cover_absent: bool


@dataclass(frozen=True)
class Valid:
    dataset_id: str
    content: Content
    render: Render


@dataclass(frozen=True)
class BadWithId:
    """An invalid record whose dataset_id is usable: the stored row must stay as it is."""

    dataset_id: str
    defect: str
    base: Content
    render: Render


@dataclass(frozen=True)
class BadNoId:
    """An invalid record without a usable dataset_id: nothing may be soft-deleted."""

    defect: str
    base: Content
    render: Render


Entry = Valid | BadWithId | BadNoId


def _format_time(moment: datetime, style: str) -> str:
    naive = moment.replace(tzinfo=None)
    if style == "iso":
        return moment.isoformat()
    if style == "space":
        return moment.isoformat(sep=" ")
    if style == "zulu":
        return naive.isoformat() + "Z"
    if style == "nanos":  # nine fraction digits: the parser keeps the first six
        return naive.isoformat(timespec="microseconds") + "789Z"
    if style == "naive":  # no zone: the API documents UTC
        return naive.isoformat()
    if style == "compact":
        return naive.isoformat() + "+0000"
    if style == "offset":  # the same instant elsewhere; the sign keeps it inside year 1..9999
        sign = 1 if moment.year < 5000 else -1
        return moment.astimezone(timezone(sign * timedelta(hours=5, minutes=30))).isoformat()
    raise AssertionError(style)


TIME_STYLES = ("iso", "space", "zulu", "nanos", "naive", "compact", "offset")


def _record(dataset_id: Any, content: Content, render: Render) -> dict[str, Any]:
    record: dict[str, Any] = {
        "dataset_id": dataset_id,
        "name": content.name,
        "user_id": content.user_id,
        "creation_time": _format_time(content.created, render.time_format),
    }
    if content.cover is not None:
        record["cover_asset_identifier"] = {
            "asset_type": content.cover.asset_type,
            "asset_id": content.cover.asset_id,
            **content.cover.extra,
        }
    elif not render.cover_absent:
        record["cover_asset_identifier"] = None
    record.update(content.extra)
    return record


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    def apply(record: dict[str, Any]) -> dict[str, Any]:
        record[key] = value
        return record

    return apply


def _drop(key: str) -> Callable[[dict[str, Any]], Any]:
    def apply(record: dict[str, Any]) -> dict[str, Any]:
        record.pop(key, None)
        return record

    return apply


# Defects that make a record invalid but leave its dataset_id usable.
WITH_ID_DEFECTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "name is a number": _set("name", 123),
    "name is missing": _drop("name"),
    "name is too long": _set("name", "n" * 1025),
    "name has a NUL": _set("name", "a\x00b"),
    "name has a lone surrogate": _set("name", "x\ud800"),
    "user_id is empty": _set("user_id", ""),
    "user_id is blank": _set("user_id", " \t"),
    "user_id is too long": _set("user_id", "u" * 256),
    "creation_time is not a date": _set("creation_time", "yesterday"),
    "creation_time is null": _set("creation_time", None),
    "creation_time is impossible": _set("creation_time", "2024-02-30T00:00:00Z"),
    "cover is a string": _set("cover_asset_identifier", "RESPONSE"),
    "cover lacks asset_id": _set("cover_asset_identifier", {"asset_type": "RESPONSE"}),
    "cover asset_type too long": _set(
        "cover_asset_identifier", {"asset_type": "T" * 65, "asset_id": "x"}
    ),
    "unknown field has a NUL": _set("note", "bad\x00"),
    "unknown key is a lone surrogate": _set("\udfff", 1),
}
# Defects after which no usable dataset_id is left.
NO_ID_DEFECTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "record is a string": lambda _r: "dataset",
    "record is a number": lambda _r: 42,
    "record is null": lambda _r: None,
    "record is an array": lambda r: [r],
    "dataset_id is missing": _drop("dataset_id"),
    "dataset_id is null": _set("dataset_id", None),
    "dataset_id is a number": _set("dataset_id", 7),
    "dataset_id is empty": _set("dataset_id", ""),
    "dataset_id is blank": _set("dataset_id", "   "),
    "dataset_id is too long": _set("dataset_id", "i" * 256),
    "dataset_id has a NUL": _set("dataset_id", "a\x00"),
    "dataset_id is a lone surrogate": _set("dataset_id", "\udc00"),
}


def render_entry(entry: Entry) -> Any:
    if isinstance(entry, Valid):
        return _record(entry.dataset_id, entry.content, entry.render)
    if isinstance(entry, BadWithId):
        return WITH_ID_DEFECTS[entry.defect](_record(entry.dataset_id, entry.base, entry.render))
    return NO_ID_DEFECTS[entry.defect](_record("placeholder", entry.base, entry.render))


def body_of(entries: list[Entry], ascii_only: bool) -> bytes:
    document = {"datasets": [render_entry(e) for e in entries]}
    try:
        return json.dumps(document, ensure_ascii=ascii_only).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate can only travel as a \u escape
        return json.dumps(document, ensure_ascii=True).encode("utf-8")


# --- strategies -------------------------------------------------------------------------

DATES = (
    datetime(2024, 12, 15, 17, 32, 0, 965408, tzinfo=UTC),
    datetime(2000, 1, 23, 4, 56, 7, tzinfo=UTC),
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(2038, 1, 19, 3, 14, 8, tzinfo=UTC),
    datetime(1, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
)
NAMES = ("Cats", "Dogs", "", "  padded  ", "Ünïcødé — 😀🎉", "x" * 1024, "😀" * 1024, "名前")
names = st.one_of(st.sampled_from(NAMES), st.sampled_from(NAMES), ODD_TEXT)
user_ids = st.one_of(
    st.sampled_from(["u1", "u2", "user-😀"]), ODD_TEXT.filter(lambda s: bool(s.strip()))
)
moments = st.one_of(
    st.sampled_from(DATES),
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1)).map(
        lambda d: d.replace(tzinfo=UTC)
    ),
)
covers = st.one_of(
    st.none(),
    st.builds(
        Cover,
        st.sampled_from(["RESPONSE", "UPLOAD", "FUTURE_TYPE"]),
        st.sampled_from(["cov-1", "cov-2", "😀" * 255]),
        st.fixed_dictionaries(
            {}, optional={"collection_id": st.sampled_from(["A" * 22, "b-_" * 7 + "c"])}
        ),
    ),
)
# Each unknown key always holds one JSON type: `true` vs `1` under the same key is a known
# bug with its own test below (test_bool_replacing_int_is_a_change), not this property's.
extras = st.fixed_dictionaries(
    {},
    optional={
        "sharing": st.lists(
            st.fixed_dictionaries({"user": st.sampled_from(["x", "y"])}), max_size=2
        ),
        "flag": st.booleans(),
        "count": st.integers(-(10**20), 10**20),
        "note": st.one_of(st.none(), ODD_TEXT),
        "😀 odd.key$": st.sampled_from(["v1", "v2"]),
        "": st.just([]),
        "nested": st.sampled_from([{"a": {"b": [1, "x", None]}}, {"a": {}}]),
    },
)
contents = st.builds(Content, names, user_ids, moments, covers, extras)
# What an invalid record would have said but for its defect (its content is never stored).
BASE = Content("Base", "u1", DATES[0], Cover("RESPONSE", "cov-1", {}), {"note": "base"})
renders = st.builds(Render, st.sampled_from(TIME_STYLES), st.booleans())
FIELDS = {"name": names, "user_id": user_ids, "created": moments, "cover": covers, "extra": extras}


def draw_listing(data: st.DataObject, known: dict[str, Content]) -> list[Entry]:
    """One listing: per id absent, kept, edited, new or invalid; decoys; no-id rejects; shuffled."""
    entries: list[Entry] = []
    for dataset_id in IDS:
        action = data.draw(
            st.sampled_from(["absent", "absent", "keep", "keep", "edit", "new", "bad"])
        )
        old = known.get(dataset_id)
        if action == "absent":
            continue
        if action == "bad":
            defect = data.draw(st.sampled_from(sorted(WITH_ID_DEFECTS)))
            entries.append(BadWithId(dataset_id, defect, BASE, data.draw(renders)))
            continue
        if action == "keep" and old is not None:
            content = old  # returns a removed dataset as it was, or re-lists it unchanged
        elif action == "edit" and old is not None:
            name = data.draw(st.sampled_from(sorted(FIELDS)))
            content = replace(old, **{name: data.draw(FIELDS[name])})
        else:
            content = data.draw(contents)
        entries.append(Valid(dataset_id, content, data.draw(renders)))
    # Decoys: more occurrences of the same ids (valid or not); the order decides which is last.
    for dataset_id, ok in data.draw(
        st.lists(st.tuples(st.sampled_from(IDS), st.booleans()), max_size=2)
    ):
        if ok:
            entries.append(Valid(dataset_id, data.draw(contents), data.draw(renders)))
        else:
            defect = data.draw(st.sampled_from(sorted(WITH_ID_DEFECTS)))
            entries.append(BadWithId(dataset_id, defect, BASE, data.draw(renders)))
    no_ids = data.draw(
        st.one_of(
            st.just([]),
            st.just([]),
            st.lists(st.sampled_from(sorted(NO_ID_DEFECTS)), min_size=1, max_size=2),
        )
    )
    entries.extend(BadNoId(d, BASE, data.draw(renders)) for d in no_ids)
    return list(data.draw(st.permutations(entries)))


# --- the model --------------------------------------------------------------------------


@dataclass
class Expected:
    """What one sync must do, by the model."""

    seen: int
    inserted: set[str]
    updated: set[str]
    unchanged: set[str]
    deleted: set[str]
    rejected: int
    valid: dict[str, Stored]
    restored: set[str]
    protected: set[str]


class Model:
    """The datasets table as the rules say it must be: id -> (stored content, deleted)."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[Stored, bool]] = {}
        self.contents: dict[str, Content] = {}

    def sync(self, entries: list[Entry]) -> Expected:
        last: dict[str, Entry] = {}
        for entry in entries:
            if not isinstance(entry, BadNoId):
                last[entry.dataset_id] = entry
        valid = {i: e.content.stored() for i, e in last.items() if isinstance(e, Valid)}
        protected = {i for i, e in last.items() if isinstance(e, BadWithId)}
        complete = not any(isinstance(e, BadNoId) for e in entries)
        expected = Expected(
            seen=len(entries),
            inserted=set(),
            updated=set(),
            unchanged=set(),
            deleted=set(),
            rejected=sum(not isinstance(e, Valid) for e in entries),
            valid=valid,
            restored=set(),
            protected=protected & self.rows.keys(),
        )
        for dataset_id, stored in valid.items():
            old = self.rows.get(dataset_id)
            if old is None:
                expected.inserted.add(dataset_id)
            elif old[1] or old[0] != stored:
                expected.updated.add(dataset_id)
                if old[1]:
                    expected.restored.add(dataset_id)
            else:
                expected.unchanged.add(dataset_id)
            self.rows[dataset_id] = (stored, False)
            entry = last[dataset_id]
            assert isinstance(entry, Valid)
            self.contents[dataset_id] = entry.content
        if complete:
            for dataset_id, (stored, deleted) in list(self.rows.items()):
                if not deleted and dataset_id not in valid and dataset_id not in protected:
                    expected.deleted.add(dataset_id)
                    self.rows[dataset_id] = (stored, True)
        return expected

    def active(self) -> dict[str, Stored]:
        return {i: stored for i, (stored, deleted) in self.rows.items() if not deleted}


def describe(expected: Expected, entries: list[Entry]) -> list[str]:
    """Labels for `--hypothesis-show-statistics`: which situations the examples reached."""
    kinds = [
        name
        for name in ("inserted", "updated", "unchanged", "deleted", "restored", "protected")
        if getattr(expected, name)
    ]
    if any(isinstance(e, BadNoId) for e in entries):
        kinds.append("incomplete listing")
    ids = [e.dataset_id for e in entries if not isinstance(e, BadNoId)]
    if len(ids) != len(set(ids)):
        kinds.append("an id listed twice")
    return kinds


# --- reading the database ---------------------------------------------------------------


def stored_form(row: dict[str, Any]) -> Stored:
    return (
        row["name"],
        row["user_id"],
        row["creation_time"],
        row["cover_asset_type"],
        row["cover_asset_id"],
        canonical(row["extra"]),
    )


@dataclass
class Snapshot:
    datasets: dict[str, dict[str, Any]]
    history: list[dict[str, Any]]
    runs: dict[int, dict[str, Any]]


def snapshot(engine: Engine) -> Snapshot:
    with engine.connect() as conn:
        table = [dict(r._mapping) for r in conn.execute(sa.select(datasets))]
        history = conn.execute(sa.select(dataset_history).order_by(dataset_history.c.id))
        runs = conn.execute(sa.select(sync_runs).order_by(sync_runs.c.id))
        return Snapshot(
            datasets={r["dataset_id"]: r for r in table},
            history=[dict(r._mapping) for r in history],
            runs={r.id: dict(r._mapping) for r in runs},
        )


def active_at_time(history: list[dict[str, Any]], moment: datetime) -> dict[str, Stored]:
    current: dict[str, Stored] = {}
    for v in history:
        if v["valid_from"] <= moment and (v["valid_to"] is None or moment < v["valid_to"]):
            assert v["dataset_id"] not in current or v["change_type"] == "delete", (
                f"two versions of {v['dataset_id']} are current at {moment}"
            )
            if v["change_type"] != "delete":
                current[v["dataset_id"]] = stored_form(v)
    return current


def active_after_run(history: list[dict[str, Any]], run_id: int) -> dict[str, Stored]:
    newest: dict[str, dict[str, Any]] = {}
    for v in history:  # ordered by id: a later row of the same run supersedes an earlier one
        if v["sync_run_id"] <= run_id:
            newest[v["dataset_id"]] = v
    return {i: stored_form(v) for i, v in newest.items() if v["change_type"] != "delete"}


def check_history_shape(snap: Snapshot) -> None:
    """Per dataset: versions chain without gaps, change types make sense, the last is the row."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for v in snap.history:
        by_id.setdefault(v["dataset_id"], []).append(v)
    assert set(by_id) == set(snap.datasets)
    for dataset_id, versions in by_id.items():
        assert versions[0]["change_type"] == "insert"
        for before, after in itertools.pairwise(versions):
            assert before["valid_to"] == after["valid_from"]
            assert before["sync_run_id"] < after["sync_run_id"]
            wanted = {"restore"} if before["change_type"] == "delete" else {"update", "delete"}
            assert after["change_type"] in wanted, (dataset_id, before, after)
        last = versions[-1]
        row = snap.datasets[dataset_id]
        assert last["valid_to"] is None
        assert stored_form(last) == stored_form(row)
        assert (last["change_type"] == "delete") == (row["deleted_at"] is not None)
        for v in versions:
            run = snap.runs[v["sync_run_id"]]
            assert run["status"] == "success"
            assert run["started_at"] <= v["valid_from"] <= run["finished_at"]


# --- the test ---------------------------------------------------------------------------


def ticking_clock(start: datetime) -> Callable[[], datetime]:
    """A strictly increasing clock, one second a call, so no two stamps can ever tie.

    store.py stamps valid_from with the `now` given to apply(), which job.py takes before
    finish_run's; the next run's apply() comes later still. With a real clock that holds as
    long as the wall clock never steps back; this clock makes it certain.
    """
    ticks = itertools.count()
    return lambda: start + timedelta(seconds=next(ticks))


def fresh_schema(engine: Engine) -> None:
    """Drop everything (tables, views, the Alembic version) and migrate to head."""
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    migrate(engine)


def empty_tables(engine: Engine) -> None:
    """A fresh database for the next example: the same schema, no rows in any table.

    The `db_url` fixture's database lives across hypothesis examples. One engine serves them
    all: a failing example's traceback keeps its frames alive, and with an engine per example
    every kept frame held a whole engine (memory and time grew while shrinking).
    """
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())


def fast_sqlite(engine: Engine) -> None:
    """No fsync per commit on the test's SQLite file: durability is not under test here."""
    if engine.dialect.name == "sqlite":
        sa.event.listen(
            engine, "connect", lambda dbapi, _record: dbapi.execute("PRAGMA synchronous=OFF")
        )


def run_sync(engine: Engine, url: str, body: bytes, clock: Callable[[], datetime]) -> int:
    """One real sync of `body` for the default account; returns the run's id."""
    settings = Settings(database=DatabaseSettings(url=url))
    (outcome,) = sync_account(settings, settings.accounts[0], engine, body=body, clock=clock)
    assert outcome.result is not None, outcome.error
    return outcome.result.run_id


def without_hash(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "content_hash"}


def check_sync(
    before: Snapshot,
    after: Snapshot,
    run_id: int,
    expected: Expected,
    model: Model,
    body: bytes,
) -> None:
    run = after.runs[run_id]
    assert run["status"] == "success" and run["error"] is None
    # (c) the counts add up, and match the model.
    counts = (run["datasets_seen"], run["inserted"], run["updated"], run["unchanged"])
    assert counts == (
        expected.seen,
        len(expected.inserted),
        len(expected.updated),
        len(expected.unchanged),
    )
    assert run["inserted"] + run["updated"] + run["unchanged"] == len(expected.valid)
    assert (run["deleted"], run["rejected"]) == (len(expected.deleted), expected.rejected)
    newly_deleted = {
        i
        for i, r in after.datasets.items()
        if r["deleted_at"] is not None
        and (i not in before.datasets or before.datasets[i]["deleted_at"] is None)
    }
    assert newly_deleted == expected.deleted
    # (a) the table is what the model says: active rows are the listing's valid records
    # (complete listing) or those plus untouched ones (protected ids, incomplete listing).
    assert {i: stored_form(r) for i, r in after.datasets.items()} == {
        i: stored for i, (stored, _) in model.rows.items()
    }
    active = {i: stored_form(r) for i, r in after.datasets.items() if r["deleted_at"] is None}
    assert active == model.active()
    for dataset_id, stored in expected.valid.items():
        assert active[dataset_id] == stored
    touched = expected.inserted | expected.updated | expected.deleted
    for dataset_id, row in after.datasets.items():
        if dataset_id in touched:
            assert row["last_sync_run_id"] == run_id
            if dataset_id in before.datasets:
                assert row["first_seen_at"] == before.datasets[dataset_id]["first_seen_at"]
        elif dataset_id in expected.valid:
            # Unchanged: as it was, but for the hash of the record's text, which is the
            # listing's (refreshed when the same content came spelled differently).
            assert without_hash(row) == without_hash(before.datasets[dataset_id])
        else:  # protected by a reject, or kept by an incomplete listing: as it was
            assert row == before.datasets[dataset_id]
    # (b) the history has exactly one new version per touched dataset, from this run, and the
    # only change to older versions is closing the current one of each updated/deleted dataset.
    new_versions = after.history[len(before.history) :]
    assert sorted(v["dataset_id"] for v in new_versions) == sorted(touched)
    assert all(v["sync_run_id"] == run_id for v in new_versions)
    closed = set()
    for old, new in zip(before.history, after.history, strict=False):
        if old["valid_to"] is None and new["valid_to"] is not None:
            closed.add(old["dataset_id"])
            assert new == {**old, "valid_to": new["valid_to"]}
        else:
            assert new == old
    assert closed == expected.updated | expected.deleted
    check_history_shape(after)


def check_rerun(before: Snapshot, after: Snapshot, run_id: int, expected: Expected) -> None:
    """(d) The same listing again changes nothing but adds a run row."""
    run = after.runs[run_id]
    assert run["status"] == "success"
    assert (run["inserted"], run["updated"], run["deleted"]) == (0, 0, 0)
    assert (run["unchanged"], run["rejected"]) == (len(expected.valid), expected.rejected)
    assert after.datasets == before.datasets
    assert after.history == before.history


def test_random_listings_keep_table_history_and_counts_right(db_url: str) -> None:
    backend = make_url(db_url).get_backend_name()
    engine = make_engine(db_url)
    fast_sqlite(engine)
    fresh_schema(engine)

    @settings(
        max_examples=EXAMPLES[backend],
        deadline=None,
        database=None,
        # Shrink one failure, not each assertion line's separately: keeps a failure quick.
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data(), listings=st.integers(1, 4), ascii_only=st.booleans())
    def example(data: st.DataObject, listings: int, ascii_only: bool) -> None:
        empty_tables(engine)
        model = Model()
        clock = ticking_clock(datetime(2030, 1, 1, tzinfo=UTC))
        moments: list[tuple[int, datetime, dict[str, Stored]]] = []
        for _ in range(listings):
            entries = draw_listing(data, model.contents)
            body = body_of(entries, ascii_only)
            note(f"body: {body.decode()[:3000]}")
            before = snapshot(engine)
            expected = model.sync(entries)
            for kind in describe(expected, entries):
                event(kind)
            run_id = run_sync(engine, db_url, body, clock)
            after = snapshot(engine)
            check_sync(before, after, run_id, expected, model, body)
            moments.append((run_id, after.runs[run_id]["finished_at"], model.active()))

            again = after
            if data.draw(st.booleans(), label="sync the same body again"):
                rerun_id = run_sync(engine, db_url, body, clock)
                again = snapshot(engine)
                check_rerun(after, again, rerun_id, expected)
                moments.append((rerun_id, again.runs[rerun_id]["finished_at"], model.active()))

            # (b) the history rebuilds every listing so far, by time and by run id.
            for earlier_run, finished, active in moments:
                assert active_at_time(again.history, finished) == active
                assert active_after_run(again.history, earlier_run) == active

    try:
        example()
    finally:
        engine.dispose()


# --- regressions: counterexamples the properties found (fixed in 46383bc) -----------------


def _sync_bodies(db_url: str, bodies: list[list[dict[str, Any]]]) -> list[Snapshot]:
    engine = make_engine(db_url)
    clock = ticking_clock(datetime(2030, 1, 1, tzinfo=UTC))
    try:
        migrate(engine)
        shots = []
        for records in bodies:
            run_sync(engine, db_url, json.dumps({"datasets": records}).encode(), clock)
            shots.append(snapshot(engine))
        return shots
    finally:
        engine.dispose()


def _record_with(**extra: Any) -> dict[str, Any]:
    return {
        "dataset_id": "a",
        "name": "n",
        "user_id": "u",
        "creation_time": "2024-01-01T00:00:00Z",
        **extra,
    }


def test_bool_replacing_int_is_a_change(db_url: str) -> None:
    # Python's == says True == 1: rows are compared by a digest of the API's JSON instead.
    first, second = _sync_bodies(db_url, [[_record_with(flag=1)], [_record_with(flag=True)]])
    run = second.runs[max(second.runs)]
    assert canonical(second.datasets["a"]["extra"]) == canonical({"flag": True})
    assert run["updated"] == 1
    assert len(second.history) == len(first.history) + 1


def test_same_float_twice_is_unchanged(db_url: str) -> None:
    # Rows are compared by a digest of the API's JSON, not by what JSONB hands back
    # (it returns 1e23 as the integer 100000000000000000000000).
    first, second = _sync_bodies(db_url, [[_record_with(score=1e23)], [_record_with(score=1e23)]])
    run = second.runs[max(second.runs)]
    assert (run["updated"], run["unchanged"]) == (0, 1)
    assert second.history == first.history
    assert second.datasets == first.datasets
