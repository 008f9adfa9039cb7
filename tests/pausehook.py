"""Run the CLI with a pause inside its write transaction, so tests can kill or cut it there.

Usage: python -m tests.pausehook ARGS...  (the CLI's own arguments). When the first write to
`datasets` is about to run it creates $PAUSE_MARKER, then waits until $PAUSE_RESUME exists
(or 120 s pass): long enough for a test to send a signal or drop the connection.

With $STOP_DELAY (seconds), a stop (SIGTERM's, a deadline's) starts cancelling the run's
statements that much later, as its thread can on a loaded machine.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

_paused = False


def _pause(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
    global _paused
    text = " ".join(statement.split()).upper()
    if _paused or not text.startswith(("INSERT INTO DATASETS", "UPDATE DATASETS")):
        return
    _paused = True
    # Written aside, then renamed: a test reads the pid as soon as the marker exists.
    marker = Path(os.environ["PAUSE_MARKER"])
    written = marker.with_name(marker.name + ".tmp")
    written.write_text(str(os.getpid()))
    written.replace(marker)
    resume = Path(os.environ.get("PAUSE_RESUME", "/nonexistent"))
    deadline = time.monotonic() + 120
    while not resume.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


event.listen(sa.Engine, "before_cursor_execute", _pause)

if os.environ.get("STOP_DELAY"):
    from sync import interrupt

    _stop_now = interrupt.Scope.stop

    def _stop_late(self: interrupt.Scope) -> None:
        time.sleep(float(os.environ["STOP_DELAY"]))
        _stop_now(self)

    interrupt.Scope.stop = _stop_late  # type: ignore[method-assign]

if __name__ == "__main__":
    from sync.cli import main

    sys.exit(main(sys.argv[1:]))
