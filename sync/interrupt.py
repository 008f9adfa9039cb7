"""Stop a run's database work from another thread: cancel its statements, then cut them off.

A statement can wait where no timeout of ours runs: on a lock, or on a server process that
stopped answering (a frozen backend still has its TCP connection acknowledged by the kernel,
so neither keepalives nor its own statement_timeout end the wait). When a run passes its
deadline or the process is told to stop, each statement its connections are executing is
cancelled the way its database allows; a connection that still does not come back is shut
down under the driver, which then fails the statement with a connection error.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, event

log = logging.getLogger(__name__)

# How long a cancelled statement has to come back before its connection is cut.
CUT_AFTER_SECONDS = 3.0


class Deadline:
    """Stops a run that is still going after `seconds`: flags it, then stops its statements."""

    def __init__(self, seconds: float, scope: Scope) -> None:
        self.seconds = seconds
        self.expired = threading.Event()
        self._scope = scope
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        self.expired.set()
        log.warning(
            "%s is still going after %gs (sync.deadline_seconds): stopping it",
            self._scope.label,
            self.seconds,
        )
        self._scope.stop()


class Scope:
    """The database connections one run has checked out, whichever thread uses them."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.stopped = threading.Event()
        # Set once a stop has done its cancelling: see settle().
        self.settled = threading.Event()
        self._lock = threading.Lock()
        # One key per checkout: a connection checked in and out again is a new one here.
        self._held: dict[object, tuple[Any, Engine]] = {}

    def _checked_out(self, key: object, dbapi_connection: Any, engine: Engine) -> None:
        with self._lock:
            self._held[key] = (dbapi_connection, engine)

    def _checked_in(self, key: object) -> None:
        with self._lock:
            self._held.pop(key, None)

    def held(self) -> dict[object, tuple[Any, Engine]]:
        """The connections the run holds now (idle, or inside a statement)."""
        with self._lock:
            return dict(self._held)

    def stop(self) -> None:
        """Cancel what the run's connections execute; cut those it does not let go of."""
        try:
            self._stop()
        finally:
            self.settled.set()

    def _stop(self) -> None:
        self.stopped.set()
        # Every held connection: a cancel reaches only a statement in flight, and the
        # driver-level ones (COPY, server-side cursors) are not seen by engine events.
        stopping = self.held()
        for dbapi_connection, engine in stopping.values():
            try:
                _cancel(dbapi_connection, engine)
            except Exception as exc:  # the database may be what is broken
                log.debug("could not cancel a statement of %s: %s", self.label, exc)
        give_up = time.monotonic() + CUT_AFTER_SECONDS
        while (stuck := stopping.keys() & self.held().keys()) and time.monotonic() < give_up:
            time.sleep(0.05)
        for key in stuck:
            log.warning(
                "the database did not end the cancelled work of %s within %gs; closing its "
                "connection",
                self.label,
                CUT_AFTER_SECONDS,
            )
            try:
                _shut_down(stopping[key][0])
            except OSError as exc:
                log.debug("could not shut down a connection of %s: %s", self.label, exc)


_current: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "ideogram_sync_scope", default=None
)
_scopes: set[Scope] = set()
_scopes_lock = threading.Lock()
_KEY = "ideogram_sync_scope"


@contextlib.contextmanager
def scope(label: str) -> Iterator[Scope]:
    """Connections checked out in this block (in this thread) belong to a new Scope."""
    current = Scope(label)
    token = _current.set(current)
    with _scopes_lock:
        _scopes.add(current)
    try:
        yield current
    finally:
        _current.reset(token)
        with _scopes_lock:
            _scopes.discard(current)


def stopping() -> bool:
    """True in a run (this thread's Scope) that is being stopped: a wait should end now."""
    current = _current.get()
    return current is not None and current.stopped.is_set()


def settle(seconds: float = 2 * CUT_AFTER_SECONDS) -> None:
    """Wait (at most `seconds`) until the stop of this thread's run has done its cancelling.

    A run that ends because it is stopped calls this before recording how it ended. The stop
    runs in another thread, which on a loaded machine may start late, and would then cancel
    that record (the run row would stay `running`) instead of the work it was meant for.
    """
    current = _current.get()
    if current is not None:
        current.settled.wait(seconds)


def stop_everything() -> None:
    """Stop the statements of every run under way in this process (on SIGTERM or SIGINT)."""
    with _scopes_lock:
        scopes = list(_scopes)
    threads = [threading.Thread(target=s.stop, name="stop", daemon=True) for s in scopes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def track(engine: Engine) -> None:
    """Record which run's Scope each connection of `engine` is checked out under."""

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        # The thread that checks a connection out is the run's; the connection may then
        # be used from another thread (a background writer) and still belongs to the run.
        current = _current.get()
        if current is not None:
            key = object()
            current._checked_out(key, dbapi_connection, engine)
            record.info[_KEY] = (current, key)

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_connection: Any, record: Any) -> None:
        _release(record)

    @event.listens_for(engine, "invalidate")
    def _invalidate(_dbapi_connection: Any, record: Any, _exc: Any) -> None:
        _release(record)


def _release(record: Any) -> None:
    owner = record.info.pop(_KEY, None)
    if owner is not None:
        current, key = owner
        current._checked_in(key)


def _cancel(dbapi_connection: Any, engine: Engine) -> None:
    name = engine.dialect.name
    if name == "sqlite":
        dbapi_connection.interrupt()
    elif name == "postgresql":
        # A cancel request on a connection of its own to the server; bounded.
        dbapi_connection.cancel_safe(timeout=CUT_AFTER_SECONDS)
    elif name in ("mysql", "mariadb"):
        thread_id = dbapi_connection.thread_id()
        # Outside any scope: this connection must not be cancelled itself.
        with engine.connect() as killer:
            killer.exec_driver_sql(f"KILL QUERY {int(thread_id)}")


def _shut_down(dbapi_connection: Any) -> None:
    pgconn = getattr(dbapi_connection, "pgconn", None)
    if pgconn is not None:  # psycopg
        # A socket object of our own over a duplicate of libpq's descriptor: shutdown()
        # acts on the connection itself, and closing our duplicate leaves libpq's alone.
        with socket.socket(fileno=os.dup(pgconn.socket)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
        return
    sock = getattr(dbapi_connection, "_sock", None)  # PyMySQL
    if sock is not None:
        sock.shutdown(socket.SHUT_RDWR)
