"""One account's sync, end to end: fetch, parse, apply and record, in the right transactions."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from sync import __version__, client, interrupt, logs, records, redact, runs, store
from sync.config import Account, DatabaseSettings, Settings
from sync.db import (
    SCHEMA_HEAD,
    current_revision,
    database_error,
    migrate,
    refuse_newer,
    write_transaction,
)
from sync.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidRecordsError,
    LockHeld,
    MigrationRequired,
    SyncError,
    Terminated,
)
from sync.jsonstream import ListingStream
from sync.lock import Lease
from sync.records import DATASETS
from sync.store import Counts

log = logging.getLogger(__name__)

# Enough reject lines to diagnose a bad listing without flooding the log.
MAX_LOGGED_REJECTS = 20


def utc_now() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)


@dataclass
class RunResult:
    """What `sync_account` did: the run row's id, its counts and how long it took."""

    run_id: int
    account: str
    counts: Counts
    duration_seconds: float


def prepare_database(engine: Engine, database: DatabaseSettings, allow_migrate: bool) -> None:
    """Bring the schema to head, or refuse with MigrationRequired when not allowed."""
    url = database.url
    try:
        current = current_revision(engine)
        head = SCHEMA_HEAD
        if current == head:
            return
        refuse_newer(current)
        if not allow_migrate:
            raise MigrationRequired(
                f"the database is at migration {current or 'none (empty)'} but this version "
                f"needs {head}; run `ideogram-sync migrate`, or drop --no-migrate"
            )
        migrate(engine, schema=database.schema)
    except SQLAlchemyError as exc:
        raise database_error(exc, url, "checking or migrating the schema") from exc


def sync_account(
    settings: Settings,
    account: Account,
    engine: Engine,
    *,
    body: bytes | None = None,
    allow_mass_delete: bool = False,
    slot: datetime | None = None,
    cancel: threading.Event | None = None,
    clock: Callable[[], datetime] = utc_now,
    prefetched: client.PendingFetch | None = None,
) -> RunResult | None:
    """Sync one account under its lease: record a run, fetch (or use `body`), apply, commit.

    With a schedule `slot`, returns None without syncing when another replica already
    synced that slot. Setting `cancel` stops the run at its next safe point (rollback).
    """
    started = time.monotonic()
    # A missing key is a configuration error: found before any lock or run row.
    api_key = account.api.key() if body is None else None
    with (
        logs.about_run(account.name) as log_fields,
        interrupt.scope(f"the run of account {account.name}") as statements,
        interrupt.Deadline(settings.sync.deadline_seconds, statements) as deadline,
    ):
        outcome = _under_lease(
            settings,
            account,
            engine,
            api_key,
            body,
            allow_mass_delete,
            slot,
            _Stop(cancel, deadline.expired, settings.sync.deadline_seconds),
            clock,
            prefetched,
            log_fields,
        )
    if outcome is None:
        return None
    run_id, counts = outcome
    duration = time.monotonic() - started
    log.info(
        "run %d succeeded for account %s in %.2fs: seen=%d inserted=%d updated=%d "
        "unchanged=%d deleted=%d rejected=%d",
        run_id,
        account.name,
        duration,
        counts.seen,
        counts.inserted,
        counts.updated,
        counts.unchanged,
        counts.deleted,
        counts.rejected,
        extra={
            "account": account.name,
            "run_id": run_id,
            "duration_s": round(duration, 3),
            "counts": asdict(counts),
            "event": "run_succeeded",
        },
    )
    return RunResult(run_id=run_id, account=account.name, counts=counts, duration_seconds=duration)


class _Stop:
    """Whether a run must stop at its next safe point: cancelled, or past its deadline."""

    def __init__(
        self, cancel: threading.Event | None, expired: threading.Event, deadline: float
    ) -> None:
        self._cancel = cancel
        self.expired = expired
        self.deadline = deadline

    def is_set(self) -> bool:
        """True once the run should stop."""
        return self.expired.is_set() or (self._cancel is not None and self._cancel.is_set())

    def check(self) -> None:
        """Raise Cancelled when the run should stop (the safe points between its steps)."""
        if self.is_set():
            raise Cancelled()

    def explain(self, exc: BaseException) -> BaseException:
        """What a stopped run failed with: its stop, not the error the stop caused."""
        if not isinstance(exc, SyncError | SQLAlchemyError | Cancelled) or not self.is_set():
            return exc
        if not self.expired.is_set():
            return exc if isinstance(exc, Cancelled) else Cancelled()
        return DeadlineExceeded(
            f"the run did not finish within sync.deadline_seconds ({self.deadline:g}s) and "
            "was stopped; nothing was changed. If the database was slow or waiting for a "
            "lock, see the log for what it was doing; raise the deadline only if runs of "
            "this size really take that long"
        )


def _under_lease(
    settings: Settings,
    account: Account,
    engine: Engine,
    api_key: str | None,
    body: bytes | None,
    allow_mass_delete: bool,
    slot: datetime | None,
    stop: _Stop,
    clock: Callable[[], datetime],
    prefetched: client.PendingFetch | None,
    log_fields: dict[str, object],
) -> tuple[int, Counts] | None:
    url = settings.database.url
    lease = Lease(engine, account.name, settings.sync.lock_ttl_seconds, clock)
    try:
        lease.acquire()
    except SQLAlchemyError as exc:
        raise stop.explain(database_error(exc, url, "taking the lock of the account")) from exc
    try:
        try:
            if slot is not None and runs.slot_taken(engine, account.name, slot):
                log.info(
                    "slot %s of account %s was already synced (by another replica); skipping",
                    slot.isoformat(),
                    account.name,
                )
                return None
            run_id = runs.start_run(engine, account.name, clock(), scheduled_for=slot)
            log_fields["run_id"] = run_id
        except SQLAlchemyError as exc:
            error = database_error(exc, url, "recording the start of the run")
            raise stop.explain(error) from exc
        # The run row exists from here on, so every way out must record how the run ended:
        # the try starts right after it (only a signal inside start_run's own return, after
        # the commit, can still leave the row `running`; the next run marks it abandoned).
        progress = _Progress()
        try:
            log.info("run %d started for account %s", run_id, account.name)
            fraction = None if allow_mass_delete else settings.sync.max_delete_fraction
            fetch = _fetcher(account, api_key, body, stop, prefetched)
            counts = _run(
                settings,
                account,
                engine,
                lease,
                run_id,
                fetch,
                fraction,
                stop.check,
                clock,
                progress,
            )
        except BaseException as exc:
            failure = stop.explain(exc)
            _record_failure(engine, url, run_id, failure, progress.applied, clock)
            if failure is exc:
                raise
            raise failure from exc
    finally:
        lease.release()
    return run_id, counts


@dataclass
class Outcome:
    """How one account's run ended: a result (None: slot already synced) or an error."""

    account: str
    result: RunResult | None = None
    error: SyncError | None = None


def sync_accounts(
    settings: Settings,
    accounts: Sequence[Account],
    engine: Engine,
    *,
    body: bytes | None = None,
    allow_mass_delete: bool = False,
    slot: datetime | None = None,
    cancel: threading.Event | None = None,
    prefetched: Mapping[str, client.PendingFetch] | None = None,
) -> list[Outcome]:
    """Sync several accounts, up to sync.max_workers at once; one's failure spares the rest.

    `prefetched`: downloads already started (client.start_fetch), by account name.
    """
    cancel = cancel or threading.Event()

    def one(account: Account) -> Outcome:
        # Around sync_account's own: the failure line below still carries the run id.
        with logs.about_run(account.name):
            return _one(account)

    def _one(account: Account) -> Outcome:
        try:
            result = sync_account(
                settings,
                account,
                engine,
                body=body,
                allow_mass_delete=allow_mass_delete,
                slot=slot,
                cancel=cancel,
                prefetched=(prefetched or {}).get(account.name),
            )
            return Outcome(account.name, result=result)
        except SyncError as exc:
            error = exc
        except Exception as exc:  # a bug must not take the other accounts down
            error = SyncError(f"unexpected error: {type(exc).__name__}: {exc}")
        # Another run holding the lock is routine (cron overlap, replicas), not an error.
        log.log(
            logging.WARNING if isinstance(error, LockHeld) else logging.ERROR,
            "run failed for account %s: %s",
            account.name,
            error,
            extra={"account": account.name, "error": str(error), "event": "run_failed"},
        )
        log.debug("traceback of the failure of account %s", account.name, exc_info=True)
        return Outcome(account.name, error=error)

    if len(accounts) == 1:
        # In the calling (main) thread, so a signal interrupts even a blocking call.
        return [one(accounts[0])]
    workers = min(settings.sync.max_workers, len(accounts))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sync") as pool:
        futures = [pool.submit(one, account) for account in accounts]
        try:
            return [future.result() for future in futures]
        except BaseException:
            # SIGTERM or Ctrl-C in the waiting thread: stop every run at its next safe point.
            cancel.set()
            wait(futures)
            raise


def _fetcher(
    account: Account,
    api_key: str | None,
    body: bytes | None,
    cancel: client.CancelFlag,
    prefetched: client.PendingFetch | None,
) -> Callable[[], client.Body]:
    def fetch() -> client.Body:
        if body is not None:
            return client.Body.from_bytes(body)
        if prefetched is not None:
            return prefetched.result(cancel)
        assert api_key is not None
        with client.make_session(account.api, api_key) as session:
            return client.fetch_datasets(session, account.api, cancel)

    return fetch


@dataclass
class _Progress:
    """What a run has learnt so far: its failed row reports the counts of a listing read."""

    applied: store.Applied | None = None


def _run(
    settings: Settings,
    account: Account,
    engine: Engine,
    lease: Lease,
    run_id: int,
    fetch: Callable[[], client.Body],
    max_delete_fraction: float | None,
    step: Callable[[], None],
    clock: Callable[[], datetime],
    progress: _Progress,
) -> Counts:
    url = settings.database.url
    try:
        orphans = runs.abandon_orphans(engine, account.name, run_id, clock())
    except SQLAlchemyError as exc:
        raise database_error(exc, url, "checking for abandoned runs") from exc
    if orphans:
        log.warning(
            "marked run(s) %s of account %s abandoned: they never finished (killed or crashed)",
            ", ".join(map(str, orphans)),
            account.name,
        )
    step()
    with fetch() as fetched:
        step()
        body = fetched.file
        digest = listing_digest(fetched.sha256, settings.sync.on_invalid_record)
        try:
            with write_transaction(engine) as conn:
                # Fencing: if our lease was taken over, this raises and rolls back.
                lease.check(conn)
                same = runs.unchanged_since(conn, account.name, digest)
                if same is not None:
                    # Byte for byte what the tables already hold: nothing to diff.
                    log.info(
                        "the listing of account %s is unchanged since run %d; nothing to write",
                        account.name,
                        same[0],
                    )
                    applied = progress.applied = store.Applied(same[1], [], [], complete=True)
                    runs.finish_run(conn, run_id, same[1], clock(), digest)
                    return applied.counts
                applied = progress.applied = store.apply(
                    conn,
                    DATASETS,
                    account.name,
                    ListingStream(body),
                    run_id,
                    clock(),
                    max_delete_fraction,
                    step,
                )
                _report(applied, settings.sync.on_invalid_record)
                runs.finish_run(conn, run_id, applied.counts, clock(), digest)
                step()
            return applied.counts
        except SQLAlchemyError as exc:
            raise database_error(exc, url, "writing the datasets") from exc


def listing_digest(body_sha256: str, policy: str) -> str:
    """A digest of the listing body, salted with what else decides how it is stored."""
    # Another version of the tool or of its parse rules, schema or reject policy could
    # store the same bytes differently, so they are part of the digest.
    salt = f"{__version__}|{records.HASH_VERSION}|{SCHEMA_HEAD}|{policy}|{body_sha256}"
    return hashlib.blake2b(salt.encode(), digest_size=16).hexdigest()


def _report(applied: store.Applied, policy: str) -> None:
    for dataset_id in applied.duplicates[:MAX_LOGGED_REJECTS]:
        log.warning("dataset %s is listed more than once; the last entry wins", dataset_id)
    for reject in applied.rejects[:MAX_LOGGED_REJECTS]:
        where = f"dataset {reject.dataset_id}" if reject.dataset_id else f"record #{reject.index}"
        log.warning("rejected %s: %s", where, reject.reason)
    rejected = applied.counts.rejected
    if rejected > MAX_LOGGED_REJECTS:
        log.warning("… and %d more rejected records", rejected - MAX_LOGGED_REJECTS)
    if rejected and policy == "fail":
        first = applied.rejects[0]
        raise InvalidRecordsError(
            f"{rejected} invalid record(s) in the listing (first: "
            f"{first.dataset_id or f'record #{first.index}'}: {first.reason}) and "
            'sync.on_invalid_record = "fail"; nothing was changed'
        )


def _record_failure(
    engine: Engine,
    url: str,
    run_id: int,
    exc: BaseException,
    applied: store.Applied | None,
    clock: Callable[[], datetime],
) -> None:
    if isinstance(exc, SyncError):
        message = str(exc)
    elif isinstance(exc, KeyboardInterrupt):
        message = "interrupted (Ctrl-C / SIGINT)"
    elif isinstance(exc, Terminated):
        message = "interrupted (SIGTERM)"
    elif isinstance(exc, Cancelled):
        message = "interrupted (shutting down)"
    else:
        message = f"internal error: {type(exc).__name__}: {exc}"
    # What the listing held is known once it was read in full, even if the run failed.
    known = applied.counts if applied else getattr(exc, "counts", None)
    counts = Counts(seen=known.seen, rejected=known.rejected) if known else Counts()
    try:
        runs.fail_run(engine, run_id, redact.redact(message), counts, clock())
    except (SQLAlchemyError, Cancelled) as db_exc:
        # The database itself may be what failed (or, stopping, it would have to be waited
        # for); the run row then stays `running` and the next run marks it abandoned.
        why: object = (
            "it was being stopped while another writer held the database's write lock"
            if isinstance(db_exc, Cancelled)
            else database_error(db_exc, url, "recording the failure")
        )
        log.error("could not record run %d as failed: %s", run_id, why)
