"""One account's sync, end to end: for each resource, fetch, parse, apply and record, in
the right transactions."""

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

from sync import (
    __version__,
    client,
    detail_fetch,
    details,
    interrupt,
    logs,
    records,
    redact,
    runs,
    store,
)
from sync.config import Account, DatabaseSettings, Settings, resource_suffix
from sync.db import (
    SCHEMA_HEAD,
    current_revision,
    database_error,
    migrate,
    reading,
    refuse_newer,
    write_transaction,
)
from sync.errors import (
    ApiError,
    AuthError,
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
from sync.model_records import DATASET_DETAILS, MODEL_DETAILS, MODELS
from sync.records import DATASETS
from sync.resource import Details, Resource
from sync.store import Counts

log = logging.getLogger(__name__)

# Enough reject lines to diagnose a bad listing without flooding the log.
MAX_LOGGED_REJECTS = 20

# Told how far a details fetch is: (what is fetched, done, total); see output.Progress.
Progress = Callable[[str, int, int], None]


def utc_now() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)


@dataclass
class RunResult:
    """What one successful run did: the run row's id, its counts and how long it took."""

    run_id: int
    account: str
    counts: Counts
    duration_seconds: float
    resource: str = "datasets"


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
    progress: Progress | None = None,
) -> list[Outcome]:
    """Sync one account's resources under its lease, each a run of its own; an Outcome each.

    Each resource (`sync.resources`; only `datasets` with `body`) records its run, commits
    or fails on its own: one's failure costs only that resource and those built on it.
    With a schedule `slot`, returns one empty Outcome without syncing when another replica
    already synced that slot. Setting `cancel` stops the run at its next safe point.
    Raises SyncError for what stops the whole account (its lock held, no API key).
    """
    # A missing key is a configuration error: found before any lock or run row.
    api_key = account.api.key() if body is None else None
    names = ("datasets",) if body is not None else settings.sync.resources
    with (
        logs.about_run(account.name) as log_fields,
        interrupt.scope(f"the run of account {account.name}") as statements,
        interrupt.Deadline(settings.sync.deadline_seconds, statements) as deadline,
    ):
        stop = _Stop(cancel, deadline.expired, settings.sync.deadline_seconds)
        lease = Lease(engine, account.name, settings.sync.lock_ttl_seconds, clock)
        try:
            lease.acquire()
        except SQLAlchemyError as exc:
            error = database_error(exc, settings.database.url, "taking the lock of the account")
            raise stop.explain(error) from exc
        try:
            if slot is not None and _slot_taken(settings, engine, account, slot, stop):
                return [Outcome(account.name, names[0])]
            job = _Job(settings, account, engine, lease, api_key, stop, clock, log_fields)
            job.body, job.prefetched, job.progress = body, prefetched, progress
            if allow_mass_delete:
                job.max_delete_fraction = None
            outcomes: list[Outcome] = []
            failed: set[str] = set()
            for name in names:
                needs = NEEDS.get(name)
                if needs in failed:
                    log.warning(
                        "%s of account %s not synced: its %s run failed",
                        name,
                        account.name,
                        needs,
                    )
                    failed.add(name)
                    continue
                if stop.is_set():  # stopped or past the deadline: the rest would fail at once
                    log.warning(
                        "%s and the resources after it of account %s are not synced: the run "
                        "was stopped or passed sync.deadline_seconds",
                        name,
                        account.name,
                    )
                    break
                outcome = job.run(name, slot)
                outcomes.append(outcome)
                if outcome.error is not None:
                    failed.add(name)
                if isinstance(outcome.error, AuthError):
                    # The key itself was refused: every other endpoint would refuse it too.
                    log.warning(
                        "the other resources of account %s are not synced: the API rejected "
                        "its key",
                        account.name,
                    )
                    break
            return outcomes
        finally:
            lease.release()


def _slot_taken(
    settings: Settings, engine: Engine, account: Account, slot: datetime, stop: _Stop
) -> bool:
    try:
        taken = runs.slot_taken(engine, account.name, slot)
    except SQLAlchemyError as exc:
        error = database_error(exc, settings.database.url, "recording the start of the run")
        raise stop.explain(error) from exc
    if taken:
        log.info(
            "slot %s of account %s was already synced (by another replica); skipping",
            slot.isoformat(),
            account.name,
        )
    return taken


# A resource whose run is skipped when the run of the one it builds on failed.
NEEDS = {"dataset_details": "datasets", "model_details": "models"}
LISTINGS: dict[str, Resource] = {"datasets": DATASETS, "models": MODELS}
DETAILS: dict[str, Details] = {"dataset_details": DATASET_DETAILS, "model_details": MODEL_DETAILS}


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


class _Job:
    """One account's resources, one run each, under the lease the caller holds.

    `body` (run --input), `prefetched` (the datasets listing's download, started early) and
    `progress` are set by sync_account when it has them.
    """

    body: bytes | None = None
    prefetched: client.PendingFetch | None = None
    progress: Progress | None = None

    def __init__(
        self,
        settings: Settings,
        account: Account,
        engine: Engine,
        lease: Lease | None,
        api_key: str | None,
        stop: _Stop,
        clock: Callable[[], datetime],
        log_fields: dict[str, object],
    ) -> None:
        self.settings = settings
        self.account = account
        self.engine = engine
        self.lease = lease
        self.api_key = api_key
        self.stop = stop
        self.clock = clock
        self.log_fields = log_fields
        self.url = settings.database.url
        self.max_delete_fraction = settings.sync.max_delete_fraction
        # Details fetched after this are left for the next run: what was fetched by then is
        # written within the deadline (a first sync of a large account spans a few runs).
        self.fetch_until = time.monotonic() + settings.sync.deadline_seconds * 0.75

    def run(self, name: str, slot: datetime | None) -> Outcome:
        """Record a run of resource `name`, do it, and record how it ended."""
        started = time.monotonic()
        account = self.account.name
        try:
            run_id = runs.start_run(
                self.engine, account, self.clock(), scheduled_for=slot, resource=name
            )
        except SQLAlchemyError as exc:
            error = database_error(exc, self.url, "recording the start of the run")
            raise self.stop.explain(error) from exc
        self.log_fields["run_id"] = run_id
        # The run row exists from here on, so every way out must record how the run ended:
        # the try starts right after it (only a signal inside start_run's own return, after
        # the commit, can still leave the row `running`; the next run marks it abandoned).
        progress = _Progress()
        try:
            log.info("run %d started for account %s%s", run_id, account, resource_suffix(name))
            self._abandon_orphans(run_id)
            self.stop.check()
            if name in LISTINGS:
                counts = self._listing(LISTINGS[name], run_id, progress)
            else:
                counts = self._details(DETAILS[name], run_id, progress)
        except BaseException as exc:
            failure = self.stop.explain(exc)
            if self.stop.is_set() or interrupt.stopping() or _signalled(exc):
                interrupt.settle()  # or the stop's cancel could land on the record below
            _record_failure(self.engine, self.url, run_id, failure, progress.applied, self.clock)
            if isinstance(failure, SyncError):
                return _failed(account, name, failure, run_id)
            if isinstance(failure, Exception):  # a bug must not take the other resources down
                error = SyncError(f"unexpected error: {type(exc).__name__}: {exc}")
                return _failed(account, name, error, run_id)
            if failure is exc:
                raise
            raise failure from exc
        duration = time.monotonic() - started
        _log_success(run_id, account, name, counts, duration)
        result = RunResult(run_id, account, counts, duration, name)
        return Outcome(account, name, result=result, run_id=run_id)

    def _abandon_orphans(self, run_id: int) -> None:
        try:
            orphans = runs.abandon_orphans(self.engine, self.account.name, run_id, self.clock())
        except SQLAlchemyError as exc:
            raise database_error(exc, self.url, "checking for abandoned runs") from exc
        if orphans:
            log.warning(
                "marked run(s) %s of account %s abandoned: they never finished (killed or crashed)",
                ", ".join(map(str, orphans)),
                self.account.name,
            )

    def preview(self, name: str) -> ResourcePreview:
        """What a run of resource `name` would do, without writing (see preview_account)."""
        account = self.account.name
        if name in DETAILS:
            max_age = self.settings.sync.details_max_age_seconds
            try:
                with reading(self.engine).connect() as conn:
                    due = details.due(conn, DETAILS[name], account, self.clock(), max_age)
            except SQLAlchemyError as exc:
                raise database_error(exc, self.url, f"reading the stored {name}") from exc
            return ResourcePreview(account, name, due=len(due))
        resource = LISTINGS[name]
        with self._fetch_listing(resource) as fetched:
            self.stop.check()
            try:
                # The stored state is read as of one moment, and nothing is locked.
                with reading(self.engine).connect() as conn, conn.begin():
                    previewed = store.preview(
                        conn,
                        resource,
                        account,
                        ListingStream(fetched.file, key=resource.listing_key),
                        self.max_delete_fraction,
                    )
            except SQLAlchemyError as exc:
                raise database_error(exc, self.url, f"reading the stored {name}") from exc
        applied = store.Applied(previewed.counts, previewed.rejects, [], True)
        try:
            _report(resource.noun, applied, self.settings.sync.on_invalid_record)
        except InvalidRecordsError as exc:
            return ResourcePreview(account, name, previewed, error=exc)
        return ResourcePreview(account, name, previewed, error=previewed.refused)

    def _fetch_listing(self, resource: Resource) -> client.Body:
        if self.body is not None:
            return client.Body.from_bytes(self.body)
        if self.prefetched is not None and resource.path == client.DATASETS_PATH:
            return self.prefetched.result(self.stop)
        assert self.api_key is not None
        api = self.account.api
        try:
            with client.make_session(api, self.api_key) as session:
                return client.fetch_datasets(session, api, self.stop, path=resource.path)
        except ApiError as exc:
            raise _refused(resource.name, resource.path, exc) from None

    def _listing(self, resource: Resource, run_id: int, progress: _Progress) -> Counts:
        settings, account = self.settings, self.account.name
        with self._fetch_listing(resource) as fetched:
            self.stop.check()
            digest = listing_digest(fetched.sha256, settings.sync.on_invalid_record)
            try:
                with write_transaction(self.engine) as conn:
                    # Fencing: if our lease was taken over, this raises and rolls back.
                    assert self.lease is not None  # only a dry run has none, and never writes
                    self.lease.check(conn)
                    same = runs.unchanged_since(conn, account, digest, resource.name)
                    if same is not None:
                        # Byte for byte what the tables already hold: nothing to diff.
                        log.info(
                            "the %s listing of account %s is unchanged since run %d; "
                            "nothing to write",
                            resource.noun,
                            account,
                            same[0],
                        )
                        applied = progress.applied = store.Applied(same[1], [], [], True)
                        runs.finish_run(conn, run_id, same[1], self.clock(), digest)
                        return applied.counts
                    applied = progress.applied = store.apply(
                        conn,
                        resource,
                        account,
                        ListingStream(fetched.file, key=resource.listing_key),
                        run_id,
                        self.clock(),
                        self.max_delete_fraction,
                        self.stop.check,
                    )
                    _report(resource.noun, applied, settings.sync.on_invalid_record)
                    runs.finish_run(conn, run_id, applied.counts, self.clock(), digest)
                    self.stop.check()
                return applied.counts
            except SQLAlchemyError as exc:
                raise database_error(exc, self.url, f"writing the {resource.name}") from exc

    def _details(self, described: Details, run_id: int, progress: _Progress) -> Counts:
        settings, account = self.settings, self.account.name
        noun = described.listing.noun
        now = self.clock()
        try:
            with reading(self.engine).connect() as conn:
                stored = details.due(
                    conn, described, account, now, settings.sync.details_max_age_seconds
                )
        except SQLAlchemyError as exc:
            raise database_error(exc, self.url, f"choosing the {noun} details to fetch") from exc
        assert self.api_key is not None
        show = None
        if self.progress is not None and stored:
            label, report = f"{described.name} of {account}", self.progress

            def show(done: int, total: int) -> None:
                report(label, done, total)

        endpoint = described.path.format("{id}")
        try:
            fetched = detail_fetch.fetch_each(
                self.account.api,
                self.api_key,
                described.path,
                list(stored),
                settings.sync.details_concurrency,
                self.stop,
                show,
                until=self.fetch_until,
            )
        except ApiError as exc:
            raise _refused(described.name, endpoint, exc) from None
        finally:
            if show is not None:
                show(-1, len(stored))  # ends the progress line, whatever happened
        self.stop.check()
        if fetched and all(
            isinstance(body, detail_fetch.Failed) and body.status == 403 for _, body in fetched
        ):
            # Every item refused: the key may not use the endpoint at all.
            raise _refused(described.name, endpoint, ApiError("refused", 403))
        if len(fetched) < len(stored):
            log.warning(
                "fetched the details of %d of the %d %ss due of account %s before 3/4 of "
                "sync.deadline_seconds had passed; the others are due at the next run",
                len(fetched),
                len(stored),
                noun,
                account,
            )
        try:
            with write_transaction(self.engine) as conn:
                assert self.lease is not None  # only a dry run has none, and never writes
                self.lease.check(conn)
                applied = details.apply(
                    conn, described, account, stored, fetched, run_id, now, self.stop.check
                )
                progress.applied = store.Applied(applied.counts, applied.rejects, [], True)
                if applied.missing:
                    log.info(
                        "%d %s(s) of account %s were gone (404) when their details were "
                        "asked for; the next listing settles them: %s",
                        len(applied.missing),
                        noun,
                        account,
                        ", ".join(applied.missing[:MAX_LOGGED_REJECTS]),
                    )
                _report(f"{noun} details of", progress.applied, settings.sync.on_invalid_record)
                runs.finish_run(conn, run_id, applied.counts, self.clock())
                self.stop.check()
            return applied.counts
        except SQLAlchemyError as exc:
            raise database_error(exc, self.url, f"writing the {noun} details") from exc


@dataclass
class ResourcePreview:
    """What a run of one account's resource would do (run --dry-run), or how it would fail."""

    account: str
    resource: str
    # A listing's diff, or for details how many rows' details are due now.
    preview: store.Preview | None = None
    due: int | None = None
    error: SyncError | None = None


def preview_account(
    settings: Settings,
    account: Account,
    engine: Engine,
    *,
    body: bytes | None = None,
    allow_mass_delete: bool = False,
    clock: Callable[[], datetime] = utc_now,
) -> list[ResourcePreview]:
    """What a run of the account would change, resource by resource: fetched (or `body`),
    parsed and diffed as a run would, in read transactions only. It writes nothing, records
    no run and takes no lock. Raises SyncError for what stops the whole account."""
    api_key = account.api.key() if body is None else None
    names = ("datasets",) if body is not None else settings.sync.resources
    results: list[ResourcePreview] = []
    with (
        logs.about_run(account.name) as log_fields,
        interrupt.scope(f"the dry run of account {account.name}") as statements,
        interrupt.Deadline(settings.sync.deadline_seconds, statements) as deadline,
    ):
        stop = _Stop(None, deadline.expired, settings.sync.deadline_seconds)
        job = _Job(settings, account, engine, None, api_key, stop, clock, log_fields)
        job.body = body
        if allow_mass_delete:
            job.max_delete_fraction = None
        for name in names:
            try:
                result = job.preview(name)
            except BaseException as exc:
                failure = stop.explain(exc)
                if not isinstance(failure, SyncError):
                    raise
                result = ResourcePreview(account.name, name, error=failure)
            results.append(result)
    return results


def _refused(name: str, path: str, exc: ApiError) -> ApiError:
    """For a resource the run could do without, a refusal names the setting that turns it off."""
    if name == "datasets" or exc.status not in (401, 403, 404):
        return exc
    return ApiError(
        f"the Ideogram API refused GET {path} (HTTP {exc.status}): this key cannot use it. "
        f'Remove "{name}" from [sync] resources (or IDEOGRAM_SYNC_RESOURCES) to stop syncing '
        "it; the other resources are not affected",
        exc.status,
    )


def _failed(account: str, name: str, error: SyncError, run_id: int | None = None) -> Outcome:
    # Another run holding the lock is routine (cron overlap, replicas), not an error.
    log.log(
        logging.WARNING if isinstance(error, LockHeld) else logging.ERROR,
        "run failed for account %s%s: %s",
        account,
        resource_suffix(name),
        error,
        extra={"account": account, "resource": name, "error": str(error), "event": "run_failed"},
    )
    log.debug("traceback of the failure of account %s", account, exc_info=True)
    return Outcome(account, name, error=error, run_id=run_id)


def _log_success(run_id: int, account: str, name: str, counts: Counts, duration: float) -> None:
    log.info(
        "run %d succeeded for account %s%s in %.2fs: seen=%d inserted=%d updated=%d "
        "unchanged=%d deleted=%d rejected=%d",
        run_id,
        account,
        resource_suffix(name),
        duration,
        counts.seen,
        counts.inserted,
        counts.updated,
        counts.unchanged,
        counts.deleted,
        counts.rejected,
        extra={
            "account": account,
            "resource": name,
            "run_id": run_id,
            "duration_s": round(duration, 3),
            "counts": asdict(counts),
            "event": "run_succeeded",
        },
    )


@dataclass
class Outcome:
    """How one account's run of one resource ended: a result or an error (neither: the
    slot was already synced)."""

    account: str
    resource: str = "datasets"
    result: RunResult | None = None
    error: SyncError | None = None
    run_id: int | None = None  # the run's row, if it got one


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
    progress: Progress | None = None,
) -> list[Outcome]:
    """Sync several accounts, up to sync.max_workers at once; one's failure spares the rest.

    Returns an Outcome per account and resource. `prefetched`: downloads already started
    (client.start_fetch), by account name.
    """
    cancel = cancel or threading.Event()

    def one(account: Account) -> list[Outcome]:
        # Around sync_account's own: the failure line below still carries the run id.
        with logs.about_run(account.name):
            return _one(account)

    def _one(account: Account) -> list[Outcome]:
        try:
            return sync_account(
                settings,
                account,
                engine,
                body=body,
                allow_mass_delete=allow_mass_delete,
                slot=slot,
                cancel=cancel,
                prefetched=(prefetched or {}).get(account.name),
                progress=progress,
            )
        except SyncError as exc:
            error = exc
        except Exception as exc:  # a bug must not take the other accounts down
            error = SyncError(f"unexpected error: {type(exc).__name__}: {exc}")
        first = "datasets" if body is not None else settings.sync.resources[0]
        return [_failed(account.name, first, error)]

    if len(accounts) == 1:
        # In the calling (main) thread, so a signal interrupts even a blocking call.
        return one(accounts[0])
    workers = min(settings.sync.max_workers, len(accounts))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sync") as pool:
        futures = [pool.submit(one, account) for account in accounts]
        try:
            return [outcome for future in futures for outcome in future.result()]
        except BaseException:
            # SIGTERM or Ctrl-C in the waiting thread: stop every run at its next safe point.
            cancel.set()
            wait(futures)
            raise


@dataclass
class _Progress:
    """What a run has learnt so far: its failed row reports the counts of a listing read."""

    applied: store.Applied | None = None


def listing_digest(body_sha256: str, policy: str) -> str:
    """A digest of the listing body, salted with what else decides how it is stored."""
    # Another version of the tool or of its parse rules, schema or reject policy could
    # store the same bytes differently, so they are part of the digest.
    salt = f"{__version__}|{records.HASH_VERSION}|{SCHEMA_HEAD}|{policy}|{body_sha256}"
    return hashlib.blake2b(salt.encode(), digest_size=16).hexdigest()


def _report(noun: str, applied: store.Applied, policy: str) -> None:
    for key in applied.duplicates[:MAX_LOGGED_REJECTS]:
        log.warning("%s %s is listed more than once; the last entry wins", noun, key)
    for reject in applied.rejects[:MAX_LOGGED_REJECTS]:
        where = f"{noun} {reject.dataset_id}" if reject.dataset_id else f"record #{reject.index}"
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


def _signalled(exc: BaseException) -> bool:
    """Whether `exc` is a signal's (SIGTERM, Ctrl-C), whose handler also stops the run."""
    return isinstance(exc, Terminated | KeyboardInterrupt)


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
