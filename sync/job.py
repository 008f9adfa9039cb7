"""One account's sync, end to end: fetch, parse, apply and record, in the right transactions."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from sync import client, redact, runs, store
from sync.config import DatabaseSettings, Settings
from sync.db import current_revision, database_error, head_revision, migrate
from sync.errors import InvalidRecordsError, MigrationRequired, SyncError, Terminated
from sync.lock import Lease
from sync.records import Listing, parse_listing
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
    notes: list[str] = field(default_factory=list)


def prepare_database(engine: Engine, database: DatabaseSettings, allow_migrate: bool) -> None:
    """Bring the schema to head, or refuse with MigrationRequired when not allowed."""
    url = database.url
    try:
        current = current_revision(engine)
        head = head_revision()
        if current == head:
            return
        if not allow_migrate:
            raise MigrationRequired(
                f"the database is at migration {current or 'none (empty)'} but this version "
                f"needs {head}; run `ideogram-sync migrate`, or drop --no-migrate"
            )
        migrate(engine, schema=database.schema)
    except SQLAlchemyError as exc:
        raise database_error(exc, url, "checking or migrating the schema") from exc
    except SyncError:
        raise
    except Exception as exc:  # Alembic's own errors, e.g. a revision we do not know
        raise MigrationRequired(
            f"cannot migrate the database: {exc}; if a newer ideogram-sync migrated it, "
            "upgrade this installation"
        ) from exc


def sync_account(
    settings: Settings,
    engine: Engine,
    *,
    body: bytes | None = None,
    allow_mass_delete: bool = False,
    clock: Callable[[], datetime] = utc_now,
) -> RunResult:
    """Sync one account under its lease: record a run, fetch (or use `body`), apply, commit."""
    account = settings.account
    url = settings.database.url
    started = time.monotonic()
    lease = Lease(engine, account, settings.sync.lock_ttl_seconds, clock)
    try:
        lease.acquire()
    except SQLAlchemyError as exc:
        raise database_error(exc, url, "taking the lock of the account") from exc
    try:
        try:
            run_id = runs.start_run(engine, account, clock())
            orphans = runs.abandon_orphans(engine, account, run_id, clock())
        except SQLAlchemyError as exc:
            raise database_error(exc, url, "recording the start of the run") from exc
        if orphans:
            log.warning(
                "marked run(s) %s of account %s abandoned: they never finished (killed or crashed)",
                ", ".join(map(str, orphans)),
                account,
            )
        log.info("run %d started for account %s", run_id, account)
        fraction = None if allow_mass_delete else settings.sync.max_delete_fraction
        counts = _run(settings, engine, lease, run_id, body, fraction, clock)
    finally:
        lease.release()
    duration = time.monotonic() - started
    log.info(
        "run %d succeeded for account %s in %.2fs: seen=%d inserted=%d updated=%d "
        "unchanged=%d deleted=%d rejected=%d",
        run_id,
        account,
        duration,
        counts.seen,
        counts.inserted,
        counts.updated,
        counts.unchanged,
        counts.deleted,
        counts.rejected,
    )
    return RunResult(run_id=run_id, account=account, counts=counts, duration_seconds=duration)


def _run(
    settings: Settings,
    engine: Engine,
    lease: Lease,
    run_id: int,
    body: bytes | None,
    max_delete_fraction: float | None,
    clock: Callable[[], datetime],
) -> Counts:
    url = settings.database.url
    listing: Listing | None = None
    try:
        if body is None:
            session = client.make_session(settings.api, settings.api.key())
            with session:
                body = client.fetch_datasets(session, settings.api)
        listing = parse_listing(body)
        _report(listing, settings.sync.on_invalid_record)
        try:
            with engine.begin() as conn:
                # Fencing: if our lease was taken over, this raises and rolls back.
                lease.check(conn)
                counts = store.apply(
                    conn, settings.account, listing, run_id, clock(), max_delete_fraction
                )
                runs.finish_run(conn, run_id, counts, clock())
        except SQLAlchemyError as exc:
            raise database_error(exc, url, "writing the datasets") from exc
    except BaseException as exc:
        _record_failure(engine, url, run_id, exc, listing, clock)
        raise
    return counts


def _report(listing: Listing, policy: str) -> None:
    for dataset_id in listing.duplicates:
        log.warning("dataset %s is listed more than once; the last entry wins", dataset_id)
    for reject in listing.rejects[:MAX_LOGGED_REJECTS]:
        where = f"dataset {reject.dataset_id}" if reject.dataset_id else f"record #{reject.index}"
        log.warning("rejected %s: %s", where, reject.reason)
    if len(listing.rejects) > MAX_LOGGED_REJECTS:
        log.warning("… and %d more rejected records", len(listing.rejects) - MAX_LOGGED_REJECTS)
    if listing.rejects and policy == "fail":
        first = listing.rejects[0]
        raise InvalidRecordsError(
            f"{len(listing.rejects)} invalid record(s) in the listing (first: "
            f"{first.dataset_id or f'record #{first.index}'}: {first.reason}) and "
            'sync.on_invalid_record = "fail"; nothing was changed'
        )


def _record_failure(
    engine: Engine,
    url: str,
    run_id: int,
    exc: BaseException,
    listing: Listing | None,
    clock: Callable[[], datetime],
) -> None:
    if isinstance(exc, SyncError):
        message = str(exc)
    elif isinstance(exc, KeyboardInterrupt):
        message = "interrupted (Ctrl-C / SIGINT)"
    elif isinstance(exc, Terminated):
        message = "interrupted (SIGTERM)"
    else:
        message = f"internal error: {type(exc).__name__}: {exc}"
    counts = Counts(seen=listing.seen, rejected=len(listing.rejects)) if listing else Counts()
    try:
        runs.fail_run(engine, run_id, redact.redact(message), counts, clock())
    except SQLAlchemyError as db_exc:
        # The database itself may be what failed; the run row then stays `running`.
        log.error(
            "could not record run %d as failed: %s",
            run_id,
            database_error(db_exc, url, "recording the failure"),
        )
