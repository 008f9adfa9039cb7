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
from sync.records import DatasetRow, Listing

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


def apply(
    conn: Connection,
    account: str,
    listing: Listing,
    run_id: int,
    now: datetime,
    max_delete_fraction: float | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> Counts:
    """Bring `datasets` (and its history) in line with `listing`, writing only what changed."""
    stored = _load(conn)
    changed: list[dict[str, Any]] = []
    versions: list[dict[str, Any]] = []
    superseded: list[str] = []
    inserted = updated = unchanged = 0
    for dataset_id, row in listing.rows.items():
        old = stored.get(dataset_id)
        # A dataset that another account lists too stays with the account that has
        # it now (no ping-pong between accounts); this run only refreshes its content.
        owner = old.account if old is not None and not old.deleted else account
        if old is None:
            inserted += 1
            change = CHANGE_INSERT
        elif old.deleted or old.content_hash != row.content_hash:
            updated += 1
            change = CHANGE_RESTORE if old.deleted else CHANGE_UPDATE
            superseded.append(dataset_id)
        else:
            unchanged += 1
            continue
        values = _values(row, owner, run_id, now)
        changed.append(values)
        versions.append(_version(values, change, run_id, now))

    gone = _gone(stored, account, listing)
    _guard_mass_delete(stored, account, len(gone), max_delete_fraction)
    # A delete version records the content as it was: read it for those rows only.
    for values in _load_content(conn, gone):
        versions.append(_version(values, CHANGE_DELETE, run_id, now))
    superseded.extend(gone)

    step = checkpoint or _no_checkpoint
    _upsert(conn, changed, step)
    _soft_delete(conn, gone, run_id, now, step)
    _write_history(conn, superseded, versions, now, step)
    return Counts(
        seen=listing.seen,
        inserted=inserted,
        updated=updated,
        unchanged=unchanged,
        deleted=len(gone),
        rejected=len(listing.rejects),
    )


def _guard_mass_delete(
    stored: dict[str, _Stored], account: str, deleting: int, fraction: float | None
) -> None:
    if fraction is None or not deleting:
        return
    active = sum(1 for old in stored.values() if old.account == account and not old.deleted)
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


def _gone(stored: dict[str, _Stored], account: str, listing: Listing) -> list[str]:
    if not listing.complete:
        # A record without a usable id might be any of ours: deleting on its
        # absence could delete a dataset that still exists.
        log.warning("a rejected record had no usable dataset_id, so this run soft-deletes nothing")
        return []
    protected = listing.protected_ids
    return sorted(
        dataset_id
        for dataset_id, old in stored.items()
        if old.account == account
        and not old.deleted
        and dataset_id not in listing.rows
        and dataset_id not in protected
    )


def _load(conn: Connection) -> dict[str, _Stored]:
    # The table is keyed on dataset_id alone, so a dataset another account saw is
    # still "this row": load every row once, but only what the diff needs (no
    # timestamps or JSON to convert).
    query = select(
        datasets.c.dataset_id,
        datasets.c.account,
        datasets.c.content_hash,
        datasets.c.deleted_at.is_not(None),
    )
    return {
        r[0]: _Stored(account=r[1], content_hash=r[2], deleted=bool(r[3]))
        for r in conn.execute(query)
    }


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
