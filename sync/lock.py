"""A lease lock per account in `sync_locks`: taken before a run, renewed while it runs."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from sync.errors import LockHeld, LockLost
from sync.models import sync_locks

log = logging.getLogger(__name__)


def make_owner() -> str:
    """`host:pid:token`: who holds a lease; the token tells a reused pid apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _holder_is_dead(owner: str) -> bool:
    # Only a holder on this host can be checked; elsewhere the lease must expire.
    try:
        host, pid_text, _token = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname() or pid <= 0:
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
        if not self._insert(now):
            self._take_over(now)
        self._start_renewing()

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

    def _take_over(self, now: datetime) -> None:
        with self.engine.begin() as conn:
            row = conn.execute(
                select(sync_locks).where(sync_locks.c.account == self.account)
            ).one_or_none()
        if row is None:
            # Released between our insert and this read: one more plain try.
            if self._insert(now):
                return
            raise LockHeld(
                f"another run for account {self.account} started at the same moment; "
                "nothing was changed"
            )
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
        """Inside the data transaction: renew the lease, or raise LockLost if it was taken."""
        now = self.clock()
        renewed = conn.execute(
            update(sync_locks)
            .where(sync_locks.c.account == self.account, sync_locks.c.owner == self.owner)
            .values(expires_at=now + self.ttl)
        ).rowcount
        if renewed != 1:
            raise LockLost(
                f"the lock of account {self.account} expired and another run took it over "
                "before this one could commit; nothing was changed (raise sync.lock_ttl_seconds "
                "if runs take longer than it)"
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
                    with self.engine.begin() as conn:
                        self.check(conn)
                except LockLost as exc:
                    log.error("%s", exc)
                    return
                except SQLAlchemyError as exc:
                    log.warning("could not renew the lock of account %s: %s", self.account, exc)

        self._renewer = threading.Thread(target=renew, name=f"lease-{self.account}", daemon=True)
        self._renewer.start()


def _describe(owner: str) -> str:
    try:
        host, pid, _token = owner.rsplit(":", 2)
    except ValueError:
        return owner
    return f"{host} (pid {pid})"
