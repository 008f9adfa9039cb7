"""The `ideogram-sync` command line: parse arguments, run a command, map errors to exit codes."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sync import __version__
from sync.config import parse_duration, resource_suffix
from sync.errors import (
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_STALE,
    EXIT_TERMINATED,
    EXIT_USAGE,
    ConfigError,
    SyncError,
    Terminated,
)
from sync.logs import about_run, configure_logging
from sync.redact import redact

if TYPE_CHECKING:  # imported lazily at run time so `--help` starts fast
    from sqlalchemy import Engine

    from sync.client import PendingFetch
    from sync.config import Account, Settings
    from sync.output import Progress

log = logging.getLogger("sync")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EPILOG = """\
exit codes:
  0    success
  1    the run failed (network, server, bad response, database)
  2    usage or configuration error (also: database behind with --no-migrate)
  3    the API rejected the key (HTTP 401/403)
  4    status --max-age: an account's last success is too old, or its last run failed
  5    another run of the same account holds the lock (nothing was changed)
  130  interrupted by Ctrl-C (SIGINT); rolled back, run recorded failed
  143  stopped by SIGTERM; rolled back, run recorded failed

environment: IDEOGRAM_API_KEY, IDEOGRAM_SYNC_DATABASE_URL, IDEOGRAM_API_BASE_URL,
IDEOGRAM_SYNC_CONFIG. Docs: README.md and docs/ in the project."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with every command and option."""
    parser = argparse.ArgumentParser(
        prog="ideogram-sync",
        description="Keep a SQL table of your Ideogram datasets current, recording every run.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_options(parser, with_defaults=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # The global options are accepted after the command too (`run --database-url URL`).
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, with_defaults=False)

    run = commands.add_parser(
        "run", parents=[common], help="sync the datasets once, then exit (for cron)"
    )
    run.add_argument(
        "--input",
        metavar="FILE",
        help="sync from a saved GET /datasets response body instead of the API ('-' for stdin)",
    )
    run.add_argument(
        "--no-migrate",
        dest="migrate",
        action="store_false",
        help="do not apply pending migrations; exit 2 if the database is behind",
    )
    run.add_argument(
        "--account",
        action="append",
        metavar="NAME",
        help="sync only this configured account (repeatable; default: every account)",
    )
    run.add_argument(
        "--allow-mass-delete",
        action="store_true",
        help="let this run soft-delete more than sync.max_delete_fraction of the datasets",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="fetch, parse and diff as a run would, print what it would change; write nothing",
    )
    run.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="with --dry-run: table for people (default), json for machines",
    )
    run.set_defaults(handler=_cmd_run)

    migrate = commands.add_parser(
        "migrate", parents=[common], help="apply pending database migrations"
    )
    migrate.set_defaults(handler=_cmd_migrate)

    status = commands.add_parser(
        "status", parents=[common], help="show the last runs of each account"
    )
    status.add_argument(
        "--limit",
        type=int,
        default=5,
        metavar="N",
        help="runs to show per account (default: 5)",
    )
    status.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="table for people (default), json for machines",
    )
    status.add_argument(
        "--max-age",
        metavar="DURATION",
        help="exit 4 when an account's last success is older (e.g. 90m, 2h) or its last run failed",
    )
    status.set_defaults(handler=_cmd_status)

    daemon = commands.add_parser(
        "daemon",
        parents=[common],
        help="sync on the [schedule] until SIGTERM/SIGINT (for systemd, Kubernetes)",
    )
    daemon.add_argument(
        "--no-migrate",
        dest="migrate",
        action="store_false",
        help="do not apply pending migrations at start; exit 2 if the database is behind",
    )
    daemon.set_defaults(handler=_cmd_daemon)

    for noun in ("datasets", "models"):
        shown = commands.add_parser(noun, parents=[common], help=f"print the synced {noun}")
        shown.add_argument(
            "--format",
            choices=("table", "csv", "json"),
            default="table",
            help="table (default), csv or json (csv and json carry every column)",
        )
        shown.add_argument(
            "--include-deleted",
            action="store_true",
            help=f"include {noun} that are soft-deleted (deleted_at set)",
        )
        shown.set_defaults(handler=_cmd_rows)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, with_defaults: bool) -> None:
    # After the command, an option that is not given must not reset the one given before
    # it: there the options have no default at all (SUPPRESS leaves the attribute alone).
    def default(value: object) -> object:
        return value if with_defaults else argparse.SUPPRESS

    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=default(None),
        help="TOML config file (default: $IDEOGRAM_SYNC_CONFIG, else ./ideogram-sync.toml)",
    )
    parser.add_argument(
        "--database-url",
        metavar="URL",
        default=default(None),
        help="SQLAlchemy database URL; overrides [database] url and $IDEOGRAM_SYNC_DATABASE_URL",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=default("INFO"),
        type=str.upper,
        help="log level for messages on stderr (default: INFO)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=default("text"),
        help="text lines for people (default) or one JSON object per line for log collectors",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default(False),
        help="show tracebacks on errors (and DEBUG logs)",
    )


def entry() -> int:
    """The `ideogram-sync` command and `python -m sync`: main() in a process that then exits."""
    # A sync allocates a few tuples per record that live until their batch is written:
    # at the default threshold (700) the collector walks them again and again, for
    # nothing (they hold no cycles). Cyclic garbage waits a little longer instead.
    gc.set_threshold(20_000, 20, 10)
    code = main(own_process=True)
    # The interpreter's last act would be one garbage collection over every object of
    # every imported library (about 50 ms of a run): the process is ending, and the
    # operating system frees its memory and closes its files.
    gc.freeze()
    return code


def main(argv: Sequence[str] | None = None, *, own_process: bool = False) -> int:
    """Run one command and return its exit code; `own_process`: the process ends after it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.own_process = own_process
    configure_logging(args.log_level, args.verbose, args.log_format)
    handler: Callable[[argparse.Namespace], int] = args.handler
    previous = _on_signals_stop(own_process)
    try:
        return handler(args)
    except SyncError as exc:
        log.error("%s failed: %s", args.command, exc, exc_info=args.verbose)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        log.error("%s interrupted (Ctrl-C); %s", args.command, _what_happened(exc))
        return EXIT_INTERRUPTED
    except Terminated as exc:
        log.error("%s stopped by SIGTERM; %s", args.command, _what_happened(exc))
        return EXIT_TERMINATED
    except BrokenPipeError:
        # The reader went away (`| head`): not an error worth a message.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        log.error(
            "%s failed with an unexpected error: %s: %s (rerun with -v for the traceback, "
            "and please report it)",
            args.command,
            type(exc).__name__,
            redact(str(exc)),
            exc_info=args.verbose,
        )
        return EXIT_FAILED
    finally:
        for sig, old in (previous or {}).items():
            signal.signal(sig, old)


def _what_happened(exc: BaseException) -> str:
    # Code that knows better (a migration on MariaDB, which commits as it goes) adds a note.
    notes = getattr(exc, "__notes__", None)
    return notes[-1] if notes else "any open transaction was rolled back"


# SIGTERM or Ctrl-C ends the process within this many seconds, whatever the database does.
STOP_WITHIN_SECONDS = 8.0
_stopping = threading.Event()


def _on_signals_stop(own_process: bool) -> dict[int, Any] | None:
    """Make SIGTERM and SIGINT unwind the command (rollback, run recorded failed).

    Returns the previous handlers. The database statements under way are cancelled at
    once, from another thread: the main thread may be waiting inside the driver.
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, _frame: object) -> None:
        if not _stopping.is_set():
            _stopping.set()
            _stop_database_work(signum, own_process)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt()
        raise Terminated()

    _stopping.clear()
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


def _stop_database_work(signum: int, own_process: bool) -> None:
    interrupt = sys.modules.get("sync.interrupt")  # not loaded: no database work to stop
    if interrupt is not None:
        threading.Thread(target=interrupt.stop_everything, name="stop", daemon=True).start()
    if not own_process:
        return
    code = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_TERMINATED

    def give_up() -> None:
        # The rollback and the run's failed row could not be written in time (a database
        # that does not answer at all). Ending the process is what kill -9 would do: the
        # database drops the transaction with the connection, and the next run marks this
        # one abandoned.
        log.error(
            "could not stop cleanly within %gs (the database did not answer); exiting now. "
            "Nothing was committed; the next run marks this one abandoned",
            STOP_WITHIN_SECONDS,
        )
        logging.shutdown()
        os._exit(code)

    timer = threading.Timer(STOP_WITHIN_SECONDS, give_up)
    timer.daemon = True
    timer.start()


def _settings(args: argparse.Namespace) -> Settings:
    from sync.config import load_settings

    return load_settings(args.config, database_url=args.database_url)


def _read_input(path: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read --input {path}: {exc.strerror or exc}") from None


def _open_engine(settings: Settings, read_only: bool = False) -> Engine:
    from sync.db import open_engine

    return open_engine(settings.database, read_only=read_only)


# Which exit code wins when accounts end differently: the one that needs a person most.
_SEVERITY = {EXIT_OK: 0, EXIT_LOCKED: 1, EXIT_FAILED: 2, EXIT_AUTH: 3, EXIT_USAGE: 4}


def worst_exit_code(codes: Sequence[int]) -> int:
    """The most severe of several accounts' exit codes (config > auth > failed > locked > ok)."""
    return max(codes, key=lambda code: _SEVERITY.get(code, 2), default=EXIT_OK)


def _cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    accounts = (
        [settings.account(name) for name in dict.fromkeys(args.account)]
        if args.account
        else list(settings.accounts)
    )
    if args.input and len(accounts) > 1:
        raise ConfigError("--input holds one account's listing: name it with --account NAME")
    body = _read_input(args.input) if args.input else None
    if args.dry_run:
        return _dry_run(args, settings, accounts, body)
    about = about_run(accounts[0].name) if len(accounts) == 1 else contextlib.nullcontext()
    with about:
        return _run_accounts(args, settings, accounts, body)


def _dry_run(
    args: argparse.Namespace, settings: Settings, accounts: list[Account], body: bytes | None
) -> int:
    """Print what a run would change, account by account; write nothing (not even the
    schema: a database that is not at the newest migration is refused)."""
    from sqlalchemy.exc import SQLAlchemyError

    from sync.db import SCHEMA_HEAD, current_revision, database_error
    from sync.errors import MigrationRequired, SyncError
    from sync.job import ResourcePreview, preview_account
    from sync.output import write_previews

    engine = _open_engine(settings, read_only=True)
    previews: list[ResourcePreview] = []
    try:
        try:
            current = current_revision(engine)
        except SQLAlchemyError as exc:
            raise database_error(exc, settings.database.url, "reading the schema") from exc
        if current != SCHEMA_HEAD:
            raise MigrationRequired(
                f"the database is at migration {current or 'none (empty)'}, not {SCHEMA_HEAD}; "
                "a dry run writes nothing, so it does not migrate: run `ideogram-sync migrate` "
                "first"
            )
        for account in accounts:
            with about_run(account.name):
                try:
                    previews += preview_account(
                        settings,
                        account,
                        engine,
                        body=body,
                        allow_mass_delete=args.allow_mass_delete,
                    )
                except SyncError as exc:
                    previews.append(ResourcePreview(account.name, "datasets", error=exc))
    finally:
        engine.dispose()
    write_previews(previews, args.format, sys.stdout)
    return worst_exit_code([p.error.exit_code if p.error else EXIT_OK for p in previews])


def _run_accounts(
    args: argparse.Namespace, settings: Settings, accounts: list[Account], body: bytes | None
) -> int:
    prefetched = _prefetch(accounts[0]) if body is None and len(accounts) == 1 else {}
    # Imported after the download started: the listing arrives while the database
    # code loads and the run is set up, instead of after.
    from sync.job import prepare_database, sync_accounts

    if args.own_process:
        # The libraries' objects live as long as the process: keep the collector from
        # walking them again on every full collection while the listing is read.
        gc.freeze()
    engine = _open_engine(settings)
    try:
        prepare_database(engine, settings.database, args.migrate)
        outcomes = sync_accounts(
            settings,
            accounts,
            engine,
            body=body,
            allow_mass_delete=args.allow_mass_delete,
            prefetched=prefetched,
            progress=_progress(args),
        )
        from sync import notify

        notify.after_runs(settings, engine, outcomes)
    finally:
        engine.dispose()
    return worst_exit_code([o.error.exit_code if o.error else EXIT_OK for o in outcomes])


def _progress(args: argparse.Namespace) -> Progress | None:
    """The details fetch's progress on stderr, only when a person watches it (a terminal,
    text logs): never under cron, systemd or a log collector."""
    if args.log_format != "text" or not sys.stderr.isatty():
        return None
    from sync.output import Progress

    return Progress(sys.stderr)


def _prefetch(account: Account) -> dict[str, PendingFetch]:
    """Start downloading the account's listing now; nothing if its key is missing.

    The download's log lines are about the account's run: they carry its fields
    (logs.about_run), and its run id once the run row exists.

    A run that then stops before syncing (lock held, database down) has fetched for
    nothing; the API call is a cheap GET, and the job still reports a missing key.
    """
    from sync import client

    try:
        key = account.api.key()
    except ConfigError:
        return {}
    return {account.name: client.start_fetch(account.api, key)}


def _cmd_daemon(args: argparse.Namespace) -> int:
    from sync.daemon import Daemon

    settings = _settings(args)
    return Daemon(settings, allow_migrate=args.migrate).run()


def _cmd_migrate(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from sync.db import database_error, migrate

    settings = _settings(args)
    engine = _open_engine(settings)
    try:
        before, after = migrate(engine, schema=settings.database.schema)
    except SQLAlchemyError as exc:
        raise database_error(exc, settings.database.url, "migrating") from exc
    finally:
        engine.dispose()
    if before == after:
        log.info("database is up to date (migration %s)", after)
    return EXIT_OK


def _require_tables(engine: Engine) -> None:
    from sqlalchemy import inspect

    from sync.db import safe_url
    from sync.errors import NoDatabase

    # A plain look at the catalog: importing Alembic for this would double start-up time.
    if not inspect(engine).has_table("sync_runs"):
        raise NoDatabase(
            f"there is no synced database yet: {safe_url(engine.url)} has no ideogram-sync "
            "tables; run `ideogram-sync run` first, or point --database-url at the database "
            "the sync writes"
        )
    from sync.db import SCHEMA_HEAD, current_revision, known_revisions
    from sync.errors import MigrationRequired

    current = current_revision(engine)
    # Older than this version's tables: the columns read here may not be there yet. (A
    # newer one is read as it is: reading commands only need what they know.)
    if current != SCHEMA_HEAD and current in known_revisions():
        raise MigrationRequired(
            f"the database is at migration {current}, older than this version's "
            f"{SCHEMA_HEAD}; run `ideogram-sync migrate` (or the next `ideogram-sync run` "
            "does it), then try again"
        )


def _cmd_status(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from sync.db import database_error
    from sync.output import write_runs
    from sync.runs import last_successes, latest_runs

    if args.limit < 1:
        raise ConfigError("--limit must be 1 or more")
    max_age = parse_duration(args.max_age, "--max-age") if args.max_age else None
    settings = _settings(args)
    engine = _open_engine(settings, read_only=True)
    try:
        _require_tables(engine)
        runs = latest_runs(engine, args.limit)
        successes = last_successes(engine)
    except SQLAlchemyError as exc:
        raise database_error(exc, settings.database.url, "reading sync_runs") from exc
    finally:
        engine.dispose()
    if args.format == "json":
        write_runs(runs, "json", sys.stdout)
    elif not runs:
        print("no runs recorded yet")
    else:
        write_runs(runs, "table", sys.stdout)
    newest: dict[tuple[str, str], str] = {}
    for run in runs:
        newest.setdefault((run.account, run.resource), run.status)
    if max_age is None:
        # A resource turned off since (its last run failed, say) says nothing of today.
        synced = [s for (_, resource), s in newest.items() if resource in settings.sync.resources]
        healthy = bool(synced) and all(status == "success" for status in synced)
        return EXIT_OK if healthy else EXIT_FAILED
    expected = [(a.name, r) for a in settings.accounts for r in settings.sync.resources]
    problems = stale_accounts(expected, newest, successes, max_age, datetime.now(UTC))
    for problem in problems:
        log.warning("stale: %s", problem)
    return EXIT_STALE if problems else EXIT_OK


def stale_accounts(
    expected: Sequence[tuple[str, str]],
    newest_status: dict[tuple[str, str], str],
    last_success: dict[tuple[str, str], datetime],
    max_age_seconds: float,
    now: datetime,
) -> list[str]:
    """Why each configured (account, resource) is not fresh; empty when all are."""
    # Only configured ones: an account removed from the config must not fail the check forever.
    problems = []
    for account, resource in sorted(expected):
        label = f"account {account}{resource_suffix(resource)}"
        success = last_success.get((account, resource))
        status = newest_status.get((account, resource))
        if status not in (None, "success", "running"):
            problems.append(f"{label}: its last run {status}")
        elif success is None:
            problems.append(f"{label}: no successful run yet")
        elif (age := (now - success).total_seconds()) > max_age_seconds:
            problems.append(f"{label}: last success {age:.0f}s ago, more than {max_age_seconds:g}s")
    return problems


def _cmd_rows(args: argparse.Namespace) -> int:
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from sync.db import database_error
    from sync.models import datasets, models
    from sync.output import DATASET_TABLE_COLUMNS, MODEL_TABLE_COLUMNS, write_rows

    table, key, shown = {
        "datasets": (datasets, "dataset_id", DATASET_TABLE_COLUMNS),
        "models": (models, "model_id", MODEL_TABLE_COLUMNS),
    }[args.command]
    settings = _settings(args)
    engine = _open_engine(settings, read_only=True)
    query = select(table).order_by(table.c.creation_time.desc(), table.c[key])
    if not args.include_deleted:
        query = query.where(table.c.deleted_at.is_(None))
    try:
        _require_tables(engine)
        with engine.connect() as conn:
            # Streamed in chunks, so a large table is never held in memory at once.
            result = conn.execution_options(yield_per=1000).execute(query)
            count = write_rows(
                (r._mapping for r in result), table.c.keys(), shown, args.format, sys.stdout
            )
    except SQLAlchemyError as exc:
        raise database_error(exc, settings.database.url, f"reading {table.name}") from exc
    finally:
        engine.dispose()
    log.debug("printed %d %s", count, table.name)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
