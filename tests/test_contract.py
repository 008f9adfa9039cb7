"""Contract tests: Ideogram's own OpenAPI schemas against the spec's examples, our fixtures
and our parser.

Two contracts are checked:
- `spec`: components/schemas of the mirrored openapi.json (OpenAPI 3.0.2) exactly, with
  `format: date-time` checked as RFC 3339 (`T` between date and time);
- `current`: the same plus what /work/shared/ideogram-api/README.md documents of the newer
  revision and of real responses: `cover_asset_identifier` may be null, AssetIdentifier
  may carry `collection_id`, and `creation_time` may have a space instead of `T`.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft7Validator, FormatChecker

from sync.records import parse_timestamp
from tests.fakeapi import FakeApi, dataset, synthetic
from tests.listing import parse_listing

SHARED = Path(__file__).resolve().parents[2] / "shared"
API_DIR = SHARED / "ideogram-api"
SPEC_FILE = API_DIR / "openapi.json"
PAGE_FILE = API_DIR / "list-datasets-reference-page.txt"
EXAMPLE_FILE = Path(__file__).resolve().parents[1] / "examples" / "datasets.json"

pytestmark = pytest.mark.skipif(
    not SPEC_FILE.is_file(),
    reason=f"the Ideogram API contract is not there: {SPEC_FILE} is missing (it lives in "
    "shared/ideogram-api/ beside the checkout)",
)

SCHEMAS = ("ListDatasetsResponse", "Dataset", "AssetIdentifier")
# RFC 3339 date-time; the README notes real responses may put a space for the `T`.
_RFC3339 = r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})"
_OBSERVED = _RFC3339.replace("[Tt]", "[Tt ]")


def _date_time_checker(pattern: str) -> FormatChecker:
    checker = FormatChecker(formats=())
    compiled = re.compile(pattern)

    @checker.checks("date-time", raises=ValueError)
    def is_date_time(value: object) -> bool:
        if not isinstance(value, str):
            return True  # `type` judges non-strings
        if not compiled.fullmatch(value):
            return False
        datetime.fromisoformat(value[:10])  # a real calendar date, or ValueError
        return True

    return checker


@cache
def spec() -> dict[str, Any]:
    return json.loads(SPEC_FILE.read_text(encoding="utf-8"))


def _openapi_nullable(schema: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` as JSON Schema: add "null" to the type (or enum)."""
    if isinstance(schema, list):
        return [_openapi_nullable(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _openapi_nullable(v) for k, v in schema.items()}
    if out.pop("nullable", False) is True:
        if "$ref" in out:
            return {"anyOf": [{"$ref": out.pop("$ref")}, {"type": "null"}], **out}
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    return out


def _current_revision(components: dict[str, Any]) -> dict[str, Any]:
    """The newer revision, as the README documents it."""
    schemas = components["schemas"]
    schemas["Dataset"]["properties"]["cover_asset_identifier"] = {
        "anyOf": [{"$ref": "#/components/schemas/AssetIdentifier"}, {"type": "null"}]
    }
    schemas["AssetIdentifier"]["properties"]["collection_id"] = {
        "type": "string",
        "pattern": "^[A-Za-z0-9_-]{22}$",
    }
    return components


@cache
def validator(name: str, contract: str = "current") -> Draft7Validator:
    """A validator of components/schemas/`name`, its `$ref`s resolved inside the spec."""
    components = _openapi_nullable(copy.deepcopy(spec()["components"]))
    if contract == "current":
        components = _current_revision(components)
    schema = {"$ref": f"#/components/schemas/{name}", "components": components}
    Draft7Validator.check_schema(components["schemas"][name])
    pattern = _OBSERVED if contract == "current" else _RFC3339
    return Draft7Validator(schema, format_checker=_date_time_checker(pattern))


def errors(instance: Any, name: str, contract: str = "current") -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in validator(name, contract).iter_errors(instance)
    ]


def spec_examples(name: str) -> list[Any]:
    """The schema's `example` and `examples`, and those of the /datasets 200 response."""
    schema = spec()["components"]["schemas"][name]
    found = [schema["example"]] if "example" in schema else []
    found += list(schema.get("examples", []))
    if name == "ListDatasetsResponse":
        media = spec()["paths"]["/datasets"]["get"]["responses"]["200"]["content"]
        for body in media.values():
            if "example" in body:
                found.append(body["example"])
            found += [e["value"] for e in body.get("examples", {}).values() if "value" in e]
    return found


def page_example() -> dict[str, Any]:
    """The response shown on the rendered reference page (numbered lines `1{` .. `24}`)."""
    lines = PAGE_FILE.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "1{")
    numbered = []
    for line in lines[start:]:
        match = re.match(r"(\d+)(.*)", line)
        if not match:
            break
        numbered.append(match.group(2))
    return json.loads("\n".join(numbered))


# --- the validators themselves ----------------------------------------------------------


BAD: dict[str, tuple[str, Any]] = {
    "datasets missing": ("ListDatasetsResponse", {}),
    "datasets null": ("ListDatasetsResponse", {"datasets": None}),
    "a dataset that is a string": ("ListDatasetsResponse", {"datasets": ["a"]}),
    "dataset_id missing": ("Dataset", {k: v for k, v in dataset("a").items() if k != "dataset_id"}),
    "name a number": ("Dataset", dataset("a", name=5)),  # type: ignore[arg-type]
    "creation_time not a date-time": ("Dataset", dataset("a", created="yesterday")),
    "creation_time without a zone": ("Dataset", dataset("a", created="2024-01-01T00:00:00")),
    "creation_time on 30 February": ("Dataset", dataset("a", created="2024-02-30T00:00:00Z")),
    "cover without asset_id": ("Dataset", dataset("a", cover={"asset_type": "RESPONSE"})),
    "asset_type outside the enum": ("AssetIdentifier", {"asset_type": "IMAGE", "asset_id": "x"}),
    "collection_id too short": (
        "AssetIdentifier",
        {"asset_type": "UPLOAD", "asset_id": "x", "collection_id": "short"},
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_the_contract_refuses_what_it_forbids(case: str) -> None:
    """So that a validator which accepts everything (a lost `$ref`) cannot pass the others."""
    name, instance = BAD[case]
    assert errors(instance, name), f"{case} was accepted"


def test_the_mirrored_spec_and_the_current_revision_differ_as_documented() -> None:
    null_cover = dataset("a", cover=None)
    spaced = dataset("a", created="2000-01-23 04:56:07+00:00")
    with_collection = dataset(
        "a", cover={"asset_type": "UPLOAD", "asset_id": "x", "collection_id": "A" * 22}
    )
    assert errors(null_cover, "Dataset", "spec") and not errors(null_cover, "Dataset")
    assert errors(spaced, "Dataset", "spec") and not errors(spaced, "Dataset")
    # additionalProperties is not false: the old spec already lets collection_id through.
    assert not errors(with_collection, "Dataset", "spec")


# --- the spec's own examples ------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEMAS)
def test_spec_examples_validate(name: str) -> None:
    examples = spec_examples(name)
    assert examples, f"the spec has no example for {name}"
    for example in examples:
        assert errors(example, name, "spec") == []
        assert errors(example, name) == []


def test_reference_page_example_validates_against_the_current_contract() -> None:
    example = page_example()
    assert len(example["datasets"]) == 2
    assert errors(example, "ListDatasetsResponse") == []
    # It writes creation_time with a space: not RFC 3339, so not the mirrored spec's format.
    assert errors(example, "ListDatasetsResponse", "spec")


def _wrapped(name: str, example: Any) -> dict[str, Any]:
    if name == "ListDatasetsResponse":
        return example
    if name == "Dataset":
        return {"datasets": [example]}
    return {"datasets": [dataset("with-spec-cover", cover=example)]}


@pytest.mark.parametrize("name", SCHEMAS)
def test_spec_examples_parse_without_rejects(name: str) -> None:
    for example in spec_examples(name):
        document = _wrapped(name, example)
        listing = parse_listing(json.dumps(document).encode())
        assert listing.rejects == []
        assert listing.seen == len(document["datasets"])
        for record in document["datasets"]:
            row = listing.rows[record["dataset_id"]]  # the last occurrence of the id
            cover = record.get("cover_asset_identifier") or {}
            assert (row.name, row.user_id) == (record["name"], record["user_id"])
            assert row.creation_time == datetime.fromisoformat(record["creation_time"])
            assert (row.cover_asset_type, row.cover_asset_id) == (
                cover.get("asset_type"),
                cover.get("asset_id"),
            )
            assert row.extra is None


def test_spec_list_example_repeats_an_id_and_the_parser_keeps_one() -> None:
    (example,) = spec_examples("ListDatasetsResponse")
    listing = parse_listing(json.dumps(example).encode())
    assert list(listing.rows) == ["dataset_id"] and listing.duplicates == ["dataset_id"]


def test_reference_page_example_parses_without_rejects() -> None:
    listing = parse_listing(json.dumps(page_example()).encode())
    assert listing.rejects == [] and listing.seen == 2
    assert listing.rows["dataset_id"].creation_time == datetime(2000, 1, 23, 4, 56, 7, tzinfo=UTC)


# --- the test suite's fixtures ----------------------------------------------------------


def _served_by_fake_api(records: list[Any]) -> Any:
    """What FakeApi answers to a real GET /datasets by default: its listing, wrapped."""
    api = FakeApi()
    try:
        api.datasets = records
        response = requests.get(f"{api.url}/datasets", timeout=10)
        assert response.status_code == 200
        return json.loads(response.content)
    finally:
        api.close()


FIXTURES: dict[str, Callable[[], Any]] = {
    "dataset() default": lambda: {"datasets": [dataset("a")]},
    "dataset() with every option": lambda: {
        "datasets": [
            dataset("b", "Ünïcødé 😀", user_id="user-2", created="2024-12-15T17:32:00Z"),
            dataset("c", cover=None),
            dataset("d", cover={"asset_type": "UPLOAD", "asset_id": "x"}),
            dataset("e", sharing=[{"user": "x"}], collection_id="abc"),
        ]
    },
    "synthetic()": lambda: {"datasets": synthetic(50)},
    "synthetic() from another start": lambda: {
        "datasets": synthetic(3, start=datetime(1999, 12, 31, 23, 59, tzinfo=UTC))
    },
    "FakeApi's default reply": lambda: _served_by_fake_api(synthetic(5)),
    "examples/datasets.json": lambda: json.loads(EXAMPLE_FILE.read_text(encoding="utf-8")),
}


@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_fixture_listings_follow_the_contract(fixture: str) -> None:
    document = FIXTURES[fixture]()
    assert document["datasets"], "an empty listing would prove nothing"
    assert errors(document, "ListDatasetsResponse") == []
    for record in document["datasets"]:
        assert parse_timestamp(record["creation_time"]).utcoffset() == timedelta(0)


@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_fixture_listings_parse_without_rejects(fixture: str) -> None:
    document = FIXTURES[fixture]()
    listing = parse_listing(json.dumps(document).encode())
    assert listing.rejects == []
    assert set(listing.rows) == {r["dataset_id"] for r in document["datasets"]}


# --- anything the contract allows (within what a database can store) parses -------------

# Strings the way Ideogram's ids look, and names with any storable character.
ids = st.text(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=40
)
names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=60)
moments = st.datetimes(
    # Inside year 1..9999 after any offset: the edges are a known bug (see test_hostile.py).
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
)


@st.composite
def rfc3339(draw: st.DrawFn) -> str:
    moment = draw(moments)
    minutes = draw(st.integers(-(23 * 60 + 59), 23 * 60 + 59))
    sign = "-" if minutes < 0 else "+"
    zone = draw(
        st.sampled_from(["Z", "z", f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"])
    )
    digits = draw(st.sampled_from(["seconds", "milliseconds", "microseconds"]))
    return moment.isoformat(sep=draw(st.sampled_from(["T", "t"])), timespec=digits) + zone


ASSET_TYPES = (
    spec()["components"]["schemas"]["AssetType"]["enum"] if SPEC_FILE.is_file() else ["RESPONSE"]
)
covers = st.fixed_dictionaries(
    {"asset_type": st.sampled_from(ASSET_TYPES), "asset_id": ids},
    optional={"collection_id": st.text("ABCabc012_-", min_size=22, max_size=22)},
)
datasets_ = st.fixed_dictionaries(
    {"dataset_id": ids, "name": names, "user_id": ids, "creation_time": rfc3339()},
    optional={"cover_asset_identifier": st.one_of(st.none(), covers)},
)


@settings(max_examples=150, deadline=None, database=None)
@given(listing=st.lists(datasets_, max_size=5))
def test_every_contract_valid_listing_parses_without_rejects(listing: list[dict[str, Any]]) -> None:
    document = {"datasets": listing}
    assert errors(document, "ListDatasetsResponse") == []  # the generator keeps the contract
    parsed = parse_listing(json.dumps(document).encode())
    assert parsed.rejects == []
    last = {r["dataset_id"]: r for r in listing}
    assert set(parsed.rows) == set(last)
    for dataset_id, record in last.items():
        row = parsed.rows[dataset_id]
        assert row.creation_time == datetime.fromisoformat(record["creation_time"].upper())
        assert row.name == record["name"]
        cover = record.get("cover_asset_identifier")
        assert row.cover_asset_type == (cover["asset_type"] if cover else None)
        if cover and "collection_id" in cover:
            assert row.extra == {
                "cover_asset_identifier": {"collection_id": cover["collection_id"]}
            }
        else:
            assert row.extra is None


# What the contract allows but the parser rejects on purpose: values no database column
# can hold, or that cannot identify a dataset. Kept here so the difference stays deliberate.
DELIBERATE = {
    "empty dataset_id": dataset("", cover=None),
    "blank user_id": dataset("a", user_id="  "),
    "dataset_id over 255 characters": dataset("x" * 256, cover=None),
    "name over 1024 characters": dataset("a", "n" * 1025),
    "NUL in a name": dataset("a", "a\x00b"),
    "lone surrogate in a name": dataset("a", "\ud800"),
    "asset_type over 64 characters": dataset("a", cover={"asset_type": "T" * 65, "asset_id": "x"}),
}


@pytest.mark.parametrize("case", list(DELIBERATE))
def test_contract_valid_but_unstorable_records_are_rejected(case: str) -> None:
    record = DELIBERATE[case]
    if case != "asset_type over 64 characters":  # the enum already refuses that one
        assert errors(record, "Dataset") == []
    listing = parse_listing(json.dumps({"datasets": [record]}).encode())
    assert listing.rows == {} and len(listing.rejects) == 1
