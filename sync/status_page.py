"""The daemon's status page: GET / on the metrics port, one HTML page without JavaScript.

Per configured account: the latest run of each resource (status, start, duration, counts,
error), its last success and freshness against `[schedule] max_age`, and the account's last
runs of every resource; above them the overall state and the next scheduled slot. Read from
sync_runs at request time, in one read-only transaction of a few index-bounded queries.
Everything that comes from the database, the API or the config is escaped.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import SQLAlchemyError

from sync import __version__
from sync.config import RESOURCES, Settings
from sync.db import database_error, reading
from sync.models import RUN_ABANDONED, RUN_FAILED, RUN_RUNNING, RUN_SUCCESS, sync_runs
from sync.runs import RunRow

REFRESH_SECONDS = 30
RECENT_RUNS = 20
# Long errors (up to 2000 characters in sync_runs) are clipped in the tables; the full text
# is in the cell's tooltip.
ERROR_CLIP = 300

# Overall states; the page's title and heading carry the worst that applies (overall()).
OK, WAITING, FAILING, STALE = "OK", "WAITING", "FAILING", "STALE"
UNREACHABLE = "DATABASE UNREACHABLE"
_STATE_CLASS = {OK: "good", WAITING: "info", FAILING: "bad", STALE: "bad", UNREACHABLE: "bad"}
# CSS classes by run status: a value from the database never becomes an attribute as such.
_STATUS_CLASS = {
    RUN_SUCCESS: "good",
    RUN_FAILED: "bad",
    RUN_ABANDONED: "warn",
    RUN_RUNNING: "info",
}
_FRESHNESS_CLASS = {"fresh": "good", "stale": "bad", "never": "warn"}


@dataclass(frozen=True)
class ResourceStatus:
    """One resource of one account: its latest run and its last success."""

    resource: str
    last: RunRow | None
    last_success: datetime | None


@dataclass(frozen=True)
class AccountStatus:
    """One account: a row per configured resource, and its newest runs of any resource."""

    name: str
    resources: tuple[ResourceStatus, ...]
    recent: tuple[RunRow, ...]


@dataclass(frozen=True)
class Snapshot:
    """Everything the page shows, read at one moment."""

    now: datetime
    accounts: tuple[AccountStatus, ...]
    max_age_seconds: float | None
    schedule: str
    next_slot: datetime | None
    stopping: bool = False
    # Set when the database could not be read: the page says so (503) instead.
    error: str | None = None


def read_accounts(
    engine: Engine,
    accounts: Iterable[str],
    resources: Sequence[str],
    recent: int = RECENT_RUNS,
) -> tuple[AccountStatus, ...]:
    """The accounts' runs, in one read-only transaction.

    Per account and resource, at most `recent` rows by the (account, resource, id) index,
    plus the newest success when none of those is one: a bounded, cheap read whatever the
    size of sync_runs. Resources no longer configured still show in the account's history.
    """
    everything = tuple(resources) + tuple(r for r in RESOURCES if r not in resources)
    found = []
    with reading(engine).connect() as conn:
        for account in accounts:
            newest = {resource: _newest(conn, account, resource, recent) for resource in everything}
            rows = tuple(
                ResourceStatus(
                    resource,
                    newest[resource][0] if newest[resource] else None,
                    _last_success(conn, account, resource, newest[resource]),
                )
                for resource in resources
            )
            history = sorted(
                (run for runs in newest.values() for run in runs), key=lambda r: r.id, reverse=True
            )
            found.append(AccountStatus(account, rows, tuple(history[:recent])))
    return tuple(found)


# The columns RunRow has (a column added to sync_runs later does not break the page).
_RUN_COLUMNS = [sync_runs.c[f.name] for f in fields(RunRow) if f.name in sync_runs.c]


def _newest(conn: Connection, account: str, resource: str, limit: int) -> list[RunRow]:
    query = (
        select(*_RUN_COLUMNS)
        .where(sync_runs.c.account == account, sync_runs.c.resource == resource)
        .order_by(sync_runs.c.id.desc())
        .limit(limit)
    )
    return [RunRow(**row._mapping) for row in conn.execute(query)]


def _last_success(
    conn: Connection, account: str, resource: str, newest: list[RunRow]
) -> datetime | None:
    for run in newest:
        if run.status == RUN_SUCCESS and run.finished_at is not None:
            return run.finished_at
    finished = conn.execute(
        select(sync_runs.c.finished_at)
        .where(
            sync_runs.c.account == account,
            sync_runs.c.resource == resource,
            sync_runs.c.status == RUN_SUCCESS,
        )
        .order_by(sync_runs.c.id.desc())
        .limit(1)
    ).scalar()
    return finished


class StatusPage:
    """The daemon's GET /: call it for (HTTP status, HTML)."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        schedule: str,
        next_slot: Callable[[], datetime | None],
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.schedule = schedule
        self.next_slot = next_slot
        self.stopping = stopping

    def __call__(self, now: datetime | None = None) -> tuple[int, str]:
        """Read the database now and render the page; 503 when it cannot be read."""
        now = now or datetime.now(UTC)
        accounts: tuple[AccountStatus, ...] = ()
        error = None
        try:
            accounts = read_accounts(
                self.engine,
                (account.name for account in self.settings.accounts),
                self.settings.sync.resources,
            )
        except SQLAlchemyError as exc:
            error = str(database_error(exc, self.engine.url, "reading sync_runs"))
        snapshot = Snapshot(
            now=now,
            accounts=accounts,
            max_age_seconds=self.settings.schedule.max_age_seconds,
            schedule=self.schedule,
            next_slot=self.next_slot(),
            stopping=self.stopping(),
            error=error,
        )
        return (503 if error else 200), render(snapshot)


# -- rendering -----------------------------------------------------------------------


def freshness(last_success: datetime | None, now: datetime, max_age: float | None) -> str:
    """fresh, stale or never; "" when there is a success but no max_age to judge it by."""
    if last_success is None:
        return "never"
    if max_age is None:
        return ""
    return "fresh" if (now - last_success).total_seconds() <= max_age else "stale"


def overall(snapshot: Snapshot) -> str:
    """The worst state of any configured account and resource."""
    if snapshot.error is not None:
        return UNREACHABLE
    states = set()
    for account in snapshot.accounts:
        for row in account.resources:
            fresh = freshness(row.last_success, snapshot.now, snapshot.max_age_seconds)
            if fresh == "stale":
                states.add(STALE)
            if row.last is not None and row.last.status in (RUN_FAILED, RUN_ABANDONED):
                states.add(FAILING)
            elif fresh == "never":
                states.add(WAITING)
    for state in (STALE, FAILING, WAITING):
        if state in states:
            return state
    return OK


def render(snapshot: Snapshot) -> str:
    """The whole page as HTML."""
    state = overall(snapshot)
    parts = [
        _HEAD.format(
            refresh=REFRESH_SECONDS, title=_e(f"ideogram-sync: {state}"), css=_CSS.strip()
        ),
        f'<h1>ideogram-sync <span class="state {_STATE_CLASS[state]}" id="overall">'
        f"{_e(state)}</span></h1>\n",
        _summary(snapshot),
    ]
    if snapshot.error is not None:
        parts.append(
            '<p class="error" id="database-error"><strong>The database could not be read.'
            f"</strong> {_e(snapshot.error)}</p>\n"
            "<p>The daemon keeps running; this page tries again at its next refresh.</p>\n"
        )
    for account in snapshot.accounts:
        parts.append(_account(account, snapshot))
    parts.append(
        f"<footer>ideogram-sync {_e(__version__)}. Times are UTC. This page refreshes every "
        f"{REFRESH_SECONDS} s; /metrics and /healthz are on the same port.</footer>\n"
        "</body>\n</html>\n"
    )
    return "".join(parts)


def _summary(snapshot: Snapshot) -> str:
    if snapshot.stopping:
        slot = "none: the daemon is shutting down"
    elif snapshot.next_slot is None:
        slot = "not scheduled (the scheduler is not running)"
    else:
        wait = (snapshot.next_slot - snapshot.now).total_seconds()
        slot = f"{_when(snapshot.next_slot)} ({'in ' + _span(wait) if wait > 0 else 'now'})"
    max_age = (
        "not set (no freshness check)"
        if snapshot.max_age_seconds is None
        else _span(snapshot.max_age_seconds)
    )
    items = (
        ("As of", _when(snapshot.now)),
        ("Schedule", snapshot.schedule),
        ("Next slot", slot),
        ("max_age", max_age),
    )
    cells = "".join(
        f'<div><dt>{_e(name)}</dt><dd id="{_e(name.lower().replace(" ", "-"))}">{_e(value)}</dd>'
        "</div>"
        for name, value in items
    )
    return f'<dl class="summary">{cells}</dl>\n'


_COUNT_HEADERS = "<th>Seen</th><th>Ins</th><th>Upd</th><th>Same</th><th>Del</th><th>Rej</th>"


def _account(account: AccountStatus, snapshot: Snapshot) -> str:
    name = _e(account.name)
    out = [f'<section class="account" id="account-{name}">\n<h2>Account {name}</h2>\n']
    out.append(
        '<table class="resources">\n<caption>Latest run of each resource</caption>\n'
        "<thead><tr><th>Resource</th><th>Status</th><th>Started</th><th>Duration</th>"
        f"{_COUNT_HEADERS}<th>Last success</th><th>Freshness</th><th>Error</th></tr></thead>\n"
        "<tbody>\n"
    )
    for row in account.resources:
        out.append(_resource_row(row, snapshot))
    out.append("</tbody>\n</table>\n")
    out.append(
        f'<table class="history">\n<caption>Last {RECENT_RUNS} runs (all resources, newest '
        "first)</caption>\n<thead><tr><th>Run</th><th>Resource</th><th>Status</th>"
        f"<th>Started</th><th>Duration</th>{_COUNT_HEADERS}<th>Error</th></tr></thead>\n"
        "<tbody>\n"
    )
    for run in account.recent:
        out.append(
            f'<tr data-run="{run.id}"><td>{run.id}</td><td>{_e(run.resource)}</td>'
            f'{_status_cell(run.status)}<td class="t">{_e(_when(run.started_at))}</td>'
            f"<td>{_e(_duration(run, snapshot.now))}</td>{_counts(run)}{_error_cell(run.error)}"
            "</tr>\n"
        )
    if not account.recent:
        out.append('<tr><td colspan="12" class="none">No runs yet.</td></tr>\n')
    out.append("</tbody>\n</table>\n</section>\n")
    return "".join(out)


def _resource_row(row: ResourceStatus, snapshot: Snapshot) -> str:
    fresh = freshness(row.last_success, snapshot.now, snapshot.max_age_seconds)
    if row.last_success is None:
        success = "never"
    else:
        age = (snapshot.now - row.last_success).total_seconds()
        success = f"{_when(row.last_success)} ({_span(age)} ago)"
    if fresh == "stale" and snapshot.max_age_seconds is not None:
        label = f"stale (max_age {_span(snapshot.max_age_seconds)})"
    else:
        label = {"never": "no success yet", "": "-"}.get(fresh, fresh)
    fresh_cell = f'<td class="{_FRESHNESS_CLASS.get(fresh, "")}">{_e(label)}</td>'
    start = f'<tr data-resource="{_e(row.resource)}"><td>{_e(row.resource)}</td>'
    if row.last is None:
        return (
            f'{start}<td class="none">no run yet</td><td></td><td></td>'
            + "<td></td>" * 6
            + f'<td class="t">{_e(success)}</td>{fresh_cell}<td></td></tr>\n'
        )
    run = row.last
    return (
        f'{start}{_status_cell(run.status)}<td class="t">{_e(_when(run.started_at))}</td>'
        f"<td>{_e(_duration(run, snapshot.now))}</td>{_counts(run)}"
        f'<td class="t">{_e(success)}</td>'
        f"{fresh_cell}{_error_cell(run.error)}</tr>\n"
    )


def _status_cell(status: str) -> str:
    return f'<td class="status {_STATUS_CLASS.get(status, "warn")}">{_e(status)}</td>'


def _counts(run: RunRow) -> str:
    if run.status == RUN_RUNNING:  # counted when it finishes
        return '<td class="n"></td>' * 6
    values = (run.datasets_seen, run.inserted, run.updated, run.unchanged, run.deleted)
    cells = "".join(f'<td class="n">{int(v)}</td>' for v in values)
    rejected = int(run.rejected)
    return cells + f'<td class="n{" warn" if rejected else ""}">{rejected}</td>'


def _error_cell(error: str | None) -> str:
    if not error:
        return "<td></td>"
    line = " ".join(error.split())
    shown = line if len(line) <= ERROR_CLIP else line[: ERROR_CLIP - 1] + "…"
    return f'<td class="error" title="{_e(line)}">{_e(shown)}</td>'


def _duration(run: RunRow, now: datetime) -> str:
    if run.duration_seconds is not None:
        return _span(run.duration_seconds)
    if run.status == RUN_RUNNING:
        return f"{_span((now - run.started_at).total_seconds())} so far"
    return "-"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _when(value: datetime) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S") + " UTC"


def _span(seconds: float) -> str:
    """A duration for people: 0.4s, 12.0s, 3m 05s, 2h 10m, 3d 04h."""
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d {whole % 86400 // 3600:02d}h"


_HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{refresh}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
{css}
</style>
</head>
<body>
"""

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.5em; margin: 0 0 .5em; }
h2 { font-size: 1.2em; margin: 1.5em 0 .4em; }
.state { padding: .1em .5em; border-radius: .3em; color: #fff; }
.state.good { background: #1a7f37; } .state.bad { background: #cf222e; }
.state.info { background: #0969da; }
dl.summary { display: flex; flex-wrap: wrap; gap: .3em 2em; margin: 0; }
dl.summary dt { font-weight: 600; } dl.summary dd { margin: 0; }
table { border-collapse: collapse; margin: .5em 0 1em; }
caption { text-align: left; font-weight: 600; padding: .2em 0; }
th, td { border: 1px solid #d0d7de; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.good { color: #1a7f37; font-weight: 600; } td.bad { color: #cf222e; font-weight: 600; }
td.warn { color: #9a6700; font-weight: 600; } td.info { color: #0969da; font-weight: 600; }
td.error { max-width: 40em; overflow-wrap: anywhere; color: #cf222e; }
td.none { color: #57606a; font-style: italic; }
td.t { white-space: nowrap; }
p.error { color: #cf222e; }
footer { margin-top: 2em; color: #57606a; font-size: .9em; }
"""
