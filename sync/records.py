"""What a `GET /datasets` record means: its checks, the row it becomes, its content hash.

Pure: no I/O. `DATASETS` describes the listing to the sync engine (store.py), which streams
a body through these rules; tests/listing.py applies them to a whole body in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sync.jsonstream import json_type
from sync.models import dataset_history, datasets
from sync.resource import Resource

# Column widths in sync/models.py; a longer value is rejected here rather than
# failing (or being silently truncated by) the database.
MAX_ID_LENGTH = 255
MAX_NAME_LENGTH = 1024
MAX_ASSET_TYPE_LENGTH = 64
MAX_EXTRA_DEPTH = 30

# The version of the parse rules. Bump it whenever parse_record would make another row of
# some record (a new column, a fixed parse): a stored hash is of a record's text under these
# rules, so every record is then parsed again on the next run, and each row compared column
# by column (store.py). tests/test_parse_rules.py fails until it is bumped.
HASH_VERSION = "2"

_KNOWN_FIELDS = frozenset(
    {"dataset_id", "name", "user_id", "creation_time", "cover_asset_identifier"}
)
_KNOWN_COVER_FIELDS = frozenset({"asset_type", "asset_id"})
# Date, `T` or space, time with optional seconds and fraction, optional `Z` or offset.
_TIMESTAMP = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}(?::\d{2})?)(?:[.,](\d+))?\s*([Zz]|[+-]\d{2}:?\d{2})?"
)


class DatasetRow(NamedTuple):
    """One valid dataset: its key and content columns, as the `datasets` table holds them."""

    dataset_id: str
    name: str
    user_id: str
    creation_time: datetime
    cover_asset_type: str | None
    cover_asset_id: str | None
    extra: dict[str, Any] | None


CONTENT_COLUMNS = DatasetRow._fields[1:]


def record_hash(text: str) -> str:
    """HASH_VERSION and a digest of a record's JSON text, as the API spelled it: 32 characters.

    The same text under the same rules makes the same row: a record whose hash is stored
    needs no parsing. Any other hash says nothing about the columns (the API may only have
    spaced its JSON differently): the row is then compared with what is stored.
    """
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=15)
    return f"{HASH_VERSION}:{digest.hexdigest()}"


def canonical(values: Sequence[Any]) -> tuple[Any, ...]:
    """Content values in a form that compares exactly: `true` is not `1`, nor `1.0`.

    Times in ISO 8601, JSON values as JSON with sorted keys, numbers by repr.
    """
    return tuple(map(_canonical, values))


def _canonical(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if isinstance(value, bool | int | float):
        return repr(value)
    return value


@dataclass(frozen=True, slots=True)
class Reject:
    """A record that could not be used, with why."""

    index: int
    dataset_id: str | None
    reason: str


class InvalidRecord(ValueError):
    """Raised inside the parser for one record; becomes a Reject."""


def parse_timestamp(value: str) -> datetime:
    """Parse an ISO 8601 date-time (`T` or space, optional fraction, `Z`/offset) to aware UTC."""
    match = _TIMESTAMP.fullmatch(value.strip())
    if not match:
        raise ValueError(f"not an ISO 8601 date-time: {_short(value)}")
    day, clock, fraction, zone = match.groups()
    if clock.count(":") == 1:
        clock += ":00"
    text = f"{day}T{clock}"
    if fraction:
        # Python keeps microseconds; finer digits (nanoseconds) are dropped, not rounded.
        text += "." + fraction[:6].ljust(6, "0")
    if zone and zone not in ("Z", "z"):
        text += zone if ":" in zone else f"{zone[:3]}:{zone[3:]}"
    elif zone:
        text += "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a valid date-time: {_short(value)}") from None
    if parsed.tzinfo is None:
        # The API documents UTC; a time without an offset is read as UTC.
        return parsed.replace(tzinfo=UTC)
    return _to_utc(parsed, value)


def _to_utc(parsed: datetime, value: str) -> datetime:
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 falls before year 1 in UTC
        raise ValueError(f"out of range once converted to UTC: {_short(value)}") from None


def parse_record(record: Any) -> DatasetRow:
    """Validate one `Dataset` object and shape it as a row; raise InvalidRecord if unusable."""
    if not isinstance(record, dict):
        raise InvalidRecord(f"record is a JSON {json_type(record)}, not an object")
    dataset_id = text_field(record, "dataset_id", MAX_ID_LENGTH, False)
    name = text_field(record, "name", MAX_NAME_LENGTH, True)
    user_id = text_field(record, "user_id", MAX_ID_LENGTH, False)
    raw_time = record.get("creation_time")
    if not isinstance(raw_time, str):
        raise InvalidRecord(missing_or_type("creation_time", raw_time, "string"))
    try:
        creation_time = parse_timestamp(raw_time)
    except ValueError as exc:
        raise InvalidRecord(f"creation_time is {exc}") from None

    # Most records have exactly the known fields: skip building an empty dict the slow way.
    extra = (
        {}
        if len(record) == len(_KNOWN_FIELDS) and "cover_asset_identifier" in record
        else {k: v for k, v in record.items() if k not in _KNOWN_FIELDS}
    )
    cover_type = cover_id = None
    cover = record.get("cover_asset_identifier")
    if cover is not None:
        if not isinstance(cover, dict):
            raise InvalidRecord(
                f"cover_asset_identifier is a JSON {json_type(cover)}, not an object or null"
            )
        cover_type = text_field(cover, "asset_type", MAX_ASSET_TYPE_LENGTH, False, "cover.")
        cover_id = text_field(cover, "asset_id", MAX_ID_LENGTH, False, "cover.")
        cover_extra = (
            None
            if len(cover) == len(_KNOWN_COVER_FIELDS)
            else {k: v for k, v in cover.items() if k not in _KNOWN_COVER_FIELDS}
        )
        if cover_extra:
            extra["cover_asset_identifier"] = cover_extra
    if extra:
        check_extra(extra)
    return DatasetRow(dataset_id, name, user_id, creation_time, cover_type, cover_id, extra or None)


def text_field(
    obj: dict[str, Any], key: str, max_length: int, empty_ok: bool, prefix: str = ""
) -> str:
    """obj[key]: a string the databases can store, of at most `max_length`; else InvalidRecord."""
    value = obj.get(key)
    if not isinstance(value, str):
        raise InvalidRecord(missing_or_type(prefix + key, value, "string"))
    if not empty_ok and not value.strip():
        raise InvalidRecord(f"{prefix}{key} is empty")
    if len(value) > max_length:
        raise InvalidRecord(f"{prefix}{key} is {len(value)} characters long (at most {max_length})")
    check_storable(value, prefix + key)
    return value


def check_storable(value: str, label: str) -> None:
    """InvalidRecord for a string no database can store (NUL, lone surrogates)."""
    # PostgreSQL refuses NUL in text and every driver refuses lone surrogates
    # (JSON can carry both): reject the record rather than fail the whole run.
    if "\x00" in value:
        raise InvalidRecord(f"{label} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRecord(f"{label} contains invalid Unicode (a lone surrogate)") from None


def check_extra(value: Any, depth: int = 0) -> None:
    """InvalidRecord for unknown fields that some database's JSON column would refuse."""
    # Unknown fields are stored as JSON: every database must accept them, so no
    # NaN/Infinity (not JSON; PostgreSQL and MariaDB refuse them) and no nesting deeper
    # than MariaDB's JSON accepts (32 levels), which also keeps encoding them from
    # hitting Python's recursion limit.
    if depth > MAX_EXTRA_DEPTH:
        raise InvalidRecord(f"an unknown field is nested more than {MAX_EXTRA_DEPTH} levels deep")
    if isinstance(value, str):
        check_storable(value, "an unknown field")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRecord("an unknown field holds NaN or Infinity, which is not JSON")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_storable(k, "an unknown field")
            check_extra(v, depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_extra(item, depth + 1)


def dataset_key(record: Any) -> str | None:
    """The record's dataset_id if it could key a row (even if the record is rejected), else None."""
    return usable_key(record, "dataset_id")


def usable_key(record: Any, field: str) -> str | None:
    """record[field] if it could key a row (even if the record is rejected), else None."""
    if not isinstance(record, dict):
        return None
    value = record.get(field)
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID_LENGTH:
        return None
    try:
        check_storable(value, field)
    except InvalidRecord:
        return None
    return value


def missing_or_type(label: str, value: Any, wanted: str) -> str:
    """Why a required field is unusable: missing, null or of another JSON type."""
    if value is None:
        return f"{label} is missing or null"
    return f"{label} is a JSON {json_type(value)}, not a {wanted}"


def _short(text: str, limit: int = 80) -> str:
    text = repr(text) if not text.isprintable() else text
    return text if len(text) <= limit else text[: limit - 1] + "…"


DATASETS = Resource(
    name="datasets",
    noun="dataset",
    path="/datasets",
    listing_key="datasets",
    table=datasets,
    history=dataset_history,
    key="dataset_id",
    columns=CONTENT_COLUMNS,
    parse=parse_record,
    key_of=dataset_key,
)
