"""A lease lock per account in `sync_locks`: taken before a run, renewed while it runs."""

from __future__ import annotations

import contextvars
import functools
import hashlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Row, delete, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from sync.db import reading
from sync.errors import LockHeld, LockLost
from sync.models import sync_locks

log = logging.getLogger(__name__)


def make_owner() -> str:
    """`host:pid:scope:token`: who holds a lease; the token tells a reused pid apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{_pid_scope()}:{uuid.uuid4().hex[:8]}"


@functools.cache
def _pid_scope() -> str:
    """Where our pids mean something: this boot of this kernel and our PID namespace.

    Containers may share a hostname while each has its own PID namespace (or runs on
    another machine): a pid from another scope says nothing about a process here.
    Empty where it cannot be known (no /proc): such a holder is never called dead.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return hashlib.sha256(f"{boot} {namespace}".encode()).hexdigest()[:12]


def _holder_is_dead(owner: str) -> bool:
    # Only a holder in our own scope can be checked; any other must let its lease expire.
    # Owners written by older versions (host:pid:token) have no scope: never dead.
    try:
        host, pid_text, scope, _token = owner.split(":")
        pid = int(pid_text)
    except ValueError:
        return False
    here = _pid_scope()
    if not here or scope != here or host != socket.gethostname() or pid <= 0:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Lease:
    """The lease of one account; use `acquire()`, `check(conn)` before commit, `release()`."""

    def __init__(
        self,
        engine: Engine,
        account: str,
        ttl_seconds: float,
        clock: Callable[[], datetime],
        owner: str | None = None,
    ) -> None:
        self.engine = engine
        self.account = account
        self.ttl = timedelta(seconds=ttl_seconds)
        self.clock = clock
        self.owner = owner or make_owner()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease, or take over a dead holder's; raise LockHeld if a live run has it."""
        now = self.clock()
        # Look before writing: a live holder is found by a plain read, which never waits
        # for the holder's open transaction (an INSERT over its row could, and on SQLite
        # any write queues behind the holder's write transaction).
        row = self._holder()
        if row is None:
            if self._insert(now):
                self._start_renewing()
                return
            row = self._holder()
            if row is None:
                # Released between our insert and this read.
                raise LockHeld(
                    f"another run for account {self.account} started at the same moment; "
                    "nothing was changed"
                )
        self._take_over(row, now)
        self._start_renewing()

    def _holder(self) -> Row[Any] | None:
        with reading(self.engine).connect() as conn:
            return conn.execute(
                select(sync_locks).where(sync_locks.c.account == self.account)
            ).one_or_none()

    def _insert(self, now: datetime) -> bool:
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(sync_locks).values(
                        account=self.account,
                        owner=self.owner,
                        acquired_at=now,
                        expires_at=now + self.ttl,
                    )
                )
        except IntegrityError:
            return False
        return True

    def _take_over(self, row: Row[Any], now: datetime) -> None:
        expired = row.expires_at <= now
        dead = _holder_is_dead(row.owner)
        if not (expired or dead):
            raise LockHeld(
                f"another run for account {self.account} is in progress: the lock is held by "
                f"{_describe(row.owner)} since {row.acquired_at:%Y-%m-%d %H:%M:%S} UTC "
                f"(lease until {row.expires_at:%H:%M:%S} UTC); nothing was changed"
            )
        # Compare-and-swap on the old owner: of several contenders exactly one wins.
        with self.engine.begin() as conn:
            taken = conn.execute(
                update(sync_locks)
                .where(sync_locks.c.account == self.account, sync_locks.c.owner == row.owner)
                .values(owner=self.owner, acquired_at=now, expires_at=now + self.ttl)
            ).rowcount
        if taken != 1:
            raise LockHeld(
                f"another run for account {self.account} took over the expired lock first; "
                "nothing was changed"
            )
        why = "its process no longer exists" if dead else "its lease expired"
        log.warning(
            "took over the lock of account %s from %s: %s", self.account, _describe(row.owner), why
        )

    def check(self, conn: Connection) -> None:
        """Inside the data transaction: raise LockLost if another run took the lease over.

        Only reads: a write would hold the lease row locked until the commit, and a
        second run would queue behind it instead of exiting 5. Reading is enough, because
        the data transaction holds the write lock: a run that took over cannot commit
        before this one ends, and one that committed before it began is seen here.
        """
        owner = conn.execute(
            select(sync_locks.c.owner).where(sync_locks.c.account == self.account)
        ).scalar()
        if owner != self.owner:
            raise LockLost(
                f"the lock of account {self.account} expired and another run took it over "
                "before this one could commit; nothing was changed (raise sync.lock_ttl_seconds "
                "if runs take longer than it)"
            )

    def renew(self) -> None:
        """Push the lease's expiry on, in a transaction of its own; LockLost if it was taken."""
        with self.engine.begin() as conn:
            renewed = conn.execute(
                update(sync_locks)
                .where(sync_locks.c.account == self.account, sync_locks.c.owner == self.owner)
                .values(expires_at=self.clock() + self.ttl)
            ).rowcount
        if renewed != 1:
            raise LockLost(
                f"the lock of account {self.account} expired and another run took it over"
            )

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    delete(sync_locks).where(
                        sync_locks.c.account == self.account, sync_locks.c.owner == self.owner
                    )
                )
        except SQLAlchemyError as exc:
            # It expires on its own; the next run takes it over then.
            log.warning("could not release the lock of account %s: %s", self.account, exc)

    def _start_renewing(self) -> None:
        interval = max(self.ttl.total_seconds() / 3, 0.5)

        def renew() -> None:
            while not self._stop.wait(interval):
                try:
                    self.renew()
                except LockLost as exc:
                    log.error("%s", exc)
                    return
                except SQLAlchemyError as exc:
                    log.warning("could not renew the lock of account %s: %s", self.account, exc)

        # In a copy of the caller's context: its log lines are about the caller's run.
        self._renewer = threading.Thread(
            target=contextvars.copy_context().run,
            args=(renew,),
            name=f"lease-{self.account}",
            daemon=True,
        )
        self._renewer.start()


def _describe(owner: str) -> str:
    parts = owner.split(":")
    if len(parts) < 3:
        return owner
    return f"{parts[0]} (pid {parts[1]})"
