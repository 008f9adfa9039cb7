"""Logging for every command: one line per record on stderr, text or JSON, secrets masked."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from sync.redact import RedactingFilter, install_record_factory

# Fields a record may carry through `extra=`; JSON lines include them when present.
_EXTRA_FIELDS = (
    "event",
    "account",
    "resource",
    "run_id",
    "counts",
    "duration_s",
    "error",
    "next_run",
)


# The run a line is about: {"account": ..., "run_id": ...}, for every logger, set by the
# code that runs it. Threads that work for a run start in a copy of its context.
_RUN: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "ideogram_sync_run", default=None
)


@contextlib.contextmanager
def about_run(account: str) -> Iterator[dict[str, Any]]:
    """Lines logged in this block are about `account`'s run; set ["run_id"] once known.

    Inside a block for the same account (a download started before the run), the fields
    are shared, so lines of threads started in the outer block get the run id too.
    """
    current = _RUN.get()
    if current is not None and current.get("account") == account:
        yield current
        return
    fields: dict[str, Any] = {"account": account, "run_id": None}
    token = _RUN.set(fields)
    try:
        yield fields
    finally:
        _RUN.reset(token)


class RunFields(logging.Filter):
    """Give each record the account and run id of the run it is logged in (if any)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _RUN.get()
        if fields is not None:
            for name, value in fields.items():
                if getattr(record, name, None) is None:
                    setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    """`2026-11-25T09:00:00Z LEVEL message`, always in UTC."""

    converter = time.gmtime

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, message, and account/run fields if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": getattr(record, "event", None) or record.name,
            "message": record.getMessage(),
        }
        for name in _EXTRA_FIELDS[1:]:
            value = getattr(record, name, None)
            if value is None:
                if name == "run_id" and "account" in entry:
                    entry["run_id"] = None  # about an account, before its run row exists
                continue
            if name == "counts" and isinstance(value, dict):
                entry.update(value)
            else:
                entry[name] = value
        if record.exc_text or record.exc_info:
            entry["traceback"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, verbose: bool, fmt: str = "text") -> None:
    """Send log records to stderr, one per line, in UTC, with every secret masked."""
    install_record_factory()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_ideogram_sync", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._ideogram_sync = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RunFields())
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else getattr(logging, level))
    # Library chatter stays out unless asked for; urllib3's retry warnings are kept.
    for noisy in ("alembic", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    # The daemon logs skipped and failed slots itself, in its own words.
    logging.getLogger("apscheduler").setLevel(logging.INFO if verbose else logging.ERROR)
