"""Logging for every command: one line per record on stderr, text or JSON, secrets masked."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from sync.redact import RedactingFilter, install_record_factory

# Fields a record may carry through `extra=`; JSON lines include them when present.
_EXTRA_FIELDS = ("event", "account", "run_id", "counts", "duration_s", "error", "next_run")


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
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else getattr(logging, level))
    # Library chatter stays out unless asked for; urllib3's retry warnings are kept.
    for noisy in ("alembic", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    # The daemon logs skipped and failed slots itself, in its own words.
    logging.getLogger("apscheduler").setLevel(logging.INFO if verbose else logging.ERROR)
