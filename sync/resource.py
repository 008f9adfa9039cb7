"""What the engines need to know of each API listing and detail: descriptions, not code.

A keyed listing (`GET /datasets`, `GET /models`) is a `Resource`, applied by store.py; the
details of each of its rows (`GET /datasets/{id}`, `GET /models/{id}`) are a `Details`,
applied by details.py. Another endpoint becomes a new description, its parse function and
a migration, not a copy of an engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table


@dataclass(frozen=True)
class Resource:
    """A keyed listing and where it is kept.

    `table` holds one row per key: the key, `account`, the content `columns`, and the
    bookkeeping columns `first_seen_at`, `updated_at`, `deleted_at`, `last_sync_run_id` and
    `content_hash`. `history` holds every version: the key, `account`, the content columns,
    `valid_from`, `valid_to`, `change_type` and `sync_run_id`.
    """

    name: str  # sync_runs.resource and [sync] resources: "datasets"
    noun: str  # one item, for messages: "dataset"
    path: str  # the endpoint: "/datasets"
    listing_key: str  # the body's one top-level key, the array of items: "datasets"
    table: Table
    history: Table
    key: str
    columns: tuple[str, ...]
    # A record -> a row with an attribute for the key and for each content column; raises
    # records.InvalidRecord, with the reason, for a record that cannot be stored.
    parse: Callable[[Any], Any]
    # A record's key if it could key a row (even when the record is invalid), else None.
    key_of: Callable[[Any], str | None]
    # A boolean content column that says whether the listing's account owns the item
    # (models: is_owned). An item two accounts list belongs to the one that owns it; None:
    # to the one that listed it first.
    owned_column: str | None = None


@dataclass(frozen=True)
class DetailRows:
    """What one detail body says: values for the parent row's columns, and its child rows."""

    values: dict[str, Any]
    children: list[dict[str, Any]]


@dataclass(frozen=True)
class Details:
    """The details of each row of a listing: one request per row, children replaced whole.

    The parent row (`listing.table`) keeps `details_synced_at`, `details_hash` and
    `details_extra`, plus what `parse` puts in `DetailRows.values`; `children` holds the
    rows `parse` lists, each with the parent's key, `account` and `sync_run_id` added.
    """

    name: str  # sync_runs.resource and [sync] resources: "dataset_details"
    listing: Resource  # whose rows these detail
    path: str  # the endpoint, with {} for the key: "/datasets/{}"
    children: Table
    # The body (parsed JSON) and the key it was asked for -> DetailRows; raises
    # records.InvalidRecord for a body that cannot be stored.
    parse: Callable[[Any, str], DetailRows]
    # Only rows whose `owned_column` is true have details (models shared with the
    # account have no training runs); None: every row.
    owned_column: str | None = None
