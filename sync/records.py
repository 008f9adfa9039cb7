"""Turn a `GET /datasets` body into typed rows and rejects. Pure: no I/O."""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sync.jsonstream import ListingStream, json_type

# Column widths in sync/models.py; a longer value is rejected here rather than
# failing (or being silently truncated by) the database.
MAX_ID_LENGTH = 255
MAX_NAME_LENGTH = 1024
MAX_ASSET_TYPE_LENGTH = 64
MAX_EXTRA_DEPTH = 30

_KNOWN_FIELDS = frozenset(
    {"dataset_id", "name", "user_id", "creation_time", "cover_asset_identifier"}
)
_KNOWN_COVER_FIELDS = frozenset({"asset_type", "asset_id"})
# Date, `T` or space, time with optional seconds and fraction, optional `Z` or offset.
_TIMESTAMP = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}(?::\d{2})?)(?:[.,](\d+))?\s*([Zz]|[+-]\d{2}:?\d{2})?"
)
# The shape the API actually sends, which datetime.fromisoformat reads exactly as the
# general path would: checked first because it is most of every listing.
_CANONICAL_TIMESTAMP = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?(?:Z|[+-]\d\d:\d\d)", re.ASCII
)


class DatasetRow(NamedTuple):
    """One valid dataset, shaped like a row of the `datasets` table."""

    # A NamedTuple rather than a frozen dataclass: built once per new or changed record,
    # and a tuple is built several times faster.

    dataset_id: str
    name: str
    user_id: str
    creation_time: datetime
    cover_asset_type: str | None
    cover_asset_id: str | None
    extra: dict[str, Any] | None
    content_hash: str
    # creation_time.isoformat(), which the content hash already took: the stores write
    # their text from it (cheaper than formatting the aware datetime again).
    creation_iso: str


def content_hash(
    name: str,
    user_id: str,
    creation_time: datetime,
    cover_asset_type: str | None,
    cover_asset_id: str | None,
    extra: dict[str, Any] | None,
) -> str:
    """A digest of what the API says about a dataset, to tell changed rows from unchanged.

    Canonical JSON, so `true` differs from `1` and a number compares as the API sent it,
    not as a database's JSON type hands it back. migrations/versions/0005 holds a frozen
    copy; a test keeps the two equal.
    """
    return _content_digest(
        name, user_id, creation_time.isoformat(), cover_asset_type, cover_asset_id, extra
    )


def _content_digest(
    name: str,
    user_id: str,
    creation_iso: str,
    cover_asset_type: str | None,
    cover_asset_id: str | None,
    extra: dict[str, Any] | None = None,
) -> str:
    """content_hash, from the creation time as isoformat() spells it."""
    # repr() of a tuple of str/None is unambiguous and far cheaper than json.dumps;
    # JSON (sorted keys) is needed only for the free-form extra fields.
    canonical = repr((name, user_id, creation_iso, cover_asset_type, cover_asset_id))
    if extra is not None:
        canonical += json.dumps(extra, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(canonical.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class Reject:
    """A record that could not be used, with why."""

    index: int
    dataset_id: str | None
    reason: str


@dataclass
class Listing:
    """A parsed listing: the valid rows by id (last occurrence wins) and the rejects."""

    rows: dict[str, DatasetRow] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)
    seen: int = 0
    duplicates: list[str] = field(default_factory=list)

    @property
    def protected_ids(self) -> set[str]:
        """Ids of rejected records: their stored rows must be left exactly as they are."""
        return {r.dataset_id for r in self.rejects if r.dataset_id} - self.rows.keys()

    @property
    def complete(self) -> bool:
        """False when a reject had no usable id, so absence from the listing proves nothing."""
        return all(r.dataset_id for r in self.rejects)


class InvalidRecord(ValueError):
    """Raised inside the parser for one record; becomes a Reject."""


def parse_timestamp(value: str) -> datetime:
    """Parse an ISO 8601 date-time (`T` or space, optional fraction, `Z`/offset) to aware UTC."""
    parsed = _canonical_time(value)
    if parsed is not None:
        return parsed
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


def _canonical_time(value: str) -> datetime | None:
    """parse_timestamp of a time in the API's canonical spelling; None for any other spelling,
    or an invalid time (e.g. month 13: the general path words the error)."""
    if _CANONICAL_TIMESTAMP.fullmatch(value) is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is UTC else _to_utc(parsed, value)


def _to_utc(parsed: datetime, value: str) -> datetime:
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 falls before year 1 in UTC
        raise ValueError(f"out of range once converted to UTC: {_short(value)}") from None


def parse_listing(body: bytes | str) -> Listing:
    """Parse a whole response body into a Listing; raise ResponseError when it is unusable.

    Holds every row in memory: for tests and small bodies. The sync streams instead
    (store.apply over a ListingStream) with the same rules.
    """
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    stream = ListingStream(io.BytesIO(body))
    listing = Listing()
    for index, record in enumerate(stream):
        dataset_id = usable_id(record, stream.risky)
        try:
            row = parse_record(record, stream.risky)
        except InvalidRecord as exc:
            listing.rejects.append(Reject(index, dataset_id, str(exc)))
            if dataset_id is not None:
                # The last occurrence decides; a rejected one leaves the stored row alone.
                listing.rows.pop(dataset_id, None)
            continue
        if row.dataset_id in listing.rows:
            listing.duplicates.append(row.dataset_id)
        listing.rows[row.dataset_id] = row
    listing.seen = stream.seen
    return listing


def last_occurrences(stream: Iterable[Any]) -> dict[str, int]:
    """Index of the last record of each usable dataset_id: which occurrence decides."""
    last: dict[str, int] = {}
    for index, record in enumerate(stream):
        dataset_id = usable_id(record, True)
        if dataset_id is not None:
            last[dataset_id] = index
    return last


def parse_record(record: Any, check_text: bool = True) -> DatasetRow:
    """Validate one `Dataset` object and shape it as a row; raise InvalidRecord if unusable.

    `check_text=False` skips the NUL/surrogate checks, for callers that know there are none.
    """
    if not check_text:
        row = parse_usual(record)
        if row is not None:
            return row
    if not isinstance(record, dict):
        raise InvalidRecord(f"record is a JSON {json_type(record)}, not an object")
    dataset_id = _text(record, "dataset_id", MAX_ID_LENGTH, False, check_text)
    name = _text(record, "name", MAX_NAME_LENGTH, True, check_text)
    user_id = _text(record, "user_id", MAX_ID_LENGTH, False, check_text)
    raw_time = record.get("creation_time")
    if not isinstance(raw_time, str):
        raise InvalidRecord(_missing_or_type("creation_time", raw_time, "string"))
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
        cover_type = _text(cover, "asset_type", MAX_ASSET_TYPE_LENGTH, False, check_text, "cover.")
        cover_id = _text(cover, "asset_id", MAX_ID_LENGTH, False, check_text, "cover.")
        cover_extra = (
            None
            if len(cover) == len(_KNOWN_COVER_FIELDS)
            else {k: v for k, v in cover.items() if k not in _KNOWN_COVER_FIELDS}
        )
        if cover_extra:
            extra["cover_asset_identifier"] = cover_extra
    if extra:
        _check_extra(extra, check_text)
    iso = creation_time.isoformat()
    return DatasetRow(
        dataset_id=dataset_id,
        name=name,
        user_id=user_id,
        creation_time=creation_time,
        cover_asset_type=cover_type,
        cover_asset_id=cover_id,
        extra=extra or None,
        content_hash=_content_digest(name, user_id, iso, cover_type, cover_id, extra or None),
        creation_iso=iso,
    )


def parse_usual(record: Any) -> DatasetRow | None:
    """parse_record of a valid record in the API's usual shape, checked inline; else None.

    Most of every listing: the same rules as the general path, without its per-field
    calls. Anything unusual or invalid is left to the general path, which words errors.
    Skips the NUL/surrogate checks: only for text that cannot hold either (not `risky`).
    """
    fields = _usual_fields(record)
    if fields is None:
        return None
    dataset_id, name, user_id, raw_time, cover_type, cover_id = fields
    if (
        type(dataset_id) is not str
        or type(name) is not str
        or type(user_id) is not str
        or not 0 < len(dataset_id) <= MAX_ID_LENGTH
        or not 0 < len(user_id) <= MAX_ID_LENGTH
        or len(name) > MAX_NAME_LENGTH
        # strip() leaves nothing exactly when the text is all whitespace
        or dataset_id.isspace()
        or user_id.isspace()
    ):
        return None
    # The cover is null (both None) or two texts.
    if (
        cover_type is not None
        and cover_id is not None
        and (
            not 0 < len(cover_type) <= MAX_ASSET_TYPE_LENGTH
            or not 0 < len(cover_id) <= MAX_ID_LENGTH
            or cover_type.isspace()
            or cover_id.isspace()
        )
    ):
        return None
    # parse_timestamp's own first step (one regex match), and where they are equal the
    # API's spelling as the isoformat() the content hash takes (it costs more than the rest
    # of the hash): a canonical time ending in +00:00 is its own UTC isoformat(), except
    # that isoformat() drops a fraction of zero.
    try:
        creation_time = _canonical_time(raw_time)
    except ValueError:
        return None  # out of range once converted to UTC
    if creation_time is None:
        return None
    if raw_time.endswith("+00:00") and not raw_time.endswith(".000000+00:00"):
        iso = raw_time
    else:
        iso = creation_time.isoformat()
    digest = _content_digest(name, user_id, iso, cover_type, cover_id)
    return DatasetRow(
        dataset_id, name, user_id, creation_time, cover_type, cover_id, None, digest, iso
    )


def _text(
    obj: dict[str, Any],
    key: str,
    max_length: int,
    empty_ok: bool,
    check_text: bool,
    prefix: str = "",
) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise InvalidRecord(_missing_or_type(prefix + key, value, "string"))
    if not empty_ok and not value.strip():
        raise InvalidRecord(f"{prefix}{key} is empty")
    if len(value) > max_length:
        raise InvalidRecord(f"{prefix}{key} is {len(value)} characters long (at most {max_length})")
    if check_text:
        _check_storable(value, prefix + key)
    return value


def _check_storable(value: str, label: str) -> None:
    # PostgreSQL refuses NUL in text and every driver refuses lone surrogates
    # (JSON can carry both): reject the record rather than fail the whole run.
    if "\x00" in value:
        raise InvalidRecord(f"{label} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRecord(f"{label} contains invalid Unicode (a lone surrogate)") from None


def _check_extra(value: Any, check_text: bool, depth: int = 0) -> None:
    # Unknown fields are stored as JSON: every database must accept them, so no
    # NaN/Infinity (not JSON; PostgreSQL and MariaDB refuse them) and no nesting deeper
    # than MariaDB's JSON accepts (32 levels), which also keeps encoding them from
    # hitting Python's recursion limit.
    if depth > MAX_EXTRA_DEPTH:
        raise InvalidRecord(f"an unknown field is nested more than {MAX_EXTRA_DEPTH} levels deep")
    if isinstance(value, str):
        if check_text:
            _check_storable(value, "an unknown field")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRecord("an unknown field holds NaN or Infinity, which is not JSON")
    elif isinstance(value, dict):
        for k, v in value.items():
            if check_text:
                _check_storable(k, "an unknown field")
            _check_extra(v, check_text, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_extra(item, check_text, depth + 1)


def usable_id(record: Any, check_text: bool = True) -> str | None:
    """The record's dataset_id if it could key a row (even if the record is rejected), else None."""
    if not isinstance(record, dict):
        return None
    value = record.get("dataset_id")
    if isinstance(value, str) and value.strip() and len(value) <= MAX_ID_LENGTH:
        if check_text:
            try:
                _check_storable(value, "dataset_id")
            except InvalidRecord:
                return None
        return value
    return None


def quick_hash(record: Any) -> str | None:
    """content_hash of a record in the API's usual shape without validating it, else None.

    Only for comparing with a stored hash: equal means the record says exactly what an
    already validated and stored version said, so it needs no parsing. Unequal (or None)
    means nothing; the caller then parses the record in full.
    """
    fields = _usual_fields(record)
    if fields is None:
        return None
    _dataset_id, name, user_id, raw_time, cover_type, cover_id = fields
    # What parse_timestamp(...).isoformat() gives for the two UTC spellings; any other
    # spelling merely misses, and a string that is no valid time cannot match a valid one.
    iso = raw_time[:-1] + "+00:00" if raw_time.endswith("Z") else raw_time
    return _content_digest(name, user_id, iso, cover_type, cover_id)


def _usual_fields(record: Any) -> tuple[Any, Any, Any, str, str | None, str | None] | None:
    """(dataset_id, name, user_id, creation_time, cover type, cover id) of a record in the
    API's usual shape (its five fields, a text time, a cover of two texts or null), not
    checked any further; None for any other shape."""
    if type(record) is not dict or len(record) != 5:
        return None
    try:
        dataset_id = record["dataset_id"]
        name = record["name"]
        user_id = record["user_id"]
        raw_time = record["creation_time"]
        cover = record["cover_asset_identifier"]
    except KeyError:
        return None
    if type(raw_time) is not str:
        return None
    if cover is None:
        return dataset_id, name, user_id, raw_time, None, None
    if type(cover) is dict and len(cover) == 2:
        cover_type = cover.get("asset_type")
        cover_id = cover.get("asset_id")
        if type(cover_type) is str and type(cover_id) is str:
            return dataset_id, name, user_id, raw_time, cover_type, cover_id
    return None


def _missing_or_type(label: str, value: Any, wanted: str) -> str:
    if value is None:
        return f"{label} is missing or null"
    return f"{label} is a JSON {json_type(value)}, not a {wanted}"


def _short(text: str, limit: int = 80) -> str:
    text = repr(text) if not text.isprintable() else text
    return text if len(text) <= limit else text[: limit - 1] + "…"
