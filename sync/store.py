"""Apply a parsed listing: diff against stored rows, batched dialect upsert, soft-delete, history."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from operator import itemgetter
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    String,
    any_,
    bindparam,
    case,
    column,
    exists,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    table,
    true,
    update,
)
from sqlalchemy.schema import CreateIndex, DropIndex, Index
from sqlalchemy.sql.dml import Insert, UpdateBase

from sync.errors import MassDeleteRefused
from sync.jsonstream import DIGEST_LENGTH, KnownRun, record_digest
from sync.models import (
    CHANGE_DELETE,
    CHANGE_INSERT,
    CHANGE_RESTORE,
    CHANGE_UPDATE,
    Counts,
    UTCDateTime,
    dataset_history,
    datasets,
)
from sync.records import (
    DatasetRow,
    InvalidRecord,
    ListingStream,
    Reject,
    parse_record,
    parse_usual,
    quick_hash,
    usable_id,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Rows per upsert statement and ids per IN list: large enough to keep round trips
# few, small enough for every backend's parameter limits.
BATCH_SIZE = 500
# Changed rows held before they are written: bounds memory, and keeps statements few.
FLUSH_ROWS = 5000

CONTENT_COLUMNS = (
    "name",
    "user_id",
    "creation_time",
    "cover_asset_type",
    "cover_asset_id",
    "extra",
)
# Everything an upsert sets on an existing row; first_seen_at stays as first written.
_UPDATE_COLUMNS = (
    *CONTENT_COLUMNS,
    "content_hash",
    "record_digest",
    "account",
    "updated_at",
    "deleted_at",
    "last_sync_run_id",
)


@dataclass(frozen=True, slots=True)
class _Stored:
    account: str
    content_hash: str | None
    deleted: bool


# In the diff's memory, a stored row of this run's account that is active and has a
# hash is just a str: its content hash, then its record digest if it has one (most rows,
# held compactly; the stream recognises a record by the digest). Others are a _Stored.
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
    try:
        return _diff_all(diff, records, last, max_delete_fraction)
    except BaseException:
        # Nothing may run on the connection once the caller rolls it back.
        diff.writer.abort()
        raise
    finally:
        diff.writer.shutdown()


def _diff_all(
    diff: _Diff,
    records: ListingStream,
    last: dict[str, int] | None,
    max_delete_fraction: float | None,
) -> Applied:
    stored, seen, pending, account = diff.stored, diff.seen, diff.pending, diff.account
    records.expect(stored)
    unchanged = 0
    index = -1
    for record in records:
        index += 1
        if type(record) is KnownRun:
            # Stored records, recognised by their very text, one after the other: the
            # whole run at once when none of its ids came before (the usual case).
            ids = record.ids
            if last is None and seen.keys().isdisjoint(ids) and len(set(ids)) == len(ids):
                seen.update(zip(ids, map(stored.pop, ids), strict=True))
                unchanged += len(ids)
                index += len(ids) - 1
                continue
            for known in record:
                dataset_id = known.dataset_id
                if dataset_id not in seen and (last is None or last.get(dataset_id) == index):
                    seen[dataset_id] = stored.pop(dataset_id)
                    unchanged += 1
                else:
                    diff.add(
                        index, known.decode(), records.risky, partial(record_digest, known.text)
                    )
                index += 1
            index -= 1
            continue
        if type(record) is dict:
            dataset_id = record.get("dataset_id")
            if (
                type(dataset_id) is str
                and dataset_id not in seen
                and (last is None or last.get(dataset_id) == index)
            ):
                old = stored.get(dataset_id)
                if type(old) is str:
                    quick = quick_hash(record)
                    if quick is not None and old.startswith(quick):
                        del stored[dataset_id]
                        seen[dataset_id] = old
                        unchanged += 1
                        diff.keep_digest(dataset_id, old, records.digest())
                        continue
                elif old is None and not records.risky:
                    # A new dataset (all of a first sync) in the usual shape and valid.
                    row = parse_usual(record)
                    if row is not None:
                        seen[dataset_id] = None
                        pending[dataset_id] = (row, account, CHANGE_INSERT, records.digest())
                        diff.inserted += 1
                        if len(pending) >= FLUSH_ROWS:
                            diff.flush_pending()
                        continue
        diff.add(index, record, records.risky, records.digest)
    diff.unchanged += unchanged
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
        self.stored, self.active, self.shared = _load(conn, account)
        self.writer = _Writer(conn, run_id, now, step)
        # Ids met so far -> their stored value (None: new); _WRITTEN once flushed.
        self.seen: dict[str, _StoredValue | None] = {}
        self.pending: dict[str, tuple[DatasetRow, str, str, str | None]] = {}
        # id -> record digest, of unchanged rows whose stored digest is missing or stale.
        self.digests: dict[str, str | None] = {}
        self.rejected_ids: set[str] = set()
        self.rejects: list[Reject] = []
        self.reject_count = 0
        self.complete = True
        self.duplicates: list[str] = []
        self.inserted = self.updated = self.unchanged = 0

    def keep_digest(self, dataset_id: str, old: str, digest: str | None) -> None:
        """Note the record digest of an unchanged row when it is not the stored one."""
        if old[DIGEST_LENGTH:] != (digest or ""):
            # Not a change (no history, no updated_at): the next run can then recognise
            # the record without decoding it. After an upgrade, or when the API changed
            # how it lays out records.
            self.digests[dataset_id] = digest
            if len(self.digests) >= FLUSH_ROWS:
                self._flush_digests()

    def add(
        self, index: int, record: Any, check_text: bool, digest: Callable[[], str | None]
    ) -> None:
        """Diff one record the general way; `digest` gives its record digest when needed."""
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
        try:
            row = parse_record(record, check_text)
        except InvalidRecord as exc:
            self._count_reject(index, dataset_id, str(exc))
            self.rejected_ids.add(dataset_id)
            return
        decided = self._change(old, row)
        if decided is None:
            self.unchanged += 1
            if isinstance(old, str):
                self.keep_digest(dataset_id, old, digest())
            return
        change, owner = decided
        if change == CHANGE_INSERT:
            self.inserted += 1
        else:
            self.updated += 1
        self.pending[dataset_id] = (row, owner, change, digest())
        if len(self.pending) >= FLUSH_ROWS:
            self.flush_pending()

    def _change(self, old: _StoredValue | None, row: DatasetRow) -> tuple[str, str] | None:
        """What writing `row` over its stored value is, and the row's owner; None: unchanged."""
        if old is None:
            return CHANGE_INSERT, self.account
        stored = (
            old if isinstance(old, _Stored) else _Stored(self.account, old[:DIGEST_LENGTH], False)
        )
        if stored.deleted:
            return CHANGE_RESTORE, self.account
        if stored.content_hash == row.content_hash:
            return None
        # A dataset that another account lists too stays with the account that has it now
        # (no ping-pong between accounts); this run only refreshes it.
        return CHANGE_UPDATE, stored.account

    def _settle_shared(self) -> None:
        """Decide pending inserts whose ids another account's rows have, against those rows."""
        # Only this account's rows were loaded: with other accounts in the table, an id new
        # to this account may be theirs. Looked up once per batch, for its new ids only.
        if not self.shared:
            return
        new = [key for key, (_r, _o, change, _d) in self.pending.items() if change == CHANGE_INSERT]
        if not new:
            return
        self.writer.wait()  # the connection is the background writer's until then
        for dataset_id, old in _load_shared(self.conn, self.account, new, self.step):
            row, _owner, _change, digest = self.pending[dataset_id]
            self.inserted -= 1
            # What a repeat of this id later in the listing is diffed against (_forget).
            self.seen[dataset_id] = old
            decided = self._change(old, row)
            if decided is None:
                del self.pending[dataset_id]
                self.unchanged += 1
            else:
                change, owner = decided
                self.updated += 1
                self.pending[dataset_id] = (row, owner, change, digest)

    def flush_pending(self) -> None:
        """Write the pending rows while the listing is still being read."""
        self._flush(background=True)

    def _forget(self, dataset_id: str) -> _StoredValue | None:
        """Undo the earlier occurrence of a repeated id; return its stored value."""
        old = self.seen[dataset_id]
        if old is _WRITTEN:
            raise NeedsCarefulPass(dataset_id)
        if dataset_id in self.pending:
            _row, _owner, change, _digest = self.pending.pop(dataset_id)
            if change == CHANGE_INSERT:
                self.inserted -= 1
            else:
                self.updated -= 1
            self.duplicates.append(dataset_id)
        elif dataset_id in self.rejected_ids:
            self.rejected_ids.discard(dataset_id)
        else:
            # Its digest (if noted) was of the earlier text; this occurrence decides.
            self.digests.pop(dataset_id, None)
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

    def _flush(self, background: bool = False) -> None:
        self._settle_shared()
        if not self.pending:
            return
        self.step()
        batch = list(self.pending.values())
        written = dict.fromkeys(self.pending, _WRITTEN)
        self.pending.clear()
        self.writer.write(batch, background)
        self.seen.update(written)

    def _flush_digests(self) -> None:
        if self.digests:
            self.step()
            self.writer.wait()
            self.writer.set_digests([(digest, i) for i, digest in self.digests.items()])
            for dataset_id in self.digests:
                self.seen[dataset_id] = _WRITTEN
            self.digests.clear()

    def finish(self, seen: int, max_delete_fraction: float | None) -> Applied:
        self.writer.wait()  # a batch may be in the background with nothing pending after it
        self._flush()
        self._flush_digests()
        self.writer.restore_indexes()
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
        self.writer.close_versions(gone)
        _soft_delete(self.conn, gone, self.run_id, self.now, self.step)
        # A delete version records the content as it was (soft-deleting changes none of it).
        self.writer.add_versions(gone, CHANGE_DELETE)
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


def _load(conn: Connection, account: str) -> tuple[dict[str, _StoredValue], int, bool]:
    """This account's stored rows (id -> what the diff needs of it), its active count, and
    whether other accounts have rows too (see _Diff._settle_shared)."""
    # Only what the diff needs (no timestamps or JSON to convert), straight from the
    # driver's cursor. Most rows are this account's, active and hashed: those come as
    # (id, hash) pairs that dict.update takes in C. Other accounts' rows are not loaded:
    # each would cost every run of this account time and memory.
    mine = (
        (datasets.c.account == account)
        & datasets.c.deleted_at.is_(None)
        & datasets.c.content_hash.is_not(None)
    )
    stored: dict[str, _StoredValue] = {}
    # One str per row, hash then digest, built by the database: pairs for dict.update.
    value = datasets.c.content_hash + func.coalesce(datasets.c.record_digest, "")
    for rows in _fetch(conn, select(datasets.c.dataset_id, value).where(mine)):
        stored.update(rows)
    active = len(stored)
    # Two lookups at the ends of the account index (min and max in one SELECT scan it).
    low, high = conn.execute(
        select(
            select(func.min(datasets.c.account)).scalar_subquery(),
            select(func.max(datasets.c.account)).scalar_subquery(),
        )
    ).one()
    shared = low is not None and (low != account or high != account)
    # Alone in the table, the rest is this account's anyway; a scan finds it faster there
    # than the account index would (SQLite picks the index for `account = ?`).
    rest = ~mine & (datasets.c.account == account) if shared else ~mine
    for rows in _fetch(conn, _stored_rows(rest)):
        for dataset_id, owner, digest, deleted in rows:
            if not deleted:
                active += 1
            stored[dataset_id] = _Stored(owner, digest, bool(deleted))
    return stored, active, shared


def _stored_rows(where: ColumnElement[bool]) -> Select[Any]:
    """Id, owner, content hash and whether deleted, of the rows matching `where`."""
    return select(
        datasets.c.dataset_id,
        datasets.c.account,
        datasets.c.content_hash,
        datasets.c.deleted_at.is_not(None),
    ).where(where)


def _load_shared(
    conn: Connection, account: str, ids: Sequence[str], step: Callable[[], None]
) -> Iterator[tuple[str, _Stored]]:
    """The rows of other accounts among `ids`, as the diff holds them."""
    for match in _id_batches(conn, datasets.c.dataset_id, ids):
        step()
        rows = conn.execute(_stored_rows(match & (datasets.c.account != account)))
        for dataset_id, owner, digest, deleted in rows:
            yield dataset_id, _Stored(owner, digest, bool(deleted))


def _fetch(conn: Connection, query: Select[Any]) -> Iterator[list[Any]]:
    """The rows of `query` as plain driver tuples, a bounded number at a time."""
    compiled = query.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    params = compiled.positiontup and [compiled.params[name] for name in compiled.positiontup]
    # A server-side cursor where the driver has one: psycopg and PyMySQL would otherwise
    # hold the whole result in memory before the first row is read. (SQLAlchemy's
    # stream_results read through the raw cursor would miss the rows it buffers first.)
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    if conn.dialect.name == "postgresql":
        cursor = dbapi.cursor(name="ideogram_sync_load")  # type: ignore[call-arg]
    elif type(dbapi).__module__.startswith("pymysql"):
        from pymysql.cursors import SSCursor

        cursor = dbapi.cursor(SSCursor)  # type: ignore[call-arg]
    else:
        cursor = dbapi.cursor()
    try:
        cursor.execute(compiled.string, tuple(params) if params else compiled.params)
        while rows := cursor.fetchmany(20_000):
            yield rows
    finally:
        cursor.close()


def upsert_statement(dialect_name: str, columns: Sequence[str] = _UPDATE_COLUMNS) -> Insert:
    """INSERT … ON CONFLICT/ON DUPLICATE KEY UPDATE of `columns` of `datasets` in the dialect."""
    # Dialect packages are imported only for the one in use (each costs start-up time).
    if dialect_name in ("mysql", "mariadb"):
        from sqlalchemy.dialects import mysql

        stmt = mysql.insert(datasets)
        return stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in columns})
    if dialect_name == "postgresql":
        from sqlalchemy.dialects import postgresql

        pg = postgresql.insert(datasets)
        return pg.on_conflict_do_update(
            index_elements=[datasets.c.dataset_id],
            set_={c: pg.excluded[c] for c in columns},
        )
    if dialect_name == "sqlite":
        from sqlalchemy.dialects import sqlite

        lite = sqlite.insert(datasets)
        return lite.on_conflict_do_update(
            index_elements=[datasets.c.dataset_id],
            set_={c: lite.excluded[c] for c in columns},
        )
    raise NotImplementedError(f"no upsert for the {dialect_name} dialect")


def _no_checkpoint() -> None:
    pass


_DATASET_KEYS = (
    "dataset_id",
    "account",
    *CONTENT_COLUMNS,
    "first_seen_at",
    "updated_at",
    "deleted_at",
    "last_sync_run_id",
    "content_hash",
    "record_digest",
)
_HISTORY_KEYS = (
    "dataset_id",
    "account",
    *CONTENT_COLUMNS,
    "valid_from",
    "valid_to",
    "change_type",
    "sync_run_id",
)


class _Writer:
    """Writes batches of changed rows and their history versions, the fastest way per dialect.

    Rows go to the driver as tuples, converted once per row exactly as models.UTCDateTime
    and JSON would (SQLAlchemy's per-value processing dominated bulk writes). SQLite and
    PostgreSQL take a batch through a temporary stage table (`_Staged`); MariaDB/MySQL get
    an upsert, and history versions copied from the rows just written by `INSERT … SELECT`
    inside the database, so their content is not sent twice.
    """

    def __init__(
        self, conn: Connection, run_id: int, now: datetime, step: Callable[[], None]
    ) -> None:
        self.conn = conn
        self.run_id = run_id
        self.now = now
        self.step = step
        dialect = conn.dialect
        self.staged: _Staged | None = None
        if dialect.name in ("sqlite", "postgresql"):
            self.staged = _Staged(conn, run_id, now, step)
        else:
            self.upsert = _Compiled(conn, upsert_statement(dialect.name), _DATASET_KEYS)
            # The times every row of this run gets, as the driver takes them.
            self.now_value = _naive_utc(now)
        self.set_digest = _Compiled(
            conn,
            update(datasets)
            .where(datasets.c.dataset_id == bindparam("b_id"))
            .values(record_digest=bindparam("b_digest")),
            ("b_digest", "b_id"),
        )

    def set_digests(self, pairs: Sequence[tuple[str | None, str]]) -> None:
        """Set the record digest of rows whose content is unchanged: (digest, id) pairs."""
        self.set_digest.execute(pairs, self.step)

    def wait(self) -> None:
        """Wait for a batch still being written in the background; raise what it raised."""
        if self.staged is not None:
            self.staged.wait()

    def abort(self) -> None:
        """Let a batch being written in the background end, before the caller rolls back."""
        if self.staged is not None:
            self.staged.abort()

    def shutdown(self) -> None:
        """Release the background writer, if one was started."""
        if self.staged is not None:
            self.staged.shutdown()

    def restore_indexes(self) -> None:
        """Build the indexes a first load left out, once every row is written."""
        if self.staged is not None:
            self.staged.restore_indexes()

    def write(
        self, batch: Sequence[tuple[DatasetRow, str, str, str | None]], background: bool = False
    ) -> None:
        """Upsert the rows of `batch` and add a version of each, closing the one it replaces.

        `background`: the caller may go on reading while the database writes.
        """
        if self.staged is not None:
            replaced = [
                row.dataset_id for row, _owner, change, _d in batch if change != CHANGE_INSERT
            ]
            # One C call picks the row's values (most rows have no unknown fields to encode);
            # a tuple concatenation, because unpacking into a display measured twice as slow.
            pick = _STAGE_PICK
            staged = [
                pick(row) + (owner, digest, change)  # noqa: RUF005
                if row.extra is None
                else _staged_with_extra(row, owner, digest, change)
                for row, owner, change, digest in batch
            ]
            self.staged.write(staged, replaced, background)
            return
        now, run_id = self.now_value, self.run_id
        rows: list[tuple[Any, ...]] = []
        ids: dict[str, list[str]] = {CHANGE_INSERT: [], CHANGE_UPDATE: [], CHANGE_RESTORE: []}
        for row, owner, change, digest in batch:
            rows.append((*_content(row, owner), now, now, None, run_id, row.content_hash, digest))
            ids[change].append(row.dataset_id)
        self.upsert.execute(rows, self.step)
        self.close_versions(ids[CHANGE_UPDATE] + ids[CHANGE_RESTORE])
        for change, changed_ids in ids.items():
            self.add_versions(changed_ids, change)

    def close_versions(self, ids: Sequence[str]) -> None:
        """End the open history version of each of `ids` now."""
        _close_versions(self.conn, ids, self.now, self.step)

    def add_versions(self, ids: Sequence[str], change: str) -> None:
        """Add a history version of each of `ids`, copied from its row as stored now."""
        content = [datasets.c.dataset_id, datasets.c.account]
        content += [datasets.c[name] for name in CONTENT_COLUMNS]
        for match in _id_batches(self.conn, datasets.c.dataset_id, ids):
            self.step()
            rows = select(
                *content,
                literal(self.now, UTCDateTime()),
                null(),
                literal(change),
                literal(self.run_id),
            ).where(match)
            self.conn.execute(insert(dataset_history).from_select(_HISTORY_KEYS, rows))


# What a batch's stage table holds per row: the dataset's id, content and hash first (one
# itemgetter picks them from the DatasetRow), with the creation time as its isoformat()
# text and the unknown fields as JSON text, then the owner, the record digest and what the
# change is. Run id and times are the same for every row, so they go in the INSERT ... SELECT.
_STAGED_KEYS = (
    "dataset_id",
    *CONTENT_COLUMNS,
    "content_hash",
    "account",
    "record_digest",
    "change_type",
)
_STAGE_PICK = itemgetter(
    *(
        DatasetRow._fields.index("creation_iso" if key == "creation_time" else key)
        for key in _STAGED_KEYS[:8]
    )
)
_PG_STAGE_TYPES = {
    "creation_time": "TIMESTAMPTZ",
    "extra": "JSONB",
}


class _Staged:
    """SQLite and PostgreSQL write a batch through a temporary table.

    The batch goes into the stage table (SQLite: executemany into a table without indexes;
    PostgreSQL: COPY), then into `datasets` and its history by one INSERT ... SELECT each:
    cheaper than an upsert per row into the indexed table, and the history needs no id
    lookups, its versions come from the same staged rows. Those statements run inside the
    database, without the GIL: in the background (one worker thread, one batch at a time)
    they overlap with the reading of the next batch. The connection is never used by both
    threads at once: each write first waits for the one before.
    """

    def __init__(
        self, conn: Connection, run_id: int, now: datetime, step: Callable[[], None]
    ) -> None:
        self.conn = conn
        self.step = step
        self.postgres = conn.dialect.name == "postgresql"
        database = conn.engine.url.database or ""
        # SQLite: an in-memory database is one connection that only its own thread may use.
        self.can_background = self.postgres or (bool(database) and ":memory:" not in database)
        self.pool: ThreadPoolExecutor | None = None
        self.pending: Future[None] | None = None
        name = "ideogram_sync_stage"
        # PostgreSQL finds temporary tables first on any search_path; SQLite names them.
        schema = None if self.postgres else "temp"
        stage = table(name, *[column(k) for k in _STAGED_KEYS], schema=schema)
        if self.postgres:
            types = ", ".join(f"{k} {_PG_STAGE_TYPES.get(k, 'TEXT')}" for k in _STAGED_KEYS)
            # Dropped with the transaction, whatever ends it.
            conn.exec_driver_sql(f"CREATE TEMPORARY TABLE {name} ({types}) ON COMMIT DROP")
            self.fill_sql = f"COPY {name} ({', '.join(_STAGED_KEYS)}) FROM STDIN"
        else:
            # Untyped columns: SQLite keeps each value as the driver gave it (converted).
            conn.exec_driver_sql(
                f"CREATE TEMP TABLE IF NOT EXISTS {name} ({', '.join(_STAGED_KEYS)})"
            )
            marks = ", ".join("?" for _ in _STAGED_KEYS)
            self.fill_sql = f"INSERT INTO temp.{name} ({', '.join(_STAGED_KEYS)}) VALUES ({marks})"
        # PostgreSQL: TRUNCATE, or every batch would scan the dead rows of those before.
        self.clear_sql = f"TRUNCATE {name}" if self.postgres else f"DELETE FROM temp.{name}"
        conn.exec_driver_sql(self.clear_sql)
        when = literal(now, UTCDateTime())
        run = literal(run_id)
        # The stage holds the creation time as isoformat() text: PostgreSQL's TIMESTAMPTZ
        # column parses it, SQLite gets SQLAlchemy's DATETIME text cut from it in SQL.
        values = {k: stage.c[k] for k in _STAGED_KEYS}
        if not self.postgres:
            values["creation_time"] = sqlite_datetime(stage.c.creation_time)
        content = [values[k] for k in ("dataset_id", "account", *CONTENT_COLUMNS)]
        # In _DATASET_KEYS order: first_seen_at, updated_at, deleted_at, last_sync_run_id.
        rows = select(
            *content, when, when, null(), run, stage.c.content_hash, stage.c.record_digest
        )
        # SQLite needs a WHERE to tell the upsert's ON from a join's.
        self.upsert = upsert_statement(conn.dialect.name).from_select(
            _DATASET_KEYS, rows.where(true())
        )
        self.light: Insert | None = None
        if not self.postgres:
            # SQLite rewrites the entry of every index on a column that an UPDATE sets,
            # changed or not (about three times the cost of the row's own update).
            # PostgreSQL compares the values itself (a HOT update touches no index).
            # Where no row of the batch changes an indexed column, the upsert sets the
            # others only; `moved` finds a row that does.
            indexed = {column.name for index in datasets.indexes for column in index.columns}
            light = [name for name in _UPDATE_COLUMNS if name not in indexed]
            self.light = upsert_statement("sqlite", light).from_select(
                _DATASET_KEYS, rows.where(true())
            )
            joined = stage.join(datasets, datasets.c.dataset_id == stage.c.dataset_id)
            changes = [
                datasets.c[name].is_distinct_from(values[name])
                for name in sorted(indexed - {"deleted_at"})
            ]
            self.moved = (
                select(literal(1))
                .select_from(joined)
                .where(or_(datasets.c.deleted_at.is_not(None), *changes))
                .limit(1)
            )
        # A batch of new rows only (every batch of a first sync): the diff found their ids
        # absent under the write lock, so a plain insert cannot conflict, and it skips the
        # upsert's speculative insertion.
        self.insert = insert(datasets).from_select(_DATASET_KEYS, rows)
        versions = select(*content, when, null(), stage.c.change_type, run)
        self.versions = insert(dataset_history).from_select(_HISTORY_KEYS, versions)
        self.now = now
        # Decided at the first write: see _defer_indexes.
        self.may_defer = self.postgres
        self.deferred: list[Index] = []

    def write(
        self, rows: Sequence[tuple[Any, ...]], replaced: Sequence[str], background: bool
    ) -> None:
        """Stage `rows` (in _STAGED_KEYS order) and write them; `replaced`: ids not new."""
        self.wait()
        self.step()
        if self.may_defer:
            self.may_defer = False
            self._defer_indexes(rows, replaced)
        self.conn.exec_driver_sql(self.clear_sql)
        if self.postgres:
            cursor = self.conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            with cursor.copy(self.fill_sql) as copy:
                for values in rows:
                    copy.write_row(values)
        else:
            self.conn.exec_driver_sql(self.fill_sql, list(rows))
        self.step()
        if background and self.can_background:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(1, thread_name_prefix="sync-write")
            self.pending = self.pool.submit(self._merge, replaced)
        else:
            self._merge(replaced)

    def _defer_indexes(self, rows: Sequence[tuple[Any, ...]], replaced: Sequence[str]) -> None:
        # A first load into empty tables: build their secondary indexes once, after every
        # row is in, instead of updating each of them row by row (PostgreSQL's own advice
        # for populating a database): measured 3.1 s -> 1.9 s of database time per 100,000
        # new rows. Only where the first batch is a full one (small listings would pay the
        # DDL for nothing), only on PostgreSQL: its DDL is part of the transaction, so a run
        # that fails rolls the DROP back with everything else (MySQL commits DDL at once;
        # SQLite measured no gain). The primary keys stay: they are the upserts' conflict
        # targets. Until the run commits, readers of the two (empty) tables wait for it.
        if replaced or len(rows) < FLUSH_ROWS:
            return
        filled = [exists().select_from(t) for t in (datasets, dataset_history)]
        if self.conn.execute(select(or_(*filled))).scalar():
            return
        self.deferred = sorted(
            (*datasets.indexes, *dataset_history.indexes), key=lambda index: str(index.name)
        )
        log.debug("first load into empty tables: building %d indexes after it", len(self.deferred))
        for index in self.deferred:
            self.conn.execute(DropIndex(index))

    def restore_indexes(self) -> None:
        """Create the indexes _defer_indexes dropped (the caller waited for the last batch)."""
        deferred, self.deferred = self.deferred, []
        for index in deferred:
            self.step()
            self.conn.execute(CreateIndex(index))

    def _merge(self, replaced: Sequence[str]) -> None:
        if not replaced:
            self.conn.execute(self.insert)
        elif self.light is not None and self.conn.execute(self.moved).first() is None:
            self.conn.execute(self.light)
        else:
            self.conn.execute(self.upsert)
        # Close the versions the new ones replace before adding those.
        _close_versions(self.conn, replaced, self.now)
        self.conn.execute(self.versions)

    def wait(self) -> None:
        """Wait for the batch being written in the background; raise what it raised."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def abort(self) -> None:
        """Let the batch being written in the background end, whatever it raises.

        Not interrupted: it is one batch (at most FLUSH_ROWS rows) of a transaction that
        already holds the write lock, so it ends within moments, and a cancel request
        could land on the rollback that follows instead.
        """
        pending, self.pending = self.pending, None
        if pending is not None:
            wait_futures([pending])

    def shutdown(self) -> None:
        """Stop the worker thread (after abort or wait: it has nothing left to do)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


class _Compiled:
    """A statement compiled once for a fixed column order, run as executemany of tuples."""

    def __init__(self, conn: Connection, statement: UpdateBase, keys: Sequence[str]) -> None:
        self.conn = conn
        self.keys = tuple(keys)
        compiled = statement.compile(dialect=conn.dialect, column_keys=list(keys))
        self.sql = compiled.string
        self.positional = conn.dialect.paramstyle in ("qmark", "numeric", "format")
        order = tuple(compiled.positiontup or ()) if self.positional else self.keys
        # Positional SQL lists the columns in the table's order: map ours onto it.
        self.order = None if order == self.keys else [self.keys.index(k) for k in order]

    def execute(self, rows: Sequence[tuple[Any, ...]], step: Callable[[], None]) -> None:
        for batch in _batches(rows):
            step()
            params: list[Any]
            if not self.positional:
                params = [dict(zip(self.keys, values, strict=True)) for values in batch]
            elif self.order is not None:
                order = self.order
                params = [tuple(values[i] for i in order) for values in batch]
            else:
                params = list(batch)
            self.conn.exec_driver_sql(self.sql, params)


def _close_versions(
    conn: Connection, ids: Sequence[str], now: datetime, step: Callable[[], None] = _no_checkpoint
) -> None:
    """End the open history version of each of `ids` at `now`."""
    for match in _id_batches(conn, dataset_history.c.dataset_id, ids):
        step()
        conn.execute(
            update(dataset_history)
            .where(match, dataset_history.c.valid_to.is_(None))
            .values(valid_to=now)
        )


def _content(row: DatasetRow, owner: str) -> tuple[Any, ...]:
    """Id, account and content columns of `row` as MariaDB/MySQL's driver takes them."""
    return (
        row.dataset_id,
        owner,
        row.name,
        row.user_id,
        _naive_utc(row.creation_time),
        row.cover_asset_type,
        row.cover_asset_id,
        None if row.extra is None else json.dumps(row.extra),
    )


def _staged_with_extra(
    row: DatasetRow, owner: str, digest: str | None, change: str
) -> tuple[Any, ...]:
    """A stage row (_STAGED_KEYS order) of a row that has unknown fields, as JSON text."""
    return (*_STAGE_PICK(row)[:6], json.dumps(row.extra), row.content_hash, owner, digest, change)


def sqlite_datetime(iso: ColumnElement[Any]) -> ColumnElement[str]:
    """SQLAlchemy's SQLite DATETIME text of a UTC isoformat() text, cut apart in SQL.

    "YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00" (32 characters with the fraction, 25 without) ->
    "YYYY-MM-DD HH:MM:SS.ffffff", the format the column type's reads parse. Inside the
    database it runs in the writer's thread, without the GIL, instead of once per row in
    the thread that reads the listing.
    """

    def spaced(length: int) -> ColumnElement[str]:
        return func.replace(func.substr(iso, 1, length, type_=String), "T", " ", type_=String)

    return case(
        (func.length(iso) == 32, spaced(26)),
        else_=spaced(19).concat(".000000"),
    )


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None)


def _id_batches(
    conn: Connection, column: ColumnElement[str], ids: Sequence[str]
) -> Iterable[ColumnElement[bool]]:
    """`column` matching each batch of `ids`: IN lists of BATCH_SIZE, or one array on PostgreSQL.

    On PostgreSQL a table just bulk-loaded in this transaction has no planner statistics,
    so every batch's IN list would be answered by a full scan (minutes for 100,000 ids);
    one `= ANY(array)` is one pass, however the planner chooses.
    """
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import ARRAY

        if ids:
            yield column == any_(bindparam("ids", list(ids), type_=ARRAY(String())))
        return
    for batch in _batches(ids):
        yield column.in_(batch)


def _batches(items: Sequence[T], size: int = BATCH_SIZE) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _soft_delete(
    conn: Connection, ids: Sequence[str], run_id: int, now: datetime, step: Callable[[], None]
) -> None:
    for match in _id_batches(conn, datasets.c.dataset_id, ids):
        step()
        conn.execute(
            update(datasets)
            .where(match, datasets.c.deleted_at.is_(None))
            .values(deleted_at=now, updated_at=now, last_sync_run_id=run_id)
        )
