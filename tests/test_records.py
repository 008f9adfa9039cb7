"""The record parser: timestamps, validation, rejects, duplicates, unknown fields."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sync import records
from sync.errors import ResponseError
from sync.records import parse_record, parse_timestamp
from tests.fakeapi import dataset
from tests.listing import parse_listing

SPEC = Path(__file__).resolve().parents[2] / "shared" / "ideogram-api" / "openapi.json"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2000-01-23T04:56:07+00:00", datetime(2000, 1, 23, 4, 56, 7, tzinfo=UTC)),
        ("2000-01-23 04:56:07+00:00", datetime(2000, 1, 23, 4, 56, 7, tzinfo=UTC)),
        ("2024-12-15T17:32:00.965408+00:00", datetime(2024, 12, 15, 17, 32, 0, 965408, tzinfo=UTC)),
        ("2024-12-15T17:32:00Z", datetime(2024, 12, 15, 17, 32, tzinfo=UTC)),
        ("2024-12-15T17:32:00.5z", datetime(2024, 12, 15, 17, 32, 0, 500000, tzinfo=UTC)),
        ("2024-12-15T17:32:00", datetime(2024, 12, 15, 17, 32, tzinfo=UTC)),
        ("2024-12-15T19:32:00+02:00", datetime(2024, 12, 15, 17, 32, tzinfo=UTC)),
        ("2024-12-15T12:02:00-0530", datetime(2024, 12, 15, 17, 32, tzinfo=UTC)),
        ("2024-12-15T17:32:00.123456789Z", datetime(2024, 12, 15, 17, 32, 0, 123456, tzinfo=UTC)),
        ("2024-12-15 17:32Z", datetime(2024, 12, 15, 17, 32, tzinfo=UTC)),
    ],
)
def test_timestamps_become_aware_utc(text: str, expected: datetime) -> None:
    parsed = parse_timestamp(text)
    assert parsed == expected
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    ["", "yesterday", "2024-12-15", "2024-13-01T00:00:00Z", "2024-12-15T25:00:00Z", "1700000000"],
)
def test_bad_timestamps_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_timestamp(text)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (
            {"name": "n", "user_id": "u", "creation_time": "2024-01-01T00:00:00Z"},
            "dataset_id is missing",
        ),
        (dataset(""), "dataset_id is empty"),
        (dataset("  "), "dataset_id is empty"),
        (dataset(7), "dataset_id is a JSON number"),  # type: ignore[arg-type]
        ({**dataset("a"), "name": None}, "name is missing"),
        ({**dataset("a"), "name": ["x"]}, "name is a JSON array"),
        ({**dataset("a"), "user_id": ""}, "user_id is empty"),
        (dataset("a", created="soon"), "creation_time is not an ISO 8601"),
        ({**dataset("a"), "creation_time": 1700000000}, "creation_time is a JSON number"),
        (dataset("a", cover="RESPONSE"), "cover_asset_identifier is a JSON string"),  # type: ignore[arg-type]
        (dataset("a", cover={"asset_type": "UPLOAD"}), "cover.asset_id is missing"),
        (dataset("a", "x" * 2000), "name is 2000 characters long"),
        (dataset("a", "nul\x00byte"), "name contains a NUL"),
        (dataset("a", "\ud800"), "invalid Unicode"),
        ("just a string", "record is a JSON string"),
        (dataset("a", note="bad\x00"), "contains a NUL"),
    ],
)
def test_invalid_records_are_rejected_with_a_reason(record: object, reason: str) -> None:
    listing = parse_listing(json.dumps({"datasets": [record]}))
    assert listing.rows == {}
    (reject,) = listing.rejects
    assert reason in reject.reason


def test_unknown_fields_go_to_extra_and_empty_name_is_allowed() -> None:
    row = parse_record(
        dataset(
            "a",
            "",
            cover={"asset_type": "NEW_KIND", "asset_id": "x", "collection_id": "c" * 22},
            sharing=[],
            tags={"k": 1},
        )
    )
    assert row.name == ""
    assert row.cover_asset_type == "NEW_KIND"
    assert row.extra == {
        "sharing": [],
        "tags": {"k": 1},
        "cover_asset_identifier": {"collection_id": "c" * 22},
    }


def test_null_or_absent_cover() -> None:
    absent = dataset("a")
    del absent["cover_asset_identifier"]
    for record in (dataset("a", cover=None), absent):
        row = parse_record(record)
        assert (row.cover_asset_type, row.cover_asset_id, row.extra) == (None, None, None)


def test_duplicates_last_wins_and_rejected_last_protects() -> None:
    listing = parse_listing(
        json.dumps(
            {
                "datasets": [
                    dataset("a", "one"),
                    dataset("b"),
                    dataset("a", "two"),
                    dataset("b", created="bad"),
                ]
            }
        )
    )
    assert listing.seen == 4
    assert listing.rows["a"].name == "two"
    assert "b" not in listing.rows
    assert listing.protected_ids == {"b"}
    assert listing.duplicates == ["a"]
    assert listing.complete


def test_reject_without_id_makes_listing_incomplete() -> None:
    listing = parse_listing(json.dumps({"datasets": [dataset("a"), {"dataset_id": None}]}))
    assert not listing.complete


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not valid JSON"),
        (b"<html>", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[]", "JSON array"),
        (b"null", "JSON null"),
        (b'"datasets"', "JSON string"),
        (b'{"detail": "x"}', "no `datasets` field"),
        (b'{"datasets": null}', "is a null, not a list"),
        (b'{"datasets": 3}', "is a number, not a list"),
        (b"[" * 100_000, "nested too deeply"),
    ],
)
def test_unusable_bodies_raise(body: bytes, message: str) -> None:
    with pytest.raises(ResponseError, match=message.replace("`", ".")):
        parse_listing(body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"datasets": [{"name": "unterminated', "Unterminated string starting at character 23"),
        (b'{"datasets": [}', "Expecting value at character 14"),
    ],
)
def test_a_json_error_names_its_character_once(body: bytes, message: str) -> None:
    with pytest.raises(ResponseError) as raised:
        parse_listing(body)
    assert message in str(raised.value)
    assert " at at " not in str(raised.value)


def test_empty_listing_is_valid() -> None:
    listing = parse_listing(b'{"datasets": []}')
    assert listing.rows == {} and listing.seen == 0 and listing.complete


def test_every_example_in_the_spec_parses() -> None:
    if not SPEC.is_file():
        pytest.skip(f"{SPEC} is not beside this checkout")
    spec = json.loads(SPEC.read_text())
    schemas = spec["components"]["schemas"]
    listing = parse_listing(json.dumps(schemas["ListDatasetsResponse"]["example"]))
    assert listing.rejects == [] and listing.duplicates == ["dataset_id"]
    assert parse_record(schemas["Dataset"]["example"]).cover_asset_id == "7uS_VESkRI6O3-sVgHQp_A"


def test_shipped_example_parses() -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "datasets.json"
    listing = parse_listing(example.read_bytes())
    assert len(listing.rows) == 3 and listing.rejects == []


def test_the_record_hash_is_of_the_text_under_these_rules() -> None:
    text = '{"dataset_id": "a", "name": "Cats"}'
    digest = records.record_hash(text)
    assert digest.startswith(f"{records.HASH_VERSION}:") and len(digest) == 32
    assert records.record_hash(text) == digest
    assert records.record_hash(text.replace(": ", ":")) != digest  # the text, not the value
    assert records.record_hash('{"name": "\ud800"}') != records.record_hash('{"name": "\udc00"}')


def test_canonical_values_tell_json_types_apart() -> None:
    when = datetime(2024, 12, 15, 17, 32, tzinfo=UTC)
    row = ("Cats", "u", when, None, None, {"b": [1, 2], "a": True})
    same = records.canonical(row)
    # Key order of the unknown fields does not matter; the JSON types do.
    assert records.canonical((*row[:5], {"a": True, "b": [1, 2]})) == same
    assert records.canonical((*row[:5], {"a": 1, "b": [1, 2]})) != same
    assert records.canonical((*row[:5], {"a": True, "b": [1.0, 2]})) != same
    assert records.canonical((True,)) != records.canonical((1,)) != records.canonical((1.0,))
    # A time counts as the instant it is.
    later = datetime(2024, 12, 15, 17, 32, 0, 1, tzinfo=UTC)
    assert records.canonical((*row[:2], later, *row[3:])) != same
