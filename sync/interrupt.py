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

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import ExceptionContext

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
    """One run's statements in flight, on whichever thread and connection they execute."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._lock = threading.Lock()
        self._executing: dict[int, tuple[Any, Engine]] = {}

    def _started(self, dbapi_connection: Any, engine: Engine) -> None:
        with self._lock:
            self._executing[id(dbapi_connection)] = (dbapi_connection, engine)

    def _ended(self, dbapi_connection: Any) -> None:
        with self._lock:
            self._executing.pop(id(dbapi_connection), None)

    def executing(self) -> list[tuple[Any, Engine]]:
        """The connections that are inside a statement right now."""
        with self._lock:
            return list(self._executing.values())

    def stop(self) -> None:
        """Cancel every statement in flight; cut the connections that do not come back."""
        cancelled = self.executing()
        for dbapi_connection, engine in cancelled:
            try:
                _cancel(dbapi_connection, engine)
            except Exception as exc:  # the database may be what is broken
                log.debug("could not cancel a statement of %s: %s", self.label, exc)
        give_up = time.monotonic() + CUT_AFTER_SECONDS
        while time.monotonic() < give_up:
            if not any(entry in self.executing() for entry in cancelled):
                return
            time.sleep(0.05)
        for entry in self.executing():
            if entry not in cancelled:
                continue
            log.warning(
                "the database did not end a cancelled statement of %s within %gs; "
                "closing its connection",
                self.label,
                CUT_AFTER_SECONDS,
            )
            try:
                _shut_down(entry[0])
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
    """Follow `engine`'s statements: which run's Scope each belongs to, and when it ends."""

    @event.listens_for(engine, "checkout")
    def _checkout(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        # The thread that checks a connection out is the run's; a statement may then
        # execute on another thread (a background writer) and still belongs to the run.
        record.info[_KEY] = _current.get()

    @event.listens_for(engine, "before_cursor_execute")
    def _before(conn: Connection, *_args: Any) -> None:
        owner = conn.info.get(_KEY)
        if owner is not None:
            owner._started(conn.connection.dbapi_connection, engine)

    @event.listens_for(engine, "after_cursor_execute")
    def _after(conn: Connection, *_args: Any) -> None:
        _end(conn.info, conn.connection.dbapi_connection)

    @event.listens_for(engine, "handle_error")
    def _error(context: ExceptionContext) -> None:
        conn = context.connection
        if conn is not None and not conn.closed and not conn.invalidated:
            _end(conn.info, conn.connection.dbapi_connection)

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_connection: Any, record: Any) -> None:
        owner = record.info.pop(_KEY, None)
        if owner is not None and dbapi_connection is not None:
            owner._ended(dbapi_connection)

    @event.listens_for(engine, "invalidate")
    def _invalidate(dbapi_connection: Any, record: Any, _exc: Any) -> None:
        owner = record.info.get(_KEY)
        if owner is not None and dbapi_connection is not None:
            owner._ended(dbapi_connection)


def _end(info: dict[Any, Any], dbapi_connection: Any) -> None:
    owner = info.get(_KEY)
    if owner is not None:
        owner._ended(dbapi_connection)


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
