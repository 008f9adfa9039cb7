"""Apply fetched details (`GET /datasets/{id}`, `GET /models/{id}`) to their rows.

Two steps, for any `Details` description (sync/resource.py):

1. `due`: which of the account's active rows need their details fetched: never fetched,
   changed by a listing since they were, or fetched longer ago than `max_age`.
2. `apply`: for each body fetched, in the caller's transaction (it never commits): the same
   text as last time (by `records.record_hash`, which covers the parse rules' version) only
   refreshes `details_synced_at`; any other is parsed, its values go into the parent row and
   its child rows replace the ones stored. A 404 (the item vanished between the listing and
   its details) leaves the row as it is, for the next listing to settle.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Connection, bindparam, delete, insert, or_, select, true, update

from sync.detail_fetch import Failed, Fetched
from sync.models import Counts
from sync.records import InvalidRecord, Reject, record_hash
from sync.resource import DetailRows, Details

log = logging.getLogger(__name__)

MAX_KEPT_REJECTS = 20
# Keys per statement that reads or deletes by key.
BATCH_SIZE = 500
# Parsed child rows held before they are written.
MAX_PENDING_CHILDREN = 20_000


@dataclass
class DetailsApplied:
    """What apply did: the counts, the rejected bodies, and the keys that were gone (404)."""

    counts: Counts
    rejects: list[Reject] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def due(
    conn: Connection, details: Details, account: str, now: datetime, max_age_seconds: float
) -> dict[str, str | None]:
    """The keys whose details to fetch, each with the details hash stored for it (or None)."""
    table = details.listing.table
    key = table.c[details.listing.key]
    query = (
        select(key, table.c.details_hash)
        .where(
            table.c.account == account,
            table.c.deleted_at.is_(None),
            or_(
                table.c.details_synced_at.is_(None),
                # Changed (or restored) by a listing since its details were fetched.
                table.c.details_synced_at < table.c.updated_at,
                table.c.details_synced_at < now - timedelta(seconds=max_age_seconds),
            ),
        )
        .order_by(key)
    )
    if details.owned_column is not None:
        query = query.where(table.c[details.owned_column] == true())
    return {key: digest for key, digest in conn.execute(query)}


def apply(
    conn: Connection,
    details: Details,
    account: str,
    stored: dict[str, str | None],
    fetched: Iterable[tuple[str, Fetched]],
    run_id: int,
    now: datetime,
    checkpoint: Callable[[], None] | None = None,
) -> DetailsApplied:
    """Write each fetched (key, body) over what `stored` had. A None body (404: the item
    vanished) is left for the next listing; a Failed one is rejected, like an invalid body:
    both stay due."""
    step = checkpoint or (lambda: None)
    result = DetailsApplied(Counts())
    seen = inserted = rejected = 0
    same: list[str] = []
    changed: dict[str, tuple[str, DetailRows]] = {}
    children = 0
    for index, (key, body) in enumerate(fetched):
        seen += 1
        if body is None:
            result.missing.append(key)
            continue
        if isinstance(body, Failed):
            rejected += 1
            if len(result.rejects) < MAX_KEPT_REJECTS:
                result.rejects.append(Reject(index, key, body.reason))
            continue
        try:
            # Decoded as json.loads decodes bytes; the text is what is hashed.
            text = body.decode(json.detect_encoding(body), "surrogatepass")
            digest = record_hash(text)
            if stored.get(key) == digest:
                same.append(key)
                continue
            rows = details.parse(json.loads(text), key)
        except (InvalidRecord, ValueError, RecursionError) as exc:
            rejected += 1
            if len(result.rejects) < MAX_KEPT_REJECTS:
                result.rejects.append(Reject(index, key, _why(exc)))
            continue
        changed[key] = (digest, rows)
        children += len(rows.children)
        if stored.get(key) is None:
            inserted += 1
        # Bounded by keys and by child rows: a dataset may hold thousands of files.
        if len(changed) >= BATCH_SIZE or children >= MAX_PENDING_CHILDREN:
            step()
            _write(conn, details, account, changed, run_id, now)
            changed, children = {}, 0
    step()
    _write(conn, details, account, changed, run_id, now)
    key_column = details.listing.table.c[details.listing.key]
    for start in range(0, len(same), BATCH_SIZE):
        step()
        conn.execute(
            update(details.listing.table)
            .where(key_column.in_(same[start : start + BATCH_SIZE]))
            .values(details_synced_at=now)
        )
    updated = seen - len(result.missing) - len(same) - rejected - inserted
    result.counts = Counts(
        seen=seen, inserted=inserted, updated=updated, unchanged=len(same), rejected=rejected
    )
    return result


def _write(
    conn: Connection,
    details: Details,
    account: str,
    changed: dict[str, tuple[str, DetailRows]],
    run_id: int,
    now: datetime,
) -> None:
    """The changed details of a batch: their parent rows' values, and their children
    replaced whole."""
    if not changed:
        return
    listing, children = details.listing, details.children
    parent = listing.key
    names = list(next(iter(changed.values()))[1].values)
    conn.execute(
        update(listing.table)
        .where(listing.table.c[parent] == bindparam("b_key"))
        .values(
            details_synced_at=now,
            details_hash=bindparam("b_hash"),
            **{name: bindparam(f"b_{name}") for name in names},
        ),
        [
            {"b_key": key, "b_hash": digest, **{f"b_{n}": rows.values[n] for n in names}}
            for key, (digest, rows) in changed.items()
        ],
    )
    conn.execute(delete(children).where(children.c[parent].in_(list(changed))))
    new = [
        {**child, parent: key, "account": account, "sync_run_id": run_id}
        for key, (_, rows) in changed.items()
        for child in rows.children
    ]
    if not new:
        return
    if parent not in children.primary_key.columns:
        # Children keyed on an id of their own (a training run): one listed under another
        # parent before moves here instead of colliding with its old row.
        (own_key,) = children.primary_key.columns
        new = list({child[own_key.name]: child for child in new}.values())  # the last wins
        ids = [child[own_key.name] for child in new]
        for start in range(0, len(ids), BATCH_SIZE):
            conn.execute(delete(children).where(own_key.in_(ids[start : start + BATCH_SIZE])))
    conn.execute(insert(children), new)


def _why(exc: BaseException) -> str:
    if isinstance(exc, InvalidRecord):
        return str(exc)
    if isinstance(exc, RecursionError):
        return "the body is nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return f"the body is not valid JSON ({exc.reason})"
    return f"the body is not valid JSON ({str(exc)[:80]})"
