"""Contract tests of the details and models endpoints: every field of GetDatasetResponse,
DatasetFile, CustomModel and TrainingRun in Ideogram's OpenAPI document lands in a column
or in `extra`, and the fake API serves what those schemas allow.

- structure: MAPPING says where each property of each schema goes. The document may have
  no property MAPPING lacks (a field added to the spec fails here until it is mapped, or
  listed in IN_EXTRA and so shown to land in extra), MAPPING no property the document
  lacks, and every mapped column exists in sync/models.py with a type and nullability that
  can hold the property;
- behaviour: the spec's own examples go through the parsers (sync/model_records.py) and
  each field's value is found in its column; an unknown field at every level lands in
  `extra` or `details_extra`;
- fixtures: tests/fakeapi.py's GET /datasets/{id}, /models and /models/{id} bodies validate
  against the JSON Schemas, and parse.

The validators (OpenAPI's `nullable` as JSON Schema, `$ref`s resolved inside the document)
are tests/test_contract.py's.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import requests
from sqlalchemy import BigInteger, Boolean, Double, Integer, String, Table

from sync.model_records import (
    MAX_BIGINT,
    parse_dataset_details,
    parse_model,
    parse_model_details,
)
from sync.models import JSONType, UTCDateTime, metadata
from sync.records import InvalidRecord, parse_record
from tests.fakeapi import FakeApi, dataset, file, model, training_run
from tests.test_contract import SPEC_FILE, errors, spec, validator

pytestmark = pytest.mark.skipif(
    not SPEC_FILE.is_file(),
    reason=f"the Ideogram API contract is not there: {SPEC_FILE} is missing (it lives in "
    "shared/ideogram-api/ beside the checkout)",
)

# Where each property of each schema lands: "table.column", or a bare "table" for a
# property holding an object (or a list of objects) of another schema of this mapping,
# whose own properties say which columns of that table it fills.
MAPPING: dict[str, dict[str, str]] = {
    "GetDatasetResponse": {
        # The listing's Dataset: its fields are the datasets row's (tests/test_contract.py);
        # parse_dataset_details checks that it is the dataset asked for.
        "dataset": "datasets",
        "file_count": "datasets.file_count",
        "files": "dataset_files",
        "custom_model_ids": "datasets.custom_model_ids",
    },
    "DatasetFile": {
        "file_name": "dataset_files.file_name",
        "file_size_bytes": "dataset_files.file_size_bytes",
    },
    "GetModelResponse": {
        # The listing's CustomModel: its fields are the models row's; from the details only
        # its training runs are kept.
        "model": "models",
    },
    "CustomModel": {
        "model_id": "models.model_id",
        "name": "models.name",
        "status": "models.status",
        "dataset_id": "models.dataset_id",
        "custom_model_uri": "models.custom_model_uri",
        "is_owned": "models.is_owned",
        "is_available_for_generation": "models.is_available_for_generation",
        "creation_time": "models.creation_time",
        "last_update_time": "models.last_update_time",
        # Documented as filled only by GET /models/{id}; the listing's is ignored.
        "training_runs": "model_training_runs",
    },
    "TrainingRun": {
        "training_run_id": "model_training_runs.training_run_id",
        "status": "model_training_runs.status",
        "training_steps": "model_training_runs.training_steps",
        "lora_rank": "model_training_runs.lora_rank",
        "num_chips": "model_training_runs.num_chips",
        "ema": "model_training_runs.ema",
        "learning_rate": "model_training_runs.learning_rate",
        "creation_time": "model_training_runs.creation_time",
        "last_update_time": "model_training_runs.last_update_time",
    },
    "Dataset": {
        "dataset_id": "datasets.dataset_id",
        "name": "datasets.name",
        "user_id": "datasets.user_id",
        "creation_time": "datasets.creation_time",
        "cover_asset_identifier": "datasets",
    },
    "AssetIdentifier": {
        "asset_type": "datasets.cover_asset_type",
        "asset_id": "datasets.cover_asset_id",
    },
}

# Where each schema's unknown fields go.
EXTRA: dict[str, str] = {
    "GetDatasetResponse": "datasets.details_extra",
    "DatasetFile": "dataset_files.extra",
    "GetModelResponse": "models.details_extra",
    "CustomModel": "models.extra",
    "TrainingRun": "model_training_runs.extra",
    "Dataset": "datasets.extra",
    # Under the key "cover_asset_identifier" (sync/records.py).
    "AssetIdentifier": "datasets.extra",
}

# Properties of the document deliberately given no column: they must land in EXTRA, which
# the example tests check (each example holds every property). None so far.
IN_EXTRA: dict[str, frozenset[str]] = {name: frozenset() for name in MAPPING}

# The schemas this file is about; the others are in MAPPING because these refer to them.
REQUIRED = ("GetDatasetResponse", "DatasetFile", "CustomModel", "TrainingRun")

UNKNOWN = {"x_added_later": {"nested": [1, "two", None, 2.5, True]}}


def schemas() -> dict[str, Any]:
    return spec()["components"]["schemas"]


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema a `$ref` points to (within components/schemas), else the schema itself."""
    while "$ref" in schema:
        schema = schemas()[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def properties(name: str) -> dict[str, dict[str, Any]]:
    return schemas()[name]["properties"]


def referenced(prop: dict[str, Any]) -> str | None:
    """The schema name of an object property, or of a list property's items, else None."""
    ref = prop.get("$ref") or prop.get("items", {}).get("$ref")
    if ref is None or "properties" not in resolve({"$ref": ref}):
        return None  # a scalar, a list of scalars, or an enum
    return ref.rsplit("/", 1)[-1]


def column(target: str) -> Any:
    table_name, _, column_name = target.partition(".")
    return metadata.tables[table_name].c[column_name]


def table_of(name: str) -> str:
    """The one table a schema's columns (and its unknown fields) are in."""
    tables = {t.partition(".")[0] for t in MAPPING[name].values() if "." in t}
    tables.add(EXTRA[name].partition(".")[0])
    assert len(tables) == 1, f"{name} is spread over {sorted(tables)}"
    return tables.pop()


def table_columns(name: str) -> set[str]:
    table: Table = metadata.tables[name]
    return set(table.c.keys())


# --- the mapping against the document and the tables -----------------------------------


def test_the_mapping_covers_the_schemas_of_the_details_and_models() -> None:
    assert set(REQUIRED) <= set(MAPPING)
    assert set(MAPPING) == set(EXTRA) == set(IN_EXTRA)


@pytest.mark.parametrize("name", list(MAPPING))
def test_every_property_of_the_document_is_mapped(name: str) -> None:
    """A field added to the spec fails here until it gets a column (or joins IN_EXTRA)."""
    in_spec = set(properties(name))
    mapped = set(MAPPING[name])
    assert not mapped & IN_EXTRA[name], "a property is either mapped or left in extra"
    unmapped = in_spec - mapped - IN_EXTRA[name]
    assert not unmapped, (
        f"{name} has properties with no column: {sorted(unmapped)}; map them to a column in "
        f"MAPPING, or add them to IN_EXTRA (they must then land in {EXTRA[name]})"
    )
    stale = (mapped | IN_EXTRA[name]) - in_spec
    assert not stale, f"MAPPING/IN_EXTRA name properties {name} does not have: {sorted(stale)}"


@pytest.mark.parametrize("name", list(MAPPING))
def test_every_mapped_column_exists(name: str) -> None:
    for prop, target in [*MAPPING[name].items(), ("(unknown fields)", EXTRA[name])]:
        table_name, _, column_name = target.partition(".")
        assert table_name in metadata.tables, f"{name}.{prop}: no table {table_name}"
        if column_name:
            assert column_name in table_columns(table_name), (
                f"{name}.{prop}: {table_name} has no column {column_name}"
            )
    assert isinstance(column(EXTRA[name]).type, type(JSONType))
    table_of(name)  # one table per schema


@pytest.mark.parametrize("name", list(MAPPING))
def test_objects_map_to_their_schemas_table_and_scalars_to_columns(name: str) -> None:
    for prop, schema in properties(name).items():
        target = MAPPING[name][prop]
        nested = referenced(schema)
        if "." in target:
            assert nested is None, f"{name}.{prop} holds {nested} objects, not one value"
        else:
            assert nested in MAPPING, f"{name}.{prop} is mapped to a table but is not an object"
            assert table_of(nested) == target, f"{name}.{prop} is {nested}, kept in another table"


def _holds(prop: dict[str, Any], col: Any) -> bool:
    """Whether a column's type can hold the property's JSON type."""
    kind = prop.get("type")
    if prop.get("format") == "date-time":
        return isinstance(col.type, UTCDateTime)
    if kind == "array":
        return isinstance(col.type, type(JSONType))
    wanted = {"string": String, "integer": Integer, "number": Double, "boolean": Boolean}
    return isinstance(col.type, wanted[kind])


@pytest.mark.parametrize("name", list(MAPPING))
def test_each_column_can_hold_its_property(name: str) -> None:
    required = set(schemas()[name].get("required", ()))
    for prop, schema in properties(name).items():
        target = MAPPING[name][prop]
        if "." not in target:
            continue
        col = column(target)
        resolved = {**resolve(schema), **{k: v for k, v in schema.items() if k != "$ref"}}
        assert _holds(resolved, col), f"{name}.{prop} ({resolved.get('type')}) in {col.type!r}"
        if schema.get("nullable") or prop not in required:
            assert col.nullable, f"{name}.{prop} may be null or absent; {target} is NOT NULL"


# --- the spec's own examples, through the parsers ---------------------------------------


def example(name: str) -> Any:
    return copy.deepcopy(schemas()[name]["example"])


def _rewrite_times(value: Any, how: Callable[[datetime], str]) -> Any:
    if isinstance(value, dict):
        return {k: _rewrite_times(v, how) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite_times(v, how) for v in value]
    if isinstance(value, str) and value.startswith("2000-01-23T"):
        return how(datetime.fromisoformat(value))
    return value


# The examples' times as the spec writes them, and the same instants written otherwise.
TIMES: dict[str, Callable[[Any], Any]] = {
    "as the spec writes them": lambda body: body,
    "at another offset": lambda body: _rewrite_times(
        body,
        lambda t: (
            (t + timedelta(microseconds=250))
            .astimezone(timezone(-timedelta(hours=5, minutes=30)))
            .isoformat()
        ),
    ),
    "in Z with microseconds": lambda body: _rewrite_times(
        body, lambda t: (t + timedelta(microseconds=123456)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    ),
}


def _same(actual: Any, value: Any, prop: dict[str, Any], where: str) -> None:
    """The column's value is the JSON field's: times aware UTC, numbers of their type."""
    prop = {**resolve(prop), **{k: v for k, v in prop.items() if k != "$ref"}}
    if value is None:
        assert actual is None, f"{where}: {actual!r} for null"
    elif prop.get("format") == "date-time":
        assert isinstance(actual, datetime), f"{where}: {actual!r} is not a datetime"
        assert actual.tzinfo is UTC, f"{where}: {actual!r} is not in UTC"
        assert actual == datetime.fromisoformat(value.replace("Z", "+00:00")), where
    elif prop.get("type") == "number":
        assert type(actual) is float and actual == value, f"{where}: {actual!r} for {value!r}"
    else:
        assert type(actual) is type(value) and actual == value, f"{where}: {actual!r} != {value!r}"


def assert_lands(name: str, obj: dict[str, Any], row: dict[str, Any]) -> set[str]:
    """Assert each field of `obj` (a `name`) is in its column of `row`, and that its unknown
    fields and IN_EXTRA ones are in the row's extra column; return the fields that go to
    another row (mapped to a bare table), for the caller to check."""
    assert set(row) <= table_columns(table_of(name)), f"{name}: a key that is no column"
    elsewhere: set[str] = set()
    for prop, value in obj.items():
        target = MAPPING[name].get(prop)
        if target is None:
            continue  # an unknown or IN_EXTRA field: see below
        if "." not in target:
            elsewhere.add(prop)
            continue
        _same(row[target.partition(".")[2]], value, properties(name)[prop], f"{name}.{prop}")
    extra = {k: v for k, v in obj.items() if k not in MAPPING[name]}
    assert row[EXTRA[name].partition(".")[2]] == (extra or None), f"{name}'s extra"
    return elsewhere


def assert_example_complete(name: str, obj: dict[str, Any]) -> None:
    """An example that lacked a property would prove nothing about it."""
    missing = set(properties(name)) - set(obj)
    assert not missing, f"the {name} example has no {sorted(missing)}: add them to the body"


@pytest.mark.parametrize("times", list(TIMES))
def test_get_dataset_response_example_lands_in_its_columns(times: str) -> None:
    body = TIMES[times](example("GetDatasetResponse"))
    assert_example_complete("GetDatasetResponse", body)
    given = copy.deepcopy(body)
    rows = parse_dataset_details(given, body["dataset"]["dataset_id"])
    assert given == body, "the parser changed its input"

    assert set(rows.values) <= table_columns("datasets")
    assert assert_lands("GetDatasetResponse", body, rows.values) == {"dataset", "files"}
    assert rows.values["total_file_bytes"] == sum(f["file_size_bytes"] for f in body["files"])

    # dataset -> datasets: the listing's row of the same object.
    record = body["dataset"]
    assert_example_complete("Dataset", record)
    row = parse_record(record)._asdict()
    assert assert_lands("Dataset", record, row) == {"cover_asset_identifier"}
    cover = record["cover_asset_identifier"]
    assert_example_complete("AssetIdentifier", cover)
    assert assert_lands("AssetIdentifier", cover, row) == set()

    # files -> dataset_files: one row each, in the body's order.
    assert len(body["files"]) == 2
    assert [c["position"] for c in rows.children] == [0, 1]
    for item, child in zip(body["files"], rows.children, strict=True):
        assert_example_complete("DatasetFile", item)
        assert assert_lands("DatasetFile", item, child) == set()


def test_dataset_file_example_lands_in_its_columns() -> None:
    item = example("DatasetFile")
    assert_example_complete("DatasetFile", item)
    body = {**example("GetDatasetResponse"), "files": [item]}
    rows = parse_dataset_details(body, body["dataset"]["dataset_id"])
    (child,) = rows.children
    assert assert_lands("DatasetFile", item, child) == set()


@pytest.mark.parametrize("times", list(TIMES))
def test_get_model_response_example_lands_in_its_columns(times: str) -> None:
    body = TIMES[times](example("GetModelResponse"))
    record = body["model"]
    assert_example_complete("CustomModel", record)
    assert record["status"] is None  # the spec's examples: accepted, stored as NULL
    given = copy.deepcopy(body)
    rows = parse_model_details(given, record["model_id"])
    assert given == body, "the parser changed its input"

    assert set(rows.values) <= table_columns("models")
    assert rows.values == {"details_extra": None}
    assert assert_lands("GetModelResponse", body, rows.values) == {"model"}

    # model -> models: the listing's row of the same object; training_runs is not "extra".
    row = parse_model(record)._asdict()
    assert assert_lands("CustomModel", record, row) == {"training_runs"}

    # training_runs -> model_training_runs: one row per id (the example repeats its id:
    # the last one is kept).
    last = {run["training_run_id"]: run for run in record["training_runs"]}
    assert len(record["training_runs"]) == 2 and len(last) == 1
    assert [c["training_run_id"] for c in rows.children] == list(last)
    for run, child in zip(last.values(), rows.children, strict=True):
        assert_example_complete("TrainingRun", run)
        assert run["status"] is None
        assert assert_lands("TrainingRun", run, child) == set()


@pytest.mark.parametrize("times", list(TIMES))
def test_custom_model_example_lands_in_its_columns(times: str) -> None:
    record = TIMES[times](example("CustomModel"))
    assert_example_complete("CustomModel", record)
    assert record["training_runs"], "the listing's training runs are ignored, not extra"
    row = parse_model(record)._asdict()
    assert assert_lands("CustomModel", record, row) == {"training_runs"}


def test_training_run_example_lands_in_its_columns() -> None:
    run = example("TrainingRun")
    assert_example_complete("TrainingRun", run)
    body = example("GetModelResponse")
    body["model"]["training_runs"] = [run]
    (child,) = parse_model_details(body, body["model"]["model_id"]).children
    assert assert_lands("TrainingRun", run, child) == set()


def _status_null(error: Any) -> bool:
    return error.instance is None and list(error.absolute_path)[-1:] == ["status"]


@pytest.mark.parametrize(
    "name", ["GetDatasetResponse", "DatasetFile", "GetModelResponse", "CustomModel", "TrainingRun"]
)
def test_the_examples_break_their_schema_only_with_a_null_status(name: str) -> None:
    """So the bodies above are what the contract describes, but for `status: null`, which
    the spec's examples show although ModelStatus and TrainingRunStatus are not nullable."""
    found = list(validator(name, "spec").iter_errors(example(name)))
    assert [e.message for e in found if not _status_null(e)] == []


# --- unknown fields, at every level -----------------------------------------------------


def _dataset_top(unknown: dict[str, Any]) -> Any:
    body = {**example("GetDatasetResponse"), **unknown}
    return parse_dataset_details(body, body["dataset"]["dataset_id"]).values["details_extra"]


def _dataset_file(unknown: dict[str, Any]) -> Any:
    body = example("GetDatasetResponse")
    body["files"][1].update(unknown)
    children = parse_dataset_details(body, body["dataset"]["dataset_id"]).children
    assert children[0]["extra"] is None
    return children[1]["extra"]


def _model_top(unknown: dict[str, Any]) -> Any:
    body = {**example("GetModelResponse"), **unknown}
    return parse_model_details(body, body["model"]["model_id"]).values["details_extra"]


def _model(unknown: dict[str, Any]) -> Any:
    return parse_model({**example("CustomModel"), **unknown}).extra


def _training_run(unknown: dict[str, Any]) -> Any:
    body = example("GetModelResponse")
    runs = body["model"]["training_runs"]
    runs[0]["training_run_id"] = "another"
    runs[1].update(unknown)
    children = parse_model_details(body, body["model"]["model_id"]).children
    assert [c["training_run_id"] for c in children] == ["another", "training_run_id"]
    assert children[0]["extra"] is None
    return children[1]["extra"]


def _dataset(unknown: dict[str, Any]) -> Any:
    return parse_record({**example("Dataset"), **unknown}).extra


LEVELS: dict[str, tuple[str, Callable[[dict[str, Any]], Any]]] = {
    "GetDatasetResponse body": ("GetDatasetResponse", _dataset_top),
    "a file": ("DatasetFile", _dataset_file),
    "GetModelResponse body": ("GetModelResponse", _model_top),
    "a model": ("CustomModel", _model),
    "a training run": ("TrainingRun", _training_run),
    "a dataset (the listing's)": ("Dataset", _dataset),
}


@pytest.mark.parametrize("level", list(LEVELS))
def test_unknown_fields_land_in_extra(level: str) -> None:
    name, extra_of = LEVELS[level]
    assert extra_of({}) is None
    assert extra_of(copy.deepcopy(UNKNOWN)) == UNKNOWN, f"not in {EXTRA[name]}"
    # A field known elsewhere (in another schema) is still unknown here.
    elsewhere = {"model_id": "m"} if name == "TrainingRun" else {"ema": 1.5}
    assert extra_of(copy.deepcopy(elsewhere)) == elsewhere


def test_every_schema_with_fields_has_an_unknown_field_level() -> None:
    assert {name for name, _ in LEVELS.values()} >= set(REQUIRED)


# --- what the parser accepts, the columns hold ------------------------------------------

INT32_MAX = 2**31 - 1


def _column_max(target: str) -> int:
    return MAX_BIGINT if isinstance(column(target).type, BigInteger) else INT32_MAX


def _integer_body(name: str, prop: str, value: int) -> Callable[[], Any]:
    def parse() -> Any:
        if name == "GetDatasetResponse":
            body = {**example("GetDatasetResponse"), prop: value}
            return parse_dataset_details(body, body["dataset"]["dataset_id"])
        if name == "DatasetFile":
            body = example("GetDatasetResponse")
            body["files"] = [{"file_name": "x", prop: value}]
            return parse_dataset_details(body, body["dataset"]["dataset_id"])
        body = example("GetModelResponse")
        body["model"]["training_runs"] = [{**example("TrainingRun"), prop: value}]
        return parse_model_details(body, body["model"]["model_id"])

    return parse


INTEGERS = [
    (name, prop)
    for name in ("GetDatasetResponse", "DatasetFile", "TrainingRun")
    for prop, schema in (properties(name).items() if SPEC_FILE.is_file() else ())
    if schema.get("type") == "integer"
]


@pytest.mark.parametrize(("name", "prop"), INTEGERS)
def test_integers_past_their_column_are_rejected_not_overflowed(name: str, prop: str) -> None:
    limit = _column_max(MAPPING[name][prop])
    _integer_body(name, prop, limit)()  # the largest the column holds is kept
    with pytest.raises(InvalidRecord):
        _integer_body(name, prop, limit + 1)()


def test_a_total_size_past_bigint_does_not_reach_the_database() -> None:
    body = example("GetDatasetResponse")
    body["files"] = [file("x", 2**62), file("y", 2**62)]
    try:
        rows = parse_dataset_details(body, body["dataset"]["dataset_id"])
    except InvalidRecord:
        return
    total = rows.values["total_file_bytes"]
    assert total is None or total <= MAX_BIGINT


# --- the fake API keeps the contract ----------------------------------------------------


def _the_defaults(api: FakeApi) -> None:
    api.datasets = [dataset("a")]
    api.models = [model("m1", dataset_id="a")]
    api.files["a"] = [file("x.png", 10)]
    api.training_runs["m1"] = [training_run("t1")]


def _nulls_and_other_states(api: FakeApi) -> None:
    api.datasets = [dataset("a"), dataset("b", cover=None)]
    api.models = [
        model("m1", dataset_id="a", status="TRAINING", updated=None),
        model("m2", owned=False),
    ]
    api.files["a"] = [file("x.png", 10), file(None, None), file("y.png", None)]
    api.training_runs["m1"] = [
        training_run("t1", "PREPARING_DATA", updated=None),
        training_run("t2"),
    ]


FAKE_SETUPS: dict[str, Callable[[FakeApi], None]] = {
    "the defaults": _the_defaults,
    # A null cover is the newer revision's (tests/test_contract.py): "current" contract only.
    "nulls and other states": _nulls_and_other_states,
}


def _get(api: FakeApi, path: str) -> Any:
    response = requests.get(f"{api.url}{path}", timeout=10)
    assert response.status_code == 200, path
    return json.loads(response.content)


@pytest.mark.parametrize("setup", list(FAKE_SETUPS))
def test_fake_api_details_and_models_follow_the_contract(setup: str) -> None:
    api = FakeApi()
    try:
        FAKE_SETUPS[setup](api)
        served: list[tuple[str, Any, Callable[[Any], Any]]] = []
        for record in api.datasets:
            key = record["dataset_id"]
            served.append(
                (
                    "GetDatasetResponse",
                    _get(api, f"/datasets/{key}"),
                    lambda body, key=key: parse_dataset_details(body, key),
                )
            )
        served.append(
            (
                "ListModelsResponse",
                _get(api, "/models"),
                lambda b: list(map(parse_model, b["models"])),
            )
        )
        for record in api.models:
            key = record["model_id"]
            served.append(
                (
                    "GetModelResponse",
                    _get(api, f"/models/{key}"),
                    lambda body, key=key: parse_model_details(body, key),
                )
            )
    finally:
        api.close()

    for name, body, parse in served:
        contracts = ("current",) if setup != "the defaults" else ("spec", "current")
        for contract in contracts:
            assert errors(body, name, contract) == [], f"{name} ({contract}): {body}"
        parse(body)  # and no InvalidRecord

    details = {
        body["dataset"]["dataset_id"]: body
        for name, body, _ in served
        if name == "GetDatasetResponse"
    }
    assert details["a"]["file_count"] == len(details["a"]["files"]) > 0
    assert details["a"]["custom_model_ids"] == ["m1"]
    runs = [
        body["model"]["training_runs"] for name, body, _ in served if name == "GetModelResponse"
    ]
    assert runs[0], "a model's details without training runs would prove little"
