"""What the sync engine (store.py) needs to know of one keyed listing: a description, not code.

`datasets` is the first (records.DATASETS); another listing of the API becomes a new
description, its parse function and a migration, not a copy of the engine.
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

    noun: str  # one item, for messages: "dataset"
    table: Table
    history: Table
    key: str
    columns: tuple[str, ...]
    # A record -> a row with an attribute for the key and for each content column; raises
    # records.InvalidRecord, with the reason, for a record that cannot be stored.
    parse: Callable[[Any], Any]
    # A record's key if it could key a row (even when the record is invalid), else None.
    key_of: Callable[[Any], str | None]
