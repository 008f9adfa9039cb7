"""`ideogram-sync daemon`: sync every account on a schedule until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from datetime import UTC, datetime
from types import FrameType

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.blocking import BlockingScheduler
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from sync import interrupt, notify
from sync.config import Settings, resource_suffix
from sync.db import open_engine, reading
from sync.errors import EXIT_FAILED, EXIT_OK, Cancelled, SyncError
from sync.job import prepare_database, sync_accounts
from sync.metrics import Metrics, serve
from sync.models import datasets, models
from sync.runs import last_successes
from sync.schedule import Schedule
from sync.status_page import StatusPage

log = logging.getLogger(__name__)

JOB_ID = "sync"
MAX_STARTUP_BACKOFF = 60.0
# After the grace period the run is aborted: its database statements are cancelled (their
# connections cut if the database does not answer) and it stops at its next safe point.
# Past this the process exits anyway. Service managers' stop timeouts must exceed grace + this.
ABORT_WAIT_SECONDS = 10.0


class Daemon:
    """The scheduler, its one job, the shutdown logic and the metrics server."""

    def __init__(self, settings: Settings, allow_migrate: bool = True) -> None:
        self.settings = settings
        self.allow_migrate = allow_migrate
        self.schedule = Schedule(settings.schedule)
        # Every account's series exist from start-up (at 0), before its first run.
        self.metrics = Metrics(
            (account.name for account in settings.accounts), settings.sync.resources
        )
        self.stopping = threading.Event()  # no new runs
        self.cancel = threading.Event()  # abort the running one
        self.idle = threading.Event()
        self.idle.set()
        self.scheduler = BlockingScheduler(timezone=UTC)
        self.engine: Engine | None = None

    # -- life cycle ------------------------------------------------------------------

    def run(self) -> int:
        """Run until a signal; returns the exit code (0 after a clean shutdown)."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        server = None
        try:
            self.engine = self._connect()
            if self.engine is None:
                return EXIT_OK  # stopped while waiting for the database
            self._load_gauges()
            if self.settings.metrics.port:
                page = StatusPage(
                    self.engine,
                    self.settings,
                    self.schedule.describe(),
                    next_slot=self.next_slot,
                    stopping=self.stopping.is_set,
                )
                server = serve(
                    self.settings.metrics.host,
                    self.settings.metrics.port,
                    self.metrics,
                    self.health,
                    page,
                )
            self._schedule_job()
            if not self.stopping.is_set():
                self.scheduler.start()  # blocks until shutdown
            self._finish_current_run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if server is not None:
                server.shutdown()
                server.server_close()
            if self.engine is not None:
                self.engine.dispose()
        log.info("daemon stopped", extra={"event": "daemon_stopped"})
        return EXIT_OK

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.stopping.is_set():
            log.warning("%s again: aborting the running sync now", name)
            self._abort()
            return
        log.info(
            "%s: no new runs; letting a running sync finish for up to %gs",
            name,
            self.settings.schedule.shutdown_grace_seconds,
            extra={"event": "daemon_stopping"},
        )
        self.stopping.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def _finish_current_run(self) -> None:
        grace = self.settings.schedule.shutdown_grace_seconds
        if self.idle.wait(grace):
            return
        log.warning("the running sync did not finish within %gs; aborting it", grace)
        self._abort()
        # It stops at its next safe point (rollback, run recorded failed).
        if self.idle.wait(ABORT_WAIT_SECONDS):
            return
        # Only a database that answers nothing at all gets here. Ending the process is what
        # kill -9 would do: nothing was committed, and the next run marks the run abandoned.
        log.error(
            "the aborted sync did not stop within %gs (the database does not answer); "
            "exiting now. Nothing was committed; the next run marks it abandoned",
            ABORT_WAIT_SECONDS,
        )
        logging.shutdown()
        os._exit(EXIT_FAILED)

    def _abort(self) -> None:
        """Stop the running sync: at its next safe point, and inside the database now."""
        self.cancel.set()
        threading.Thread(target=interrupt.stop_everything, name="abort", daemon=True).start()

    def _connect(self) -> Engine | None:
        """Engine plus migrations; on failure retry with backoff instead of crash-looping."""
        delay = 1.0
        database = self.settings.database
        while not self.stopping.is_set():
            engine = None
            try:
                engine = open_engine(database)
                prepare_database(engine, database, self.allow_migrate)
                return engine
            except SyncError as exc:
                if engine is not None:
                    engine.dispose()
                if exc.exit_code == 2:  # configuration: retrying cannot help
                    raise
                log.error("database not ready: %s; retrying in %.0fs", exc, delay)
            self.stopping.wait(delay)
            delay = min(delay * 2, MAX_STARTUP_BACKOFF)
        return None

    # -- the job ------------------------------------------------------------------

    def _schedule_job(self) -> None:
        interval = self.schedule.interval or 3600
        first = datetime.now(UTC) if self.settings.schedule.run_on_start else None
        options = {"next_run_time": first} if first else {}
        self.scheduler.add_job(
            self.tick,
            self.schedule.trigger(),
            id=JOB_ID,
            max_instances=1,
            coalesce=True,
            # A slot missed by less than about one interval still runs (once: coalesce).
            misfire_grace_time=max(int(interval), 1),
            **options,
        )
        self.scheduler.add_listener(self._on_skipped, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        accounts = ", ".join(a.name for a in self.settings.accounts)
        log.info(
            "daemon started: %s for account(s) %s%s",
            self.schedule.describe(),
            accounts,
            "; first run now" if first else "",
            extra={"event": "daemon_started"},
        )

    def tick(self) -> None:
        """One scheduled slot: every account, each under its own lock; never raises."""
        # Busy before looking at `stopping`: a signal in between then finds the slot busy and
        # waits for it, instead of disposing of the engine under a run that starts anyway.
        self.idle.clear()
        try:
            if self.stopping.is_set():
                return
            slot = self.schedule.slot_for(datetime.now(UTC))
            jitter = self.settings.schedule.jitter_seconds
            if jitter and self.stopping.wait(random.uniform(0, jitter)):  # noqa: S311
                return
            assert self.engine is not None
            outcomes = sync_accounts(
                self.settings,
                self.settings.accounts,
                self.engine,
                slot=slot,
                cancel=self.cancel,
            )
            for outcome in outcomes:
                self.metrics.record(outcome)
            if not self.stopping.is_set():  # shutting down: no more waiting on the database
                self._load_gauges()
                # Bounded ([notify] timeout_seconds and max_retries), and never raises.
                notify.after_runs(self.settings, self.engine, outcomes)
                notify.check_stale(self.settings, self.engine)
        except Cancelled:
            log.warning("the running sync was aborted for shutdown (rolled back, recorded failed)")
        except Exception:
            # A failing run never stops the daemon; the next slot runs as usual.
            log.exception("sync slot failed unexpectedly")
        finally:
            self.idle.set()
            self._log_next_run()

    def _log_next_run(self) -> None:
        when = self.next_slot()
        if when is not None:
            text = when.isoformat().replace("+00:00", "Z")
            log.info("next run at %s", text, extra={"event": "next_run", "next_run": text})

    def next_slot(self) -> datetime | None:
        """When the scheduler runs the job next (UTC); None before it starts or once stopping."""
        job = self.scheduler.get_job(JOB_ID) if self.scheduler.running else None
        if job is None or job.next_run_time is None or self.stopping.is_set():
            return None
        return job.next_run_time.astimezone(UTC)

    def _on_skipped(self, event: JobExecutionEvent) -> None:
        log.warning("a scheduled run was skipped (the previous one was still running or late)")

    # -- health and gauges ----------------------------------------------------------

    def _load_gauges(self) -> None:
        """Last success per account and resource, and active datasets and models per
        account, read from the shared database."""
        if self.engine is None:
            return
        try:
            successes = last_successes(self.engine)
            with reading(self.engine).connect() as conn:
                active = {
                    table.name: dict(
                        conn.execute(
                            select(table.c.account, func.count())
                            .where(table.c.deleted_at.is_(None))
                            .group_by(table.c.account)
                        ).all()
                    )
                    for table in (datasets, models)
                }
        except SQLAlchemyError as exc:
            log.warning("could not read metrics from the database: %s", exc)
            return
        for account in self.settings.accounts:
            for resource in self.settings.sync.resources:
                if (account.name, resource) in successes:
                    self.metrics.last_success.labels(account.name, resource).set(
                        successes[account.name, resource].timestamp()
                    )
            self.metrics.active.labels(account.name).set(active["datasets"].get(account.name, 0))
            if "models" in self.settings.sync.resources:
                self.metrics.models_active.labels(account.name).set(
                    active["models"].get(account.name, 0)
                )

    def health(self) -> tuple[bool, str]:
        """(healthy, reason): the scheduler runs and every account synced each of its
        resources within max_age."""
        if self.stopping.is_set() or not self.scheduler.running:
            return False, "scheduler is not running"
        max_age = self.settings.schedule.max_age_seconds
        if max_age is None:
            return True, "ok"
        assert self.engine is not None
        try:
            successes = last_successes(self.engine)
        except SQLAlchemyError:
            return False, "database unreachable"
        now = datetime.now(UTC)
        stale = []
        for account in self.settings.accounts:
            for resource in self.settings.sync.resources:
                label = account.name + resource_suffix(resource)
                success = successes.get((account.name, resource))
                if success is None:
                    stale.append(f"{label}: no successful sync yet")
                elif (age := (now - success).total_seconds()) > max_age:
                    stale.append(f"{label}: last success {age:.0f}s ago (max_age {max_age:g}s)")
        return (False, "; ".join(stale)) if stale else (True, "ok")
