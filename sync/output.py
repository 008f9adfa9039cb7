"""Render runs and datasets for people (aligned tables) and machines (JSON, CSV)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO

from sync.runs import RunRow

FORMATS = ("table", "csv", "json")
_RUN_HEADERS = (
    "ACCOUNT", "RUN", "STARTED (UTC)", "DURATION", "STATUS",
    "SEEN", "INS", "UPD", "SAME", "DEL", "REJ", "ERROR",
)  # fmt: skip
# What a person wants at a glance; csv/json carry every column.
_DATASET_TABLE_COLUMNS = ("dataset_id", "name", "user_id", "creation_time", "cover_asset_id")


def run_as_dict(run: RunRow) -> dict[str, Any]:
    """A run as a JSON-ready dict (ISO 8601 UTC times)."""
    return {
        "account": run.account,
        "run_id": run.id,
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "duration_seconds": run.duration_seconds,
        "status": run.status,
        "datasets_seen": run.datasets_seen,
        "inserted": run.inserted,
        "updated": run.updated,
        "unchanged": run.unchanged,
        "deleted": run.deleted,
        "rejected": run.rejected,
        "error": run.error,
    }


def write_runs(runs: Sequence[RunRow], fmt: str, out: TextIO) -> None:
    """Write runs as an aligned table or a JSON array."""
    if fmt == "json":
        json.dump([run_as_dict(r) for r in runs], out, indent=2)
        out.write("\n")
        return
    table = [
        (
            r.account,
            str(r.id),
            _when(r.started_at),
            "-" if r.duration_seconds is None else f"{r.duration_seconds:.1f}s",
            r.status,
            *(str(n) for n in (r.datasets_seen, r.inserted, r.updated)),
            *(str(n) for n in (r.unchanged, r.deleted, r.rejected)),
            _clip(r.error or "", 100),
        )
        for r in runs
    ]
    _write_table(_RUN_HEADERS, table, out)


def write_datasets(
    rows: Iterable[Mapping[str, Any]], columns: Sequence[str], fmt: str, out: TextIO
) -> int:
    """Stream dataset rows as a table, CSV or JSON array; return how many were written."""
    count = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _plain(v) for k, v in row.items()})
            count += 1
        return count
    if fmt == "json":
        out.write("[")
        for row in rows:
            out.write(",\n  " if count else "\n  ")
            json.dump({k: _jsonable(v) for k, v in row.items()}, out, ensure_ascii=False)
            count += 1
        out.write("\n]\n" if count else "]\n")
        return count
    table = []
    for row in rows:
        table.append(tuple(_clip(str(_plain(row[c])), 60) for c in _DATASET_TABLE_COLUMNS))
        count += 1
    _write_table(tuple(c.upper() for c in _DATASET_TABLE_COLUMNS), table, out)
    return count


def _write_table(headers: Sequence[str], table: Sequence[Sequence[str]], out: TextIO) -> None:
    lines = [headers, *table]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    for line in lines:
        out.write("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() + "\n")


def _plain(value: Any) -> Any:
    # CSV and tables: timestamps as ISO 8601 UTC, JSON columns as compact JSON, NULL as "".
    if value is None:
        return ""
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return value


def _jsonable(value: Any) -> Any:
    return _iso(value) if isinstance(value, datetime) else value


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.isoformat().replace("+00:00", "Z")


def _when(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
