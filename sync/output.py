"""Render runs, datasets and models for people (aligned tables) and machines (JSON, CSV),
and the progress of a details fetch on a terminal."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

from sync.runs import RunRow

if TYPE_CHECKING:
    from sync.job import ResourcePreview

FORMATS = ("table", "csv", "json")
_RUN_HEADERS = (
    "ACCOUNT", "RESOURCE", "RUN", "STARTED (UTC)", "DURATION", "STATUS",
    "SEEN", "INS", "UPD", "SAME", "DEL", "REJ", "ERROR",
)  # fmt: skip
# What a person wants at a glance; csv/json carry every column.
DATASET_TABLE_COLUMNS = (
    "dataset_id", "name", "user_id", "creation_time", "cover_asset_id", "file_count",
)  # fmt: skip
MODEL_TABLE_COLUMNS = ("model_id", "name", "status", "dataset_id", "is_owned", "creation_time")


def run_as_dict(run: RunRow) -> dict[str, Any]:
    """A run as a JSON-ready dict (ISO 8601 UTC times)."""
    return {
        "account": run.account,
        "resource": run.resource,
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
            r.resource,
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


def write_rows(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str],
    table_columns: Sequence[str],
    fmt: str,
    out: TextIO,
) -> int:
    """Stream rows as a table (of `table_columns`), CSV or JSON array; return how many."""
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
        table.append(tuple(_clip(str(_plain(row[c])), 60) for c in table_columns))
        count += 1
    _write_table(tuple(c.upper() for c in table_columns), table, out)
    return count


# What a dry run reports, in this order: (its key in JSON and among a preview's keys, label).
_PREVIEW_KINDS = (
    ("insert", "insert"),
    ("update", "update"),
    ("restore", "restore"),
    ("delete", "soft-delete"),
    ("reject", "reject"),
)


def preview_as_dict(item: ResourcePreview) -> dict[str, Any]:
    """A dry run's finding for one account and resource, JSON-ready."""
    found: dict[str, Any] = {
        "account": item.account,
        "resource": item.resource,
        "would_succeed": item.error is None,
        "exit_code": item.error.exit_code if item.error else 0,
        "error": str(item.error) if item.error else None,
    }
    if item.due is not None:
        found["details_due"] = item.due
    if item.preview is not None:
        counts = item.preview.counts
        found["counts"] = {
            "seen": counts.seen,
            "insert": counts.inserted,
            "update": counts.updated,
            "restore": item.preview.restored,
            "soft_delete": counts.deleted,
            "reject": counts.rejected,
            "unchanged": counts.unchanged,
        }
        found["first_ids"] = {
            label.replace("-", "_"): item.preview.keys.get(kind, [])
            for kind, label in _PREVIEW_KINDS
        }
    return found


def write_previews(items: Sequence[ResourcePreview], fmt: str, out: TextIO) -> None:
    """What a dry run found: a few lines per account and resource, or a JSON array."""
    if fmt == "json":
        json.dump([preview_as_dict(item) for item in items], out, indent=2, ensure_ascii=False)
        out.write("\n")
        return
    for item in items:
        head = f"account {item.account}, {item.resource}:"
        if item.preview is not None:
            found = preview_as_dict(item)["counts"]
            out.write(
                f"{head} would insert {found['insert']}, update {found['update']}, restore "
                f"{found['restore']}, soft-delete {found['soft_delete']}, reject "
                f"{found['reject']} ({found['unchanged']} unchanged, {found['seen']} listed)\n"
            )
            for kind, label in _PREVIEW_KINDS:
                keys = item.preview.keys.get(kind)
                if keys:
                    out.write(f"  {label}: {', '.join(keys)}\n")
        elif item.due is not None:
            out.write(
                f"{head} would ask for the details of the {item.due} row(s) due now, and of "
                "those its listing inserts, updates or restores\n"
            )
        if item.error is not None:
            out.write(f"  a run would fail (exit {item.error.exit_code}): {item.error}\n")


class Progress:
    """done/total, rate and time left of a details fetch, redrawn in place on `out` (a
    terminal), at most every `every` seconds."""

    def __init__(self, out: TextIO, every: float = 0.2) -> None:
        self.out = out
        self.every = every
        self._started: dict[str, float] = {}
        self._drawn = 0.0
        self._open = False  # a line drawn and not yet ended

    def __call__(self, what: str, done: int, total: int) -> None:
        """Report that `done` of `total` items of `what` are fetched; done = -1: the fetch
        ended (the line, if one is drawn and not finished, is ended)."""
        if done < 0:
            if self._open:
                self.out.write("\n")
                self.out.flush()
                self._open = False
            return
        now = time.monotonic()
        started = self._started.setdefault(what, now)
        if done < total and now - self._drawn < self.every:
            return
        self._drawn = now
        elapsed = now - started
        rate = done / elapsed if elapsed > 0 else 0.0
        left = f"{(total - done) / rate:.0f}s" if rate > 0 else "?"
        line = f"{what}: {done}/{total} ({rate:.1f}/s, ETA {left})"
        # \r and erase-line: one line redrawn; a newline once the fetch is done.
        self.out.write(f"\r\x1b[2K{line}" + ("\n" if done >= total else ""))
        self.out.flush()
        self._open = done < total


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
