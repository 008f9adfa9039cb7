"""Contract: our fixtures and examples are valid `ListDatasetsResponse` bodies per Ideogram's own
OpenAPI document, and every example in that document parses without a reject."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sync.records import parse_listing, parse_record
from tests.fakeapi import dataset, synthetic

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT.parent / "shared" / "ideogram-api" / "openapi.json"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    if not SPEC.is_file():
        pytest.skip(f"the API reference {SPEC} is not beside this checkout")
    return json.loads(SPEC.read_text())


def validator(spec: dict[str, Any], name: str) -> Any:
    from jsonschema import Draft7Validator

    # The schemas refer to each other as #/components/schemas/...: validate against a
    # document that carries the components, so those references resolve.
    schema = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    return Draft7Validator(schema)


def test_fixture_listings_match_the_spec(spec: dict[str, Any]) -> None:
    check = validator(spec, "ListDatasetsResponse")
    bodies = [
        {"datasets": synthetic(50)},
        {"datasets": [dataset("a"), dataset("b", cover=None), dataset("c", sharing=[])]},
        {"datasets": []},
        json.loads((ROOT / "examples" / "datasets.json").read_text()),
    ]
    for body in bodies:
        errors = [e.message for e in check.iter_errors(body)]
        assert errors == [] or _only_nullable_cover(errors), errors


def _only_nullable_cover(errors: list[str]) -> bool:
    # The June 2026 spec predates the revision that made cover_asset_identifier nullable
    # ("null if not set"); a null cover is the one deviation we accept on purpose.
    return all(e == "None is not of type 'object'" for e in errors)


def test_a_bad_listing_is_caught_by_the_schema(spec: dict[str, Any]) -> None:
    check = validator(spec, "ListDatasetsResponse")
    assert list(check.iter_errors({"datasets": [{"dataset_id": "a"}]}))
    assert list(
        check.iter_errors(
            {"datasets": [dataset("a", cover={"asset_type": "NOPE", "asset_id": "x"})]}
        )
    )


def test_every_spec_example_parses(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    listing = parse_listing(json.dumps(schemas["ListDatasetsResponse"]["example"]))
    assert listing.rejects == [] and len(listing.rows) == 1 and listing.seen == 2
    row = parse_record(schemas["Dataset"]["example"])
    assert (row.cover_asset_type, row.cover_asset_id) == ("RESPONSE", "7uS_VESkRI6O3-sVgHQp_A")
    cover = schemas["AssetIdentifier"]["example"]
    assert parse_record(dataset("x", cover=cover)).cover_asset_id == cover["asset_id"]
    for value in schemas["AssetType"]["enum"]:
        assert (
            parse_record(
                dataset("x", cover={"asset_type": value, "asset_id": "y"})
            ).cover_asset_type
            == value
        )


def test_examples_in_the_path_responses_parse(spec: dict[str, Any]) -> None:
    operation = spec["paths"]["/datasets"]["get"]
    content = operation["responses"]["200"]["content"]["application/json"]
    examples = [content.get("example")] + [
        e.get("value") for e in content.get("examples", {}).values()
    ]
    for example in filter(None, examples):
        assert parse_listing(json.dumps(example)).rejects == []
