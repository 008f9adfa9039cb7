"""Apply a parsed listing: diff against stored rows, batched dialect upsert, soft-delete, history."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.sql.dml import Insert

from sync.errors import MassDeleteRefused
from sync.models import (
    CHANGE_DELETE,
    CHANGE_INSERT,
    CHANGE_RESTORE,
    CHANGE_UPDATE,
    dataset_history,
    datasets,
)
from sync.records import (
    DatasetRow,
    InvalidRecord,
    ListingStream,
    Reject,
    parse_record,
    quick_hash,
    usable_id,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Rows per upsert statement and ids per IN list: large enough to keep round trips
# few, small enough for every backend's parameter limits.
BATCH_SIZE = 500

CONTENT_COLUMNS = (
    "name",
    "user_id",
    "creation_time",
    "cover_asset_type",
    "cover_asset_id",
    "extra",
)
_HISTORY_COLUMNS = ("dataset_id", "account", *CONTENT_COLUMNS)
# Everything an upsert sets on an existing row; first_seen_at stays as first written.
_UPDATE_COLUMNS = (
    *CONTENT_COLUMNS,
    "content_hash",
    "account",
    "updated_at",
    "deleted_at",
    "last_sync_run_id",
)


@dataclass(frozen=True)
class Counts:
    """What one sync did to the table."""

    seen: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    rejected: int = 0


@dataclass(frozen=True, slots=True)
class _Stored:
    account: str
    content_hash: str | None
    deleted: bool


# In the diff's memory, a stored row of this run's account that is active and has a
# hash is just its hash (a str): most rows, held compactly. Others are a _Stored.
_StoredValue = str | _Stored
# Marks an id whose row this run has already written (flushed).
_WRITTEN = _Stored("", None, False)
MAX_KEPT_REJECTS = 20


class NeedsCarefulPass(Exception):
    """A dataset_id came again after its earlier record was written: apply again with `last`."""


@dataclass
class Applied:
    """What apply did: the counts, plus what the log should say about the listing."""

    counts: Counts
    rejects: list[Reject]
    duplicates: list[str]
    complete: bool


def apply(
    conn: Connection,
    account: str,
    records: ListingStream,
    run_id: int,
    now: datetime,
    max_delete_fraction: float | None = None,
    checkpoint: Callable[[], None] | None = None,
    last: dict[str, int] | None = None,
) -> Applied:
    """Bring `datasets` (and its history) in line with the streamed listing, writing only changes.

    Rows are written in batches as the listing is read, all in the caller's transaction.
    Raises NeedsCarefulPass when a duplicate id makes that unsafe: roll back and call again
    with `last` = records.last_occurrences(...) of the same listing.
    """
    diff = _Diff(conn, account, run_id, now, checkpoint or _no_checkpoint, last)
    for index, record in enumerate(records):
        diff.add(index, record, records.risky)
    return diff.finish(records.seen, max_delete_fraction)


class _Diff:
    """The streaming diff: one record at a time against the stored ids and hashes."""

    def __init__(
        self,
        conn: Connection,
        account: str,
        run_id: int,
        now: datetime,
        step: Callable[[], None],
        last: dict[str, int] | None,
    ) -> None:
        self.conn = conn
        self.account = account
        self.run_id = run_id
        self.now = now
        self.step = step
        self.last = last
        self.stored, self.active = _load(conn, account)
        # Ids met so far -> their stored value (None: new); _WRITTEN once flushed.
        self.seen: dict[str, _StoredValue | None] = {}
        self.pending: dict[str, tuple[DatasetRow, str, str]] = {}
        self.rejected_ids: set[str] = set()
        self.rejects: list[Reject] = []
        self.reject_count = 0
        self.complete = True
        self.duplicates: list[str] = []
        self.inserted = self.updated = self.unchanged = 0

    def add(self, index: int, record: Any, check_text: bool) -> None:
        dataset_id = usable_id(record, check_text)
        if dataset_id is None:
            self._reject(index, None, record, check_text)
            return
        if self.last is not None and self.last[dataset_id] != index:
            # Careful pass: only the last occurrence of an id counts.
            if self._reject(index, dataset_id, record, check_text) is None:
                self.duplicates.append(dataset_id)
            return
        old = (
            self._forget(dataset_id)
            if dataset_id in self.seen
            else self.stored.pop(dataset_id, None)
        )
        self.seen[dataset_id] = old
        if type(old) is str and quick_hash(record) == old:
            self.unchanged += 1
            return
        try:
            row = parse_record(record, check_text)
        except InvalidRecord as exc:
            self._count_reject(index, dataset_id, str(exc))
            self.rejected_ids.add(dataset_id)
            return
        owner = self.account
        if old is None:
            change = CHANGE_INSERT
        else:
            stored = old if isinstance(old, _Stored) else _Stored(self.account, old, False)
            if stored.deleted:
                change = CHANGE_RESTORE
            elif stored.content_hash == row.content_hash:
                self.unchanged += 1
                return
            else:
                # A dataset that another account lists too stays with the account that
                # has it now (no ping-pong between accounts); this run only refreshes it.
                owner = stored.account
                change = CHANGE_UPDATE
        if change == CHANGE_INSERT:
            self.inserted += 1
        else:
            self.updated += 1
        self.pending[dataset_id] = (row, owner, change)
        if len(self.pending) >= BATCH_SIZE:
            self._flush()

    def _forget(self, dataset_id: str) -> _StoredValue | None:
        """Undo the earlier occurrence of a repeated id; return its stored value."""
        old = self.seen[dataset_id]
        if old is _WRITTEN:
            raise NeedsCarefulPass(dataset_id)
        if dataset_id in self.pending:
            _row, _owner, change = self.pending.pop(dataset_id)
            if change == CHANGE_INSERT:
                self.inserted -= 1
            else:
                self.updated -= 1
            self.duplicates.append(dataset_id)
        elif dataset_id in self.rejected_ids:
            self.rejected_ids.discard(dataset_id)
        else:
            self.unchanged -= 1
            self.duplicates.append(dataset_id)
        return old

    def _reject(
        self, index: int, dataset_id: str | None, record: Any, check_text: bool
    ) -> Reject | None:
        """Parse `record` only to say why it is rejected; None if it is valid after all."""
        try:
            parse_record(record, check_text)
        except InvalidRecord as exc:
            return self._count_reject(index, dataset_id, str(exc))
        return None

    def _count_reject(self, index: int, dataset_id: str | None, reason: str) -> Reject:
        reject = Reject(index, dataset_id, reason)
        self.reject_count += 1
        if len(self.rejects) < MAX_KEPT_REJECTS:
            self.rejects.append(reject)
        if dataset_id is None:
            # A record without a usable id might be any of ours: deleting on its
            # absence could delete a dataset that still exists.
            self.complete = False
        return reject

    def _flush(self) -> None:
        if not self.pending:
            return
        self.step()
        batch = list(self.pending.items())
        self.pending.clear()
        values = [_values(row, owner, self.run_id, self.now) for _id, (row, owner, _c) in batch]
        superseded = [
            dataset_id for dataset_id, (_r, _o, change) in batch if change != CHANGE_INSERT
        ]
        versions = [
            _version(v, change, self.run_id, self.now)
            for v, (_id, (_r, _o, change)) in zip(values, batch, strict=True)
        ]
        _upsert(self.conn, values, self.step)
        _write_history(self.conn, superseded, versions, self.now, self.step)
        for dataset_id, _entry in batch:
            self.seen[dataset_id] = _WRITTEN

    def finish(self, seen: int, max_delete_fraction: float | None) -> Applied:
        self._flush()
        gone: list[str] = []
        if self.complete:
            gone = sorted(
                dataset_id
                for dataset_id, old in self.stored.items()
                if type(old) is str or (old.account == self.account and not old.deleted)
            )
        elif self.stored:
            log.warning(
                "a rejected record had no usable dataset_id, so this run soft-deletes nothing"
            )
        counts = Counts(
            seen=seen,
            inserted=self.inserted,
            updated=self.updated,
            unchanged=self.unchanged,
            deleted=len(gone),
            rejected=self.reject_count,
        )
        try:
            _guard_mass_delete(self.account, len(gone), self.active, max_delete_fraction)
        except MassDeleteRefused as exc:
            exc.counts = counts  # type: ignore[attr-defined]  # for the failed run's row
            raise
        # A delete version records the content as it was: read it for those rows only.
        versions = [
            _version(values, CHANGE_DELETE, self.run_id, self.now)
            for values in _load_content(self.conn, gone)
        ]
        _soft_delete(self.conn, gone, self.run_id, self.now, self.step)
        _write_history(self.conn, gone, versions, self.now, self.step)
        return Applied(counts, self.rejects, self.duplicates, self.complete)


def _guard_mass_delete(account: str, deleting: int, active: int, fraction: float | None) -> None:
    if fraction is None or not deleting:
        return
    if deleting / active > fraction:
        raise MassDeleteRefused(
            f"this listing would soft-delete {deleting} of {active} active datasets of account "
            f"{account} ({deleting / active:.0%}, more than sync.max_delete_fraction = "
            f"{fraction:.0%}); nothing was changed. If the datasets really are gone, run once "
            "with `ideogram-sync run --allow-mass-delete`"
        )


def _version(values: dict[str, Any], change: str, run_id: int, now: datetime) -> dict[str, Any]:
    version = {c: values[c] for c in _HISTORY_COLUMNS}
    version.update(valid_from=now, valid_to=None, change_type=change, sync_run_id=run_id)
    return version


def _write_history(
    conn: Connection,
    superseded: Sequence[str],
    versions: Sequence[dict[str, Any]],
    now: datetime,
    step: Callable[[], None],
) -> None:
    # Close the current version of every row this run changed, then add the new ones.
    for batch in _batches(superseded):
        step()
        conn.execute(
            update(dataset_history)
            .where(dataset_history.c.dataset_id.in_(batch), dataset_history.c.valid_to.is_(None))
            .values(valid_to=now)
        )
    if versions:
        bulk_execute(conn, insert(dataset_history), versions, step)


def _load(conn: Connection, account: str) -> tuple[dict[str, _StoredValue], int]:
    """Every stored row's id and what the diff needs of it; and this account's active count."""
    # The table is keyed on dataset_id alone, so a dataset another account saw is
    # still "this row": load every row, but only what the diff needs (no timestamps or
    # JSON to convert), straight from the driver's cursor.
    query = select(
        datasets.c.dataset_id,
        datasets.c.account,
        datasets.c.content_hash,
        datasets.c.deleted_at.is_not(None),
    )
    compiled = query.compile(dialect=conn.dialect)
    stored: dict[str, _StoredValue] = {}
    active = 0
    cursor = conn.exec_driver_sql(compiled.string).cursor
    while rows := cursor.fetchmany(10_000):
        for dataset_id, owner, digest, deleted in rows:
            if owner == account and not deleted:
                active += 1
                if digest is not None:
                    stored[dataset_id] = digest
                    continue
            stored[dataset_id] = _Stored(owner, digest, bool(deleted))
    return stored, active


def _load_content(conn: Connection, ids: Sequence[str]) -> list[dict[str, Any]]:
    columns = [datasets.c.dataset_id, datasets.c.account]
    columns += [datasets.c[name] for name in CONTENT_COLUMNS]
    found: list[dict[str, Any]] = []
    for batch in _batches(ids):
        query = select(*columns).where(datasets.c.dataset_id.in_(batch))
        found.extend(dict(r._mapping) for r in conn.execute(query))
    return found


def _values(row: DatasetRow, account: str, run_id: int, now: datetime) -> dict[str, Any]:
    return {
        "dataset_id": row.dataset_id,
        "account": account,
        "name": row.name,
        "user_id": row.user_id,
        "creation_time": row.creation_time,
        "cover_asset_type": row.cover_asset_type,
        "cover_asset_id": row.cover_asset_id,
        "extra": row.extra,
        "content_hash": row.content_hash,
        "first_seen_at": now,
        "updated_at": now,
        "deleted_at": None,
        "last_sync_run_id": run_id,
    }


def upsert_statement(dialect_name: str) -> Insert:
    """INSERT … ON CONFLICT/ON DUPLICATE KEY UPDATE for `datasets` in the given dialect."""
    if dialect_name in ("mysql", "mariadb"):
        stmt = mysql.insert(datasets)
        return stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in _UPDATE_COLUMNS})
    if dialect_name == "postgresql":
        pg = postgresql.insert(datasets)
        return pg.on_conflict_do_update(
            index_elements=[datasets.c.dataset_id],
            set_={c: pg.excluded[c] for c in _UPDATE_COLUMNS},
        )
    if dialect_name == "sqlite":
        lite = sqlite.insert(datasets)
        return lite.on_conflict_do_update(
            index_elements=[datasets.c.dataset_id],
            set_={c: lite.excluded[c] for c in _UPDATE_COLUMNS},
        )
    raise NotImplementedError(f"no upsert for the {dialect_name} dialect")


def _no_checkpoint() -> None:
    pass


def _upsert(conn: Connection, rows: Sequence[dict[str, Any]], step: Callable[[], None]) -> None:
    if rows:
        bulk_execute(conn, upsert_statement(conn.dialect.name), rows, step)


_TIMESTAMPS = frozenset(
    {"creation_time", "first_seen_at", "updated_at", "deleted_at", "valid_from", "valid_to"}
)
_JSON = frozenset({"extra"})


def _sqlite_timestamp(value: datetime | None) -> str | None:
    # SQLAlchemy's SQLite DATETIME storage format, so its reads parse what we write.
    if value is None:
        return None
    value = value.astimezone(UTC)
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d} "
        f"{value.hour:02d}:{value.minute:02d}:{value.second:02d}.{value.microsecond:06d}"
    )


def _naive_utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC).replace(tzinfo=None)


def _aware_utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def bulk_execute(
    conn: Connection,
    statement: Insert,
    rows: Sequence[dict[str, Any]],
    step: Callable[[], None] = lambda: None,
) -> None:
    """executemany `statement` over `rows` in batches, converting values once per row.

    Same SQL and the same stored values as `conn.execute(statement, rows)` (models.UTCDateTime,
    JSON), but without SQLAlchemy's per-value type processing, which dominated bulk writes.
    """
    dialect = conn.dialect
    keys = list(rows[0])
    compiled = statement.compile(dialect=dialect, column_keys=keys)
    if dialect.name == "sqlite":
        raw = _sqlite_timestamp
    elif dialect.name in ("mysql", "mariadb"):
        raw = _naive_utc
    else:
        raw = _aware_utc
    # The bookkeeping timestamps of a run are all the same `now` (or None): convert
    # each value once. creation_time differs per row and is converted directly.
    seen: dict[datetime | None, Any] = {}

    def to_timestamp(value: datetime | None) -> Any:
        try:
            return seen[value]
        except KeyError:
            converted = seen[value] = raw(value)
            return converted

    convert: dict[str, Callable[[Any], Any]] = {k: to_timestamp for k in keys if k in _TIMESTAMPS}
    if "creation_time" in convert:
        convert["creation_time"] = raw
    convert.update({k: _json for k in keys if k in _JSON})
    positional = dialect.paramstyle in ("qmark", "numeric", "format")
    order = list(compiled.positiontup or []) if positional else keys
    getters = [(name, convert.get(name)) for name in order]
    for batch in _batches(rows):
        step()
        if positional:
            params: list[Any] = [
                tuple(f(row[k]) if f else row[k] for k, f in getters) for row in batch
            ]
        else:
            params = [{k: f(row[k]) if f else row[k] for k, f in getters} for row in batch]
        conn.exec_driver_sql(compiled.string, params)


def _soft_delete(
    conn: Connection, ids: Sequence[str], run_id: int, now: datetime, step: Callable[[], None]
) -> None:
    for batch in _batches(ids):
        step()
        conn.execute(
            update(datasets)
            .where(datasets.c.dataset_id.in_(batch), datasets.c.deleted_at.is_(None))
            .values(deleted_at=now, updated_at=now, last_sync_run_id=run_id)
        )


def _batches(items: Sequence[T], size: int = BATCH_SIZE) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
