"""Notices to a webhook ([notify]): a run failed, an account's resource recovered, or it
went stale. For cron and systemd users without Prometheus.

Each notice has a key (`failure:<run id>`, `recovery:<run id>`,
`stale:<account>:<resource>:<id of the last successful run>`), and is sent by whichever
process first records that key in `sync_notices`: daemon replicas sharing a database send
each notice once. Delivery is bounded (a short timeout, a few retries); a notice that cannot
be delivered logs one WARNING and changes nothing else: not the run, not its exit code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from urllib3.util.retry import Retry

from sync import __version__
from sync.config import Settings
from sync.db import reading
from sync.errors import ConfigError, LockHeld
from sync.job import Outcome
from sync.models import RUN_ABANDONED, RUN_FAILED, RUN_SUCCESS, sync_notices, sync_runs
from sync.redact import redact

log = logging.getLogger(__name__)

_EMOJI = {"failure": ":x:", "recovery": ":white_check_mark:", "stale": ":hourglass:"}


@dataclass(frozen=True)
class Notice:
    """One event worth a message, with what the message says."""

    event: str  # failure, recovery or stale
    key: str
    account: str
    resource: str
    run_id: int | None
    error: str | None = None
    counts: dict[str, int] | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    last_success_at: datetime | None = None


def after_runs(settings: Settings, engine: Engine, outcomes: Sequence[Outcome]) -> None:
    """Send the failure and recovery notices of these runs (never raises)."""
    if _url(settings) is None:
        return
    try:
        notices = _run_notices(engine, outcomes)
    except SQLAlchemyError as exc:
        log.warning("could not read the runs to notify about: %s", _short(exc))
        return
    send(settings, engine, notices)


def check_stale(settings: Settings, engine: Engine, now: datetime | None = None) -> None:
    """Send a stale notice for each account's resource whose last success is older than
    [notify] stale_after, once per last success (never raises)."""
    after = settings.notify.stale_after_seconds
    if after is None or _url(settings) is None or "stale" not in settings.notify.on:
        return
    now = now or datetime.now(UTC)
    try:
        notices = _stale_notices(settings, engine, now, after)
    except SQLAlchemyError as exc:
        log.warning("could not read the last successes to check staleness: %s", _short(exc))
        return
    send(settings, engine, notices)


def send(settings: Settings, engine: Engine, notices: Iterable[Notice]) -> None:
    """Deliver each notice of an event in [notify] on that no other process has claimed."""
    url = _url(settings)
    if url is None:
        return
    for notice in notices:
        if notice.event not in settings.notify.on or not _claim(engine, notice):
            continue
        body = payload(notice, settings.notify.format)
        if _deliver(settings, url, body):
            _delivered(engine, notice.key)
        else:
            log.warning(
                "could not deliver the %s notice of account %s (%s) to [notify] webhook_url; "
                "the run is not affected",
                notice.event,
                notice.account,
                notice.resource,
            )


def payload(notice: Notice, fmt: str) -> dict[str, Any]:
    """The body POSTed for a notice: the notice itself as JSON, or a Slack message."""
    if fmt == "slack":
        return {"text": redact(_sentence(notice))}
    fields = {
        "event": notice.event,
        "account": notice.account,
        "resource": notice.resource,
        "run_id": notice.run_id,
        "error": notice.error,
        "counts": notice.counts,
        "started_at": _iso(notice.started_at),
        "finished_at": _iso(notice.finished_at),
        "last_success_at": _iso(notice.last_success_at),
        "message": _sentence(notice),
        "tool": f"ideogram-sync {__version__}",
    }
    # Errors are masked when made; masked again, so nothing secret can reach the webhook.
    result: dict[str, Any] = json.loads(redact(json.dumps(fields, ensure_ascii=False)))
    return result


def _sentence(notice: Notice) -> str:
    what = f"account {notice.account} ({notice.resource})"
    if notice.event == "failure":
        text = f"ideogram-sync: run {notice.run_id} of {what} failed: {notice.error}"
    elif notice.event == "recovery":
        text = f"ideogram-sync: run {notice.run_id} of {what} succeeded again after failures"
    else:
        when = _iso(notice.last_success_at)
        text = f"ideogram-sync: {what} has not synced successfully since {when}"
    if notice.counts and notice.event != "stale":
        text += " (" + ", ".join(f"{k} {v}" for k, v in notice.counts.items()) + ")"
    return f"{_EMOJI[notice.event]} {text}"


def _run_notices(engine: Engine, outcomes: Sequence[Outcome]) -> list[Notice]:
    notices = []
    with reading(engine).connect() as conn:
        for outcome in outcomes:
            if outcome.run_id is None or isinstance(outcome.error, LockHeld):
                continue
            row = conn.execute(select(sync_runs).where(sync_runs.c.id == outcome.run_id)).first()
            if row is None:
                continue
            if row.status == RUN_FAILED:
                notices.append(_notice("failure", f"failure:{row.id}", row))
            elif row.status == RUN_SUCCESS and _failed_before(conn, row):
                notices.append(_notice("recovery", f"recovery:{row.id}", row))
    return notices


def _failed_before(conn: Any, row: Any) -> bool:
    """Whether the run of the same account and resource before `row` did not succeed."""
    previous = conn.execute(
        select(sync_runs.c.status)
        .where(
            sync_runs.c.account == row.account,
            sync_runs.c.resource == row.resource,
            sync_runs.c.id < row.id,
        )
        .order_by(sync_runs.c.id.desc())
        .limit(1)
    ).scalar()
    return previous in (RUN_FAILED, RUN_ABANDONED)


def _notice(event: str, key: str, row: Any) -> Notice:
    return Notice(
        event=event,
        key=key,
        account=row.account,
        resource=row.resource,
        run_id=row.id,
        error=row.error,
        counts={
            "seen": row.datasets_seen,
            "inserted": row.inserted,
            "updated": row.updated,
            "unchanged": row.unchanged,
            "deleted": row.deleted,
            "rejected": row.rejected,
        },
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def _stale_notices(settings: Settings, engine: Engine, now: datetime, after: float) -> list[Notice]:
    newest = (
        select(sync_runs.c.account, sync_runs.c.resource, func.max(sync_runs.c.id).label("id"))
        .where(sync_runs.c.status == RUN_SUCCESS)
        .group_by(sync_runs.c.account, sync_runs.c.resource)
        .subquery()
    )
    query = select(sync_runs).join(newest, newest.c.id == sync_runs.c.id)
    wanted = {(a.name, r) for a in settings.accounts for r in settings.sync.resources}
    notices = []
    with reading(engine).connect() as conn:
        for row in conn.execute(query):
            if (row.account, row.resource) not in wanted or row.finished_at is None:
                continue
            if now - row.finished_at > timedelta(seconds=after):
                key = f"stale:{row.account}:{row.resource}:{row.id}"
                notices.append(
                    Notice(
                        "stale",
                        key,
                        row.account,
                        row.resource,
                        row.id,
                        last_success_at=row.finished_at,
                    )
                )
    return notices


def _claim(engine: Engine, notice: Notice) -> bool:
    """Record the notice's key; False when another process (or an earlier call) did."""
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(sync_notices).values(
                    key=notice.key[:255],
                    event=notice.event,
                    account=notice.account,
                    resource=notice.resource,
                    run_id=notice.run_id,
                    created_at=datetime.now(UTC),
                    delivered=False,
                )
            )
    except IntegrityError:
        return False
    except SQLAlchemyError as exc:
        log.warning("could not record the %s notice: %s", notice.event, _short(exc))
        return False
    return True


def _delivered(engine: Engine, key: str) -> None:
    try:
        with engine.begin() as conn:
            conn.execute(
                update(sync_notices).where(sync_notices.c.key == key[:255]).values(delivered=True)
            )
    except SQLAlchemyError as exc:
        log.warning("could not record a delivered notice: %s", _short(exc))


def _deliver(settings: Settings, url: str, body: dict[str, Any]) -> bool:
    notify = settings.notify
    retry = Retry(
        total=notify.max_retries,
        allowed_methods=frozenset({"POST"}),
        status_forcelist=frozenset({429, 500, 502, 503, 504}),
        backoff_factor=0.5,
        # A webhook's Retry-After could hold a run for minutes; the backoff is enough.
        respect_retry_after_header=False,
        raise_on_status=False,
    )
    with requests.Session() as session:
        session.mount("http://", HTTPAdapter(max_retries=retry))
        session.mount("https://", HTTPAdapter(max_retries=retry))
        try:
            response = session.post(
                url,
                json=body,
                timeout=(notify.timeout_seconds, notify.timeout_seconds),
                allow_redirects=False,
                headers={"User-Agent": f"ideogram-dataset-sync/{__version__}"},
            )
        except requests.exceptions.RequestException as exc:
            log.debug("webhook request failed: %s", redact(str(exc)))
            return False
        with response:
            return 200 <= response.status_code < 300


def _url(settings: Settings) -> str | None:
    try:
        return settings.notify.url()
    except ConfigError as exc:  # an unreadable webhook file: a notice never fails a run
        log.warning("notices are off: %s", exc)
        return None


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _short(exc: BaseException) -> str:
    return redact(" ".join(str(exc).split()))[:200]
