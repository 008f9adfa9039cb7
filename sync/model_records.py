"""What `GET /models` and the details endpoints return: checks, and the rows they become.

Pure: no I/O. `MODELS` describes the models listing to the sync engine (store.py);
`DATASET_DETAILS` and `MODEL_DETAILS` describe the details to details.py. The rules shared
with datasets (field limits, times, unknown fields) live in records.py.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, NamedTuple

from sync.jsonstream import json_type
from sync.models import dataset_files, model_history, model_training_runs, models
from sync.records import (
    DATASETS,
    MAX_ID_LENGTH,
    MAX_NAME_LENGTH,
    InvalidRecord,
    check_extra,
    check_storable,
    missing_or_type,
    parse_timestamp,
    text_field,
    usable_key,
)
from sync.resource import DetailRows, Details, Resource

MAX_STATUS_LENGTH = 32
MAX_URI_LENGTH = 1024
# BIGINT columns hold this much; a larger number is rejected rather than overflowing.
MAX_BIGINT = 2**63 - 1

_MODEL_FIELDS = frozenset(
    {
        "model_id",
        "name",
        "status",
        "dataset_id",
        "custom_model_uri",
        "is_owned",
        "is_available_for_generation",
        "creation_time",
        "last_update_time",
        # Documented as filled only by GET /models/{id}: training runs come from there.
        "training_runs",
    }
)
_TRAINING_RUN_FIELDS = frozenset(
    {
        "training_run_id",
        "status",
        "training_steps",
        "lora_rank",
        "num_chips",
        "ema",
        "learning_rate",
        "creation_time",
        "last_update_time",
    }
)
_FILE_FIELDS = frozenset({"file_name", "file_size_bytes"})
_DATASET_DETAIL_FIELDS = frozenset({"dataset", "file_count", "files", "custom_model_ids"})


class ModelRow(NamedTuple):
    """One valid custom model, as the `models` table holds it."""

    model_id: str
    name: str
    status: str | None
    dataset_id: str | None
    custom_model_uri: str | None
    is_owned: bool
    is_available_for_generation: bool
    creation_time: datetime
    last_update_time: datetime | None
    extra: dict[str, Any] | None


def parse_model(record: Any) -> ModelRow:
    """Validate one `CustomModel` object and shape it as a row; raise InvalidRecord if unusable."""
    record = _object(record, "record")
    extra = {k: v for k, v in record.items() if k not in _MODEL_FIELDS}
    if extra:
        check_extra(extra)
    return ModelRow(
        model_id=text_field(record, "model_id", MAX_ID_LENGTH, False),
        name=text_field(record, "name", MAX_NAME_LENGTH, True),
        # The spec's own examples show a null status, and new states may be added: any
        # string is kept as it is.
        status=_optional_text(record, "status", MAX_STATUS_LENGTH),
        dataset_id=_optional_text(record, "dataset_id", MAX_ID_LENGTH),
        custom_model_uri=_optional_text(record, "custom_model_uri", MAX_URI_LENGTH),
        is_owned=_boolean(record, "is_owned"),
        is_available_for_generation=_boolean(record, "is_available_for_generation"),
        creation_time=_time(record, "creation_time"),
        last_update_time=_time(record, "last_update_time", nullable=True),
        extra=extra or None,
    )


def model_key(record: Any) -> str | None:
    """The record's model_id if it could key a row (even if the record is rejected), else None."""
    return usable_key(record, "model_id")


def parse_dataset_details(body: Any, dataset_id: str) -> DetailRows:
    """A `GetDatasetResponse`: the dataset's file count, sizes and models, and its files."""
    body = _object(body, "the dataset details")
    dataset = _object(body.get("dataset"), "dataset")
    if dataset.get("dataset_id") != dataset_id:
        raise InvalidRecord(
            f"the details asked for dataset {dataset_id} describe "
            f"{_shown(dataset.get('dataset_id'))}"
        )
    file_count = _integer(body, "file_count")
    if file_count is None:
        raise InvalidRecord(missing_or_type("file_count", None, "integer"))
    files = []
    for position, item in enumerate(_list(body, "files")):
        label = f"files[{position}]"
        item = _object(item, label)
        extra = {k: v for k, v in item.items() if k not in _FILE_FIELDS}
        if extra:
            check_extra(extra)
        files.append(
            {
                "position": position,
                "file_name": _optional_text(item, "file_name", MAX_NAME_LENGTH, label + "."),
                "file_size_bytes": _integer(item, "file_size_bytes", label + "."),
                "extra": extra or None,
            }
        )
    model_ids = []
    for index, model_id in enumerate(_list(body, "custom_model_ids")):
        if not isinstance(model_id, str):
            raise InvalidRecord(f"custom_model_ids[{index}] is a JSON {json_type(model_id)}")
        check_storable(model_id, "custom_model_ids")
        model_ids.append(model_id)
    sizes = [f["file_size_bytes"] for f in files if f["file_size_bytes"] is not None]
    if sum(sizes) > MAX_BIGINT:
        raise InvalidRecord(f"the files' sizes add up to more than {MAX_BIGINT} bytes")
    values = {
        "file_count": file_count,
        # Null, not 0, when no file has a known size: "unknown" is not "empty".
        "total_file_bytes": sum(sizes) if sizes else None,
        "custom_model_ids": model_ids,
        "details_extra": _unknown(body, _DATASET_DETAIL_FIELDS),
    }
    return DetailRows(values, files)


def parse_model_details(body: Any, model_id: str) -> DetailRows:
    """A `GetModelResponse`: the model's training runs (the listing has its other fields)."""
    body = _object(body, "the model details")
    model = _object(body.get("model"), "model")
    if model.get("model_id") != model_id:
        raise InvalidRecord(
            f"the details asked for model {model_id} describe {_shown(model.get('model_id'))}"
        )
    runs: dict[str, dict[str, Any]] = {}
    for index, item in enumerate(_list(model, "training_runs")):
        run = parse_training_run(item, f"training_runs[{index}].")
        runs[run["training_run_id"]] = run  # a repeated id: the last one decides
    return DetailRows({"details_extra": _unknown(body, {"model"})}, list(runs.values()))


def parse_training_run(item: Any, label: str = "") -> dict[str, Any]:
    """One `TrainingRun` object as a `model_training_runs` row (without its model and run)."""
    item = _object(item, label.rstrip(".") or "training run")
    extra = {k: v for k, v in item.items() if k not in _TRAINING_RUN_FIELDS}
    if extra:
        check_extra(extra)
    return {
        "training_run_id": text_field(item, "training_run_id", MAX_ID_LENGTH, False, label),
        "status": _optional_text(item, "status", MAX_STATUS_LENGTH, label),
        "training_steps": _integer(item, "training_steps", label),
        "lora_rank": _integer(item, "lora_rank", label),
        "num_chips": _integer(item, "num_chips", label),
        "ema": _number(item, "ema", label),
        "learning_rate": _number(item, "learning_rate", label),
        "creation_time": _time(item, "creation_time", label=label),
        "last_update_time": _time(item, "last_update_time", nullable=True, label=label),
        "extra": extra or None,
    }


def _object(value: Any, label: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRecord(f"{label} is a JSON {json_type(value)}, not an object")
    return value


def _list(obj: dict[str, Any], key: str) -> list[Any]:
    value = obj.get(key)
    if value is None:  # documented as defaulting to []
        return []
    if not isinstance(value, list):
        raise InvalidRecord(f"{key} is a JSON {json_type(value)}, not a list")
    return value


def _optional_text(obj: dict[str, Any], key: str, max_length: int, label: str = "") -> str | None:
    if obj.get(key) is None:
        return None
    return text_field(obj, key, max_length, True, label)


def _boolean(obj: dict[str, Any], key: str) -> bool:
    value = obj.get(key)
    if not isinstance(value, bool):
        raise InvalidRecord(missing_or_type(key, value, "boolean"))
    return value


def _integer(obj: dict[str, Any], key: str, label: str = "") -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRecord(f"{label}{key} is a JSON {json_type(value)}, not an integer")
    if not 0 <= value <= MAX_BIGINT:
        raise InvalidRecord(f"{label}{key} is {value}, outside 0 to {MAX_BIGINT}")
    return value


def _number(obj: dict[str, Any], key: str, label: str = "") -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRecord(f"{label}{key} is a JSON {json_type(value)}, not a number")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidRecord(f"{label}{key} is not a finite number")
    return number


def _time(
    obj: dict[str, Any], key: str, nullable: bool = False, label: str = ""
) -> datetime | None:
    value = obj.get(key)
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise InvalidRecord(missing_or_type(label + key, value, "string"))
    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise InvalidRecord(f"{label}{key} is {exc}") from None


def _unknown(obj: dict[str, Any], known: frozenset[str] | set[str]) -> dict[str, Any] | None:
    extra = {k: v for k, v in obj.items() if k not in known}
    if extra:
        check_extra(extra)
    return extra or None


def _shown(value: Any) -> str:
    return repr(value)[:80] if isinstance(value, str) else f"a JSON {json_type(value)} id"


MODELS = Resource(
    name="models",
    noun="model",
    path="/models",
    listing_key="models",
    table=models,
    history=model_history,
    key="model_id",
    columns=ModelRow._fields[1:],
    parse=parse_model,
    key_of=model_key,
    owned_column="is_owned",
)

DATASET_DETAILS = Details(
    name="dataset_details",
    listing=DATASETS,
    path="/datasets/{}",
    children=dataset_files,
    parse=parse_dataset_details,
)

MODEL_DETAILS = Details(
    name="model_details",
    listing=MODELS,
    path="/models/{}",
    children=model_training_runs,
    parse=parse_model_details,
    owned_column="is_owned",
)
