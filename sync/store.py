"""Apply a streamed listing to its table: diff by content hash, stage, merge, soft-delete, history.

One pipeline, the same on every backend, all in the caller's transaction (it never commits):

1. `_load`: the account's stored keys and content hashes, nothing else.
2. `_Diff`: each record's text is hashed; the stored hash means unchanged, anything else is
   parsed and compared with the stored columns; a new, changed or restored row goes to the
   stage table, a batch at a time, so memory holds keys and hashes, not rows. A key listed
   again replaces its earlier occurrence: the last one decides.
3. `_Stage.merge`: the stage goes into the table and its history, one chunk per statement.
4. `_soft_delete`: the account's active rows that the listing no longer holds.

What is stored where is described by a `Resource` (sync/resource.py); `records.DATASETS`
is the one for `datasets`.

`preview` is the same diff for a dry run: step 2 and the mass-delete guard, on a read
transaction, with the changes kept in memory (`_Preview`) instead of a stage table.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import attrgetter
from typing import Any, NamedTuple

from sqlalchemy import (
    Column,
    Connection,
    Integer,
    MetaData,
    String,
    Table,
    any_,
    bindparam,
    func,
    insert,
    literal,
    null,
    select,
    text,
    update,
)
from sqlalchemy.sql.dml import Insert

from sync.errors import MassDeleteRefused
from sync.jsonstream import ListingStream
from sync.models import (
    CHANGE_DELETE,
    CHANGE_INSERT,
    CHANGE_RESTORE,
    CHANGE_UPDATE,
    Counts,
    UTCDateTime,
)
from sync.records import InvalidRecord, Reject, canonical, record_hash
from sync.resource import Resource

log = logging.getLogger(__name__)

# Rows per insert into the stage, and stage rows per merge statement: few round trips,
# statements of bounded size on every backend.
FLUSH_ROWS = 1000
MERGE_ROWS = 5000
# Keys per IN list (every backend's parameter limits allow it).
BATCH_SIZE = 500
MAX_KEPT_REJECTS = 20
# What the diff remembers of each key it met; the last occurrence decides.
_STAGED, _SAME, _REJECTED = "staged", "same", "rejected"
_OUTCOMES = frozenset({_STAGED, _SAME, _REJECTED})


@dataclass
class Applied:
    """What apply did: the counts, plus what the log should say about the listing."""

    counts: Counts
    rejects: list[Reject]
    duplicates: list[str]
    complete: bool


@dataclass
class Preview:
    """What apply would do: the counts, the first keys of each kind of change, and the
    mass-delete guard's refusal (None: it would let the run through)."""

    counts: Counts
    restored: int
    keys: dict[str, list[str]]
    rejects: list[Reject]
    refused: MassDeleteRefused | None


def apply(
    conn: Connection,
    resource: Resource,
    account: str,
    records: ListingStream,
    run_id: int,
    now: datetime,
    max_delete_fraction: float | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> Applied:
    """Bring `resource`'s table (and its history) in line with the listing, writing only changes.

    `checkpoint` is called between batches: it raises to stop the run (the caller then
    rolls the transaction back).
    """
    step = checkpoint or _no_checkpoint
    stage = _Stage(conn, resource)
    diff = _Diff(conn, resource, account, stage, step)
    for record in records:
        diff.add(records.seen - 1, record, records.text())
    diff.flush()
    gone = diff.gone()
    staged = stage.counts()
    counts = Counts(
        seen=records.seen,
        inserted=staged.get(CHANGE_INSERT, 0),
        updated=staged.get(CHANGE_UPDATE, 0) + staged.get(CHANGE_RESTORE, 0),
        unchanged=diff.unchanged(),
        deleted=len(gone),
        rejected=diff.reject_count,
    )
    try:
        _guard_mass_delete(resource, account, len(gone), diff.active, max_delete_fraction)
    except MassDeleteRefused as exc:
        exc.counts = counts  # type: ignore[attr-defined]  # for the failed run's row
        raise
    stage.merge(run_id, now, step)
    _soft_delete(conn, resource, gone, run_id, now, step)
    stage.drop()
    return Applied(counts, diff.rejects, diff.duplicates, diff.complete)


def preview(
    conn: Connection,
    resource: Resource,
    account: str,
    records: ListingStream,
    max_delete_fraction: float | None = None,
    examples: int = 20,
) -> Preview:
    """What apply would do with the listing (up to `examples` keys of each kind); it only
    reads, so a read transaction will do, and it takes no lock."""
    changes = _Preview()
    diff = _Diff(conn, resource, account, changes, _no_checkpoint, dry_run=True)
    for record in records:
        diff.add(records.seen - 1, record, records.text())
    diff.flush()
    gone = diff.gone()
    staged = changes.counts()
    counts = Counts(
        seen=records.seen,
        inserted=staged.get(CHANGE_INSERT, 0),
        updated=staged.get(CHANGE_UPDATE, 0),
        unchanged=diff.unchanged(),
        deleted=len(gone),
        rejected=diff.reject_count,
    )
    keys = {kind: changes.first(kind, examples) for kind in _KINDS}
    keys[CHANGE_DELETE] = gone[:examples]
    keys["reject"] = [r.dataset_id or f"record #{r.index}" for r in diff.rejects][:examples]
    try:
        _guard_mass_delete(resource, account, len(gone), diff.active, max_delete_fraction)
        refused = None
    except MassDeleteRefused as exc:
        refused = exc
    restored = staged.get(CHANGE_RESTORE, 0)
    return Preview(counts, restored, keys, diff.rejects, refused)


_KINDS = (CHANGE_INSERT, CHANGE_UPDATE, CHANGE_RESTORE)


class _Preview:
    """A dry run's stage: the change each key would have, in memory; nothing is written."""

    def __init__(self) -> None:
        self.changes: dict[str, str] = {}

    def add(self, batch: dict[str, _Change]) -> None:
        """Note the batch's changes (a later occurrence of a key replaces its earlier one)."""
        for key, change in batch.items():
            self.changes[key] = change.change

    def remove(self, keys: Sequence[str]) -> None:
        """Forget changes that a later occurrence of their key decides instead."""
        for key in keys:
            self.changes.pop(key, None)

    def counts(self) -> dict[str, int]:
        """How many keys each kind of change has."""
        return dict(Counter(self.changes.values()))

    def first(self, kind: str, limit: int) -> list[str]:
        """The first `limit` keys (in listing order) with this kind of change."""
        return [key for key, change in self.changes.items() if change == kind][:limit]


class _Change(NamedTuple):
    """A row to stage: what it is, its hash, the kind of change, and whose row it is."""

    row: Any
    digest: str
    change: str
    owner: str


class _Diff:
    """The streaming diff: one record at a time against the stored keys and hashes."""

    def __init__(
        self,
        conn: Connection,
        resource: Resource,
        account: str,
        stage: _Stage | _Preview,
        step: Callable[[], None],
        dry_run: bool = False,
    ) -> None:
        self.conn = conn
        self.dry_run = dry_run
        self.resource = resource
        self.account = account
        self.stage = stage
        self.step = step
        self.values = attrgetter(*resource.columns)
        # Key -> its stored hash (active rows of this account), then, once met in the
        # listing, what became of it (_STAGED, _SAME or _REJECTED). One dict: a million
        # keys cost its memory once.
        self.state, self.deleted, self.shared = _load(conn, resource, account)
        self.active = len(self.state)
        self.pending: dict[str, _Change] = {}
        # Keys already in the stage that a later occurrence replaces or withdraws.
        self.unstage: list[str] = []
        self.rejects: list[Reject] = []
        self.reject_count = 0
        self.complete = True
        self.duplicates: list[str] = []

    def add(self, index: int, record: Any, text: str) -> None:
        """Diff one record (`text`: its JSON text): unchanged, staged as a change, or rejected."""
        key = self.resource.key_of(record)
        if key is None:
            self._reject(index, None, _why_invalid(self.resource, record))
            return
        old = self.state.get(key)
        if old in _OUTCOMES:
            old = self._met_again(key, old)
        digest = record_hash(text)
        if old == digest:
            # The text of the stored row, under the same rules: the same row.
            self.state[key] = _SAME
            return
        try:
            row = self.resource.parse(record)
        except InvalidRecord as exc:
            # Its stored row, if any, is left exactly as it is (and not soft-deleted).
            self.state[key] = _REJECTED
            self._reject(index, key, str(exc))
            return
        if key in self.deleted:
            change = CHANGE_RESTORE
        else:
            change = CHANGE_INSERT if old is None else CHANGE_UPDATE
        self.state[key] = _STAGED
        self.pending[key] = _Change(row, digest, change, self.account)
        if len(self.pending) >= FLUSH_ROWS:
            self.flush()

    def _met_again(self, key: str, earlier: str) -> str | None:
        """A key listed again: undo its earlier occurrence; return its stored hash."""
        if earlier != _REJECTED:
            self.duplicates.append(key)
        if earlier == _STAGED and self.pending.pop(key, None) is None:
            self.unstage.append(key)
        # Rare (the API does not repeat keys): the stored hash is read again.
        table = self.resource.table
        return self.conn.execute(
            select(table.c.content_hash).where(
                table.c[self.resource.key] == key,
                table.c.account == self.account,
                table.c.deleted_at.is_(None),
            )
        ).scalar()

    def flush(self) -> None:
        """Stage the pending changes (and withdraw replaced ones)."""
        self.step()
        if self.unstage:
            self.stage.remove(self.unstage)
            self.unstage = []
        batch, self.pending = self.pending, {}
        if self.shared:
            self._settle_shared(batch)
        self._confirm(batch)
        self.stage.add(batch)

    def _settle_shared(self, batch: dict[str, _Change]) -> None:
        """Decide keys new to this account against other accounts' rows (only their own
        rows were loaded): a row another account has stays with it; this run refreshes it.

        With an `owned_column` (models), ownership decides instead: the account that owns
        the item takes the row over, and one that only sees it shared leaves the owner's
        row alone (its `is_owned` would flip with every run of either account).
        """
        new = [key for key, change in batch.items() if change.change == CHANGE_INSERT]
        table = self.resource.table
        key_column = table.c[self.resource.key]
        owned = self.resource.owned_column
        stored_owned = table.c[owned] if owned else literal(False)
        for match in _matching(self.conn, key_column, new):
            found = self.conn.execute(
                select(
                    key_column,
                    table.c.account,
                    table.c.content_hash,
                    _is_deleted(table),
                    stored_owned,
                ).where(match, table.c.account != self.account)
            )
            for key, owner, digest, deleted, theirs in found:
                change = batch[key]
                ours = bool(getattr(change.row, owned)) if owned else False
                if deleted:
                    batch[key] = change._replace(change=CHANGE_RESTORE)
                elif theirs and not ours:
                    del batch[key]  # the owner's row: this account only sees it shared
                    self.state[key] = _SAME
                elif digest == change.digest:
                    del batch[key]
                    self.state[key] = _SAME
                elif ours and not theirs:
                    batch[key] = change._replace(change=CHANGE_UPDATE)  # taken over: ours now
                else:
                    batch[key] = change._replace(change=CHANGE_UPDATE, owner=owner)

    def _confirm(self, batch: dict[str, _Change]) -> None:
        """A new hash says only that the text differs: compare the columns themselves.

        The same columns (the API spaced its JSON otherwise, or the rules' version changed
        and mapped the record the same way): not a change, only the hash is updated.
        """
        updates = [key for key, change in batch.items() if change.change == CHANGE_UPDATE]
        table = self.resource.table
        key_column = table.c[self.resource.key]
        columns = [table.c[name] for name in self.resource.columns]
        for match in _matching(self.conn, key_column, updates):
            refreshed = []
            for key, *stored in self.conn.execute(select(key_column, *columns).where(match)):
                change = batch[key]
                if canonical(stored) == canonical(self.values(change.row)):
                    del batch[key]
                    self.state[key] = _SAME
                    refreshed.append({"b_key": key, "b_digest": change.digest})
            if refreshed and not self.dry_run:
                self.conn.execute(
                    update(table)
                    .where(key_column == bindparam("b_key"))
                    .values(content_hash=bindparam("b_digest")),
                    refreshed,
                )

    def _reject(self, index: int, key: str | None, reason: str) -> None:
        self.reject_count += 1
        if len(self.rejects) < MAX_KEPT_REJECTS:
            self.rejects.append(Reject(index, key, reason))
        if key is None:
            # A record without a usable key might be any of ours: deleting on its
            # absence could delete a row whose item still exists.
            self.complete = False

    def unchanged(self) -> int:
        """Keys whose last occurrence matched the stored row."""
        return sum(1 for outcome in self.state.values() if outcome == _SAME)

    def gone(self) -> list[str]:
        """The account's active keys the listing no longer holds (none if it is incomplete)."""
        gone = [key for key, value in self.state.items() if value not in _OUTCOMES]
        if not self.complete:
            if gone:
                log.warning(
                    "a rejected record had no usable %s, so this run soft-deletes nothing",
                    self.resource.key,
                )
            return []
        return sorted(gone)


def _why_invalid(resource: Resource, record: Any) -> str:
    try:
        resource.parse(record)
    except InvalidRecord as exc:
        return str(exc)
    return f"{resource.key} is not usable"


def _load(
    conn: Connection, resource: Resource, account: str
) -> tuple[dict[str, str], set[str], bool]:
    """This account's active keys -> content hash, its soft-deleted keys, and whether other
    accounts have rows too (see _Diff._settle_shared)."""
    table = resource.table
    key_column = table.c[resource.key]
    stored: dict[str, str] = {}
    deleted: set[str] = set()
    rows = conn.execute(
        select(key_column, table.c.content_hash, _is_deleted(table))
        .where(table.c.account == account)
        .execution_options(yield_per=10_000)  # a server-side cursor: bounded memory
    )
    for key, digest, is_deleted in rows:
        if is_deleted:
            deleted.add(key)
        else:
            stored[key] = digest or ""  # "" (no hash yet) matches nothing, and is stored
    # Two lookups at the ends of the account index (one SELECT of both would scan it).
    low, high = conn.execute(
        select(
            select(func.min(table.c.account)).scalar_subquery(),
            select(func.max(table.c.account)).scalar_subquery(),
        )
    ).one()
    shared = low is not None and (low != account or high != account)
    return stored, deleted, shared


def _is_deleted(table: Table) -> Any:
    return table.c.deleted_at.is_not(None)


def _guard_mass_delete(
    resource: Resource, account: str, deleting: int, active: int, fraction: float | None
) -> None:
    if fraction is None or not deleting:
        return
    if deleting / active > fraction:
        raise MassDeleteRefused(
            f"this listing would soft-delete {deleting} of {active} active {resource.noun}s of "
            f"account {account} ({deleting / active:.0%}, more than sync.max_delete_fraction = "
            f"{fraction:.0%}); nothing was changed. If the {resource.noun}s really are gone, "
            "run once with `ideogram-sync run --allow-mass-delete`"
        )


class _Stage:
    """The run's new, changed and restored rows, in a table of their own until merged.

    PostgreSQL and MariaDB/MySQL: a temporary table (PostgreSQL drops it with the
    transaction). SQLite: a table of the database itself, created and dropped inside the
    run's transaction (a temporary one would be held in memory: temp_store = MEMORY).
    """

    NAME = "ideogram_sync_stage"

    def __init__(self, conn: Connection, resource: Resource) -> None:
        self.conn = conn
        self.resource = resource
        table = resource.table
        dialect = conn.dialect.name
        options: dict[str, Any] = {}
        if dialect == "postgresql":
            options = {"prefixes": ["TEMPORARY"], "postgresql_on_commit": "DROP"}
        elif dialect in ("mysql", "mariadb"):
            # Compared with the table's keys: the same character set and collation.
            collation = conn.execute(
                text(
                    "SELECT TABLE_COLLATION FROM information_schema.TABLES "
                    "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :name"
                ),
                {"name": table.name},
            ).scalar()
            options = {"prefixes": ["TEMPORARY"], "mysql_charset": "utf8mb4"}
            if collation:
                options["mysql_collate"] = collation
            # A temporary table lives as long as the session, which the pool reuses.
            conn.exec_driver_sql(f"DROP TEMPORARY TABLE IF EXISTS {self.NAME}")
        self.table = Table(
            self.NAME,
            MetaData(),
            Column("seq", Integer, primary_key=True, autoincrement=False),
            Column(resource.key, table.c[resource.key].type),
            Column("account", String(255)),
            *[Column(name, table.c[name].type) for name in resource.columns],
            Column("content_hash", String(32)),
            Column("change_type", String(16)),
            **options,
        )
        self.table.create(conn)
        self.size = 0
        # Rows go to the driver as it takes them, each value through its column type's own
        # bind processor: what SQLAlchemy does per row, without building a dict of
        # parameters for each (that was most of a first sync's time in the stage).
        dialect = conn.dialect
        self.bind = [
            (index, process)
            for index, column in enumerate(self.table.columns)
            if (process := column.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        ]
        mark = "?" if dialect.paramstyle == "qmark" else "%s"
        names = ", ".join(column.name for column in self.table.columns)
        marks = ", ".join(mark for _ in self.table.columns)
        self.insert_sql = f"INSERT INTO {self.NAME} ({names}) VALUES ({marks})"

    def add(self, batch: dict[str, _Change]) -> None:
        """Stage `batch` (key -> change)."""
        values = attrgetter(*self.resource.columns)
        rows = []
        for key, change in batch.items():
            self.size += 1
            row = [self.size, key, change.owner, *values(change.row), change.digest, change.change]
            for index, process in self.bind:
                row[index] = process(row[index])
            rows.append(tuple(row))
        if rows:
            self.conn.exec_driver_sql(self.insert_sql, rows)

    def remove(self, keys: Sequence[str]) -> None:
        """Withdraw staged rows (a later occurrence of their key decides instead)."""
        key_column = self.table.c[self.resource.key]
        for match in _matching(self.conn, key_column, keys):
            self.conn.execute(self.table.delete().where(match))

    def counts(self) -> dict[str, int]:
        """How many staged rows each kind of change has."""
        change = self.table.c.change_type
        return dict(self.conn.execute(select(change, func.count()).group_by(change)).all())

    def merge(self, run_id: int, now: datetime, step: Callable[[], None]) -> None:
        """Write the staged rows into the table, and their versions into the history."""
        resource, stage = self.resource, self.table
        table, history = resource.table, resource.history
        key = resource.key
        when = literal(now, UTCDateTime())
        content = [stage.c[key], stage.c.account, *[stage.c[c] for c in resource.columns]]
        row_keys = [key, "account", *resource.columns]
        replacing = self.conn.execute(
            select(func.count()).select_from(stage).where(stage.c.change_type != CHANGE_INSERT)
        ).scalar()
        for low in range(0, self.size, MERGE_ROWS):
            step()
            chunk = (stage.c.seq > low) & (stage.c.seq <= low + MERGE_ROWS)
            if replacing:
                # Close the versions the new ones replace before adding those.
                replaced = select(stage.c[key]).where(chunk, stage.c.change_type != CHANGE_INSERT)
                self.conn.execute(
                    update(history)
                    .where(history.c[key].in_(replaced), history.c.valid_to.is_(None))
                    .values(valid_to=now)
                )
            rows = select(
                *content, when, when, null(), literal(run_id), stage.c.content_hash
            ).where(chunk)
            keys = [
                *row_keys,
                *("first_seen_at", "updated_at", "deleted_at", "last_sync_run_id", "content_hash"),
            ]
            self.conn.execute(
                _upsert(self.conn.dialect.name, table, key, keys).from_select(keys, rows)
            )
            versions = select(*content, when, null(), stage.c.change_type, literal(run_id))
            self.conn.execute(
                insert(history).from_select(_history_keys(resource), versions.where(chunk))
            )

    def drop(self) -> None:
        """Drop the stage (before the commit: it never outlives the transaction)."""
        if self.conn.dialect.name in ("mysql", "mariadb"):
            # Only DROP TEMPORARY TABLE leaves the transaction open (DROP TABLE commits it).
            self.conn.exec_driver_sql(f"DROP TEMPORARY TABLE IF EXISTS {self.NAME}")
        else:
            self.table.drop(self.conn)


def _history_keys(resource: Resource) -> list[str]:
    return [
        resource.key,
        "account",
        *resource.columns,
        "valid_from",
        "valid_to",
        "change_type",
        "sync_run_id",
    ]


def _upsert(dialect_name: str, table: Table, key: str, inserted: Sequence[str]) -> Insert:
    """INSERT … ON CONFLICT/ON DUPLICATE KEY UPDATE of the `inserted` columns but the key and
    first_seen_at, in the dialect (the row's other columns, its details, stay as they are)."""
    keep = {key, "first_seen_at"}
    columns = [name for name in inserted if name not in keep]
    # Dialect packages are imported only for the one in use (each costs start-up time).
    if dialect_name in ("mysql", "mariadb"):
        from sqlalchemy.dialects import mysql

        stmt = mysql.insert(table)
        return stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in columns})
    if dialect_name == "postgresql":
        from sqlalchemy.dialects import postgresql

        pg = postgresql.insert(table)
        return pg.on_conflict_do_update(
            index_elements=[table.c[key]], set_={c: pg.excluded[c] for c in columns}
        )
    if dialect_name == "sqlite":
        from sqlalchemy.dialects import sqlite

        lite = sqlite.insert(table)
        return lite.on_conflict_do_update(
            index_elements=[table.c[key]], set_={c: lite.excluded[c] for c in columns}
        )
    raise NotImplementedError(f"no upsert for the {dialect_name} dialect")


def _soft_delete(
    conn: Connection,
    resource: Resource,
    keys: Sequence[str],
    run_id: int,
    now: datetime,
    step: Callable[[], None],
) -> None:
    """Mark `keys` deleted, with a `delete` version carrying their content as last stored."""
    table, history = resource.table, resource.history
    key_column = table.c[resource.key]
    content = [key_column, table.c.account, *[table.c[c] for c in resource.columns]]
    when = literal(now, UTCDateTime())
    versions = select(*content, when, null(), literal(CHANGE_DELETE), literal(run_id))
    for match, old in zip(
        _matching(conn, key_column, keys),
        _matching(conn, history.c[resource.key], keys),
        strict=True,
    ):
        step()
        conn.execute(update(history).where(old, history.c.valid_to.is_(None)).values(valid_to=now))
        conn.execute(
            update(table)
            .where(match, table.c.deleted_at.is_(None))
            .values(deleted_at=now, updated_at=now, last_sync_run_id=run_id)
        )
        conn.execute(insert(history).from_select(_history_keys(resource), versions.where(match)))


def _matching(conn: Connection, column: Any, keys: Sequence[str]) -> Iterator[Any]:
    """`column` matching each batch of `keys`: IN lists of BATCH_SIZE, or one array on PostgreSQL.

    On PostgreSQL a table just bulk-loaded has no planner statistics, so each IN list was
    answered by a full scan (90 s for 100,000 ids); one `= ANY(array)` is one pass.
    """
    if not keys:
        return
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import ARRAY

        yield column == any_(bindparam("keys", list(keys), type_=ARRAY(String())))
        return
    for start in range(0, len(keys), BATCH_SIZE):
        yield column.in_(keys[start : start + BATCH_SIZE])


def _no_checkpoint() -> None:
    pass
