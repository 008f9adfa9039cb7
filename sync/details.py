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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Connection, delete, insert, or_, select, true, update

from sync.models import Counts
from sync.records import InvalidRecord, Reject, record_hash
from sync.resource import Details

log = logging.getLogger(__name__)

MAX_KEPT_REJECTS = 20
# Keys per statement that reads or deletes by key.
BATCH_SIZE = 500


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
    fetched: Iterable[tuple[str, bytes | None]],
    run_id: int,
    now: datetime,
    checkpoint: Callable[[], None] | None = None,
) -> DetailsApplied:
    """Write each fetched (key, body, or None for a 404) over what `stored` had."""
    step = checkpoint or (lambda: None)
    listing = details.listing
    table = listing.table
    key_column = table.c[listing.key]
    result = DetailsApplied(Counts())
    seen = inserted = updated = rejected = 0
    same: list[str] = []
    for index, (key, body) in enumerate(fetched):
        seen += 1
        if body is None:
            result.missing.append(key)
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
        step()
        conn.execute(
            update(table)
            .where(key_column == key)
            .values(details_synced_at=now, details_hash=digest, **rows.values)
        )
        _replace_children(conn, details, key, account, rows.children, run_id)
        if stored.get(key) is None:
            inserted += 1
        else:
            updated += 1
    for start in range(0, len(same), BATCH_SIZE):
        step()
        conn.execute(
            update(table)
            .where(key_column.in_(same[start : start + BATCH_SIZE]))
            .values(details_synced_at=now)
        )
    result.counts = Counts(
        seen=seen, inserted=inserted, updated=updated, unchanged=len(same), rejected=rejected
    )
    return result


def _replace_children(
    conn: Connection,
    details: Details,
    key: str,
    account: str,
    children: Sequence[dict[str, object]],
    run_id: int,
) -> None:
    table = details.children
    parent = details.listing.key
    conn.execute(delete(table).where(table.c[parent] == key))
    if not children:
        return
    if parent not in table.primary_key.columns:
        # Children keyed on an id of their own (a training run): one listed under another
        # parent before moves here instead of colliding with its old row.
        (own_key,) = table.primary_key.columns
        ids = [child[own_key.name] for child in children]
        for start in range(0, len(ids), BATCH_SIZE):
            conn.execute(delete(table).where(own_key.in_(ids[start : start + BATCH_SIZE])))
    conn.execute(
        insert(table),
        [{**child, parent: key, "account": account, "sync_run_id": run_id} for child in children],
    )


def _why(exc: BaseException) -> str:
    if isinstance(exc, InvalidRecord):
        return str(exc)
    if isinstance(exc, RecursionError):
        return "the body is nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return f"the body is not valid JSON ({exc.reason})"
    return f"the body is not valid JSON ({str(exc)[:80]})"
