"""The `sync_runs` table: start, finish and fail run rows, and read them back."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, func, insert, select, update

from sync.db import reading
from sync.models import RUN_ABANDONED, RUN_FAILED, RUN_RUNNING, RUN_SUCCESS, Counts, sync_runs

# Long errors are cut so one bad response cannot bloat the run table.
MAX_ERROR_LENGTH = 2000


@dataclass(frozen=True)
class RunRow:
    """One row of sync_runs, as `status` shows it."""

    id: int
    account: str
    started_at: datetime
    finished_at: datetime | None
    status: str
    datasets_seen: int
    inserted: int
    updated: int
    unchanged: int
    deleted: int
    rejected: int
    error: str | None
    scheduled_for: datetime | None = None
    listing_digest: str | None = None
    resource: str = "datasets"

    @property
    def duration_seconds(self) -> float | None:
        """Seconds from start to finish, None while running."""
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


def start_run(
    engine: Engine,
    account: str,
    now: datetime,
    scheduled_for: datetime | None = None,
    resource: str = "datasets",
) -> int:
    """Insert and commit a `running` row for `resource`; return its id."""
    with engine.begin() as conn:
        result = conn.execute(
            insert(sync_runs).values(
                account=account,
                resource=resource,
                started_at=now,
                status=RUN_RUNNING,
                scheduled_for=scheduled_for,
                **_count_values(Counts()),
            )
        )
        return int(result.inserted_primary_key[0])


def slot_taken(engine: Engine, account: str, slot: datetime) -> bool:
    """True when a run for this schedule slot already finished (on any replica).

    Any resource: the replica that ran the slot's first one ran the rest under the same lease.
    """
    with reading(engine).connect() as conn:
        found = conn.execute(
            select(sync_runs.c.id)
            .where(
                sync_runs.c.account == account,
                sync_runs.c.scheduled_for == slot,
                sync_runs.c.status.in_((RUN_SUCCESS, RUN_FAILED)),
            )
            .limit(1)
        ).first()
    return found is not None


ABANDONED_REASON = (
    "abandoned: the process running it stopped before finishing (killed, crashed or the "
    "machine went down); its changes were rolled back. Found by run {run_id}"
)


def abandon_orphans(engine: Engine, account: str, found_by: int, now: datetime) -> list[int]:
    """Mark the account's other `running` rows abandoned; call only while holding its lock."""
    with engine.begin() as conn:
        orphans = [
            row.id
            for row in conn.execute(
                select(sync_runs.c.id).where(
                    sync_runs.c.account == account,
                    sync_runs.c.status == RUN_RUNNING,
                    sync_runs.c.id != found_by,
                )
            )
        ]
        if orphans:
            conn.execute(
                update(sync_runs)
                .where(sync_runs.c.id.in_(orphans), sync_runs.c.status == RUN_RUNNING)
                .values(
                    status=RUN_ABANDONED,
                    finished_at=now,
                    error=ABANDONED_REASON.format(run_id=found_by),
                )
            )
    return orphans


def finish_run(
    conn: Connection,
    run_id: int,
    counts: Counts,
    now: datetime,
    listing_digest: str | None = None,
) -> None:
    """Mark the run successful inside the caller's (data) transaction."""
    conn.execute(
        update(sync_runs)
        .where(sync_runs.c.id == run_id)
        .values(
            status=RUN_SUCCESS,
            finished_at=now,
            error=None,
            listing_digest=listing_digest,
            **_count_values(counts),
        )
    )


def unchanged_since(
    conn: Connection, account: str, listing_digest: str, resource: str = "datasets"
) -> tuple[int, Counts] | None:
    """If the tables still hold exactly what this listing would make them, the run that wrote it.

    True when the account's newest successful run of `resource` read a listing with this
    digest and no run of it has written since (under the write lock, so nothing can slip in).
    Returns that run's id and the counts a full diff would now produce (all unchanged).
    """
    newest = conn.execute(
        select(
            sync_runs.c.id,
            sync_runs.c.finished_at,
            sync_runs.c.listing_digest,
            sync_runs.c.datasets_seen,
            sync_runs.c.inserted,
            sync_runs.c.updated,
            sync_runs.c.unchanged,
            sync_runs.c.rejected,
        )
        .where(
            sync_runs.c.account == account,
            sync_runs.c.resource == resource,
            sync_runs.c.status == RUN_SUCCESS,
        )
        .order_by(sync_runs.c.id.desc())
        .limit(1)
    ).first()
    if newest is None or newest.listing_digest != listing_digest:
        return None
    # Any successful run that changed rows after it (of any account: a dataset listed by
    # two accounts is one row) means the stored rows may differ from this listing. Runs of
    # the details never change a listing's columns.
    wrote = sync_runs.c.inserted + sync_runs.c.updated + sync_runs.c.deleted > 0
    later = (sync_runs.c.id > newest.id) | (sync_runs.c.finished_at >= newest.finished_at)
    changed = conn.execute(
        select(sync_runs.c.id)
        .where(
            sync_runs.c.status == RUN_SUCCESS,
            sync_runs.c.resource == resource,
            sync_runs.c.id != newest.id,
            wrote,
            later,
        )
        .limit(1)
    ).first()
    if changed is not None:
        return None
    valid = newest.inserted + newest.updated + newest.unchanged
    return newest.id, Counts(seen=newest.datasets_seen, unchanged=valid, rejected=newest.rejected)


def fail_run(engine: Engine, run_id: int, error: str, counts: Counts, now: datetime) -> None:
    """Mark the run failed, in a transaction of its own."""
    if len(error) > MAX_ERROR_LENGTH:
        error = error[: MAX_ERROR_LENGTH - 1] + "…"
    with engine.begin() as conn:
        conn.execute(
            update(sync_runs)
            .where(sync_runs.c.id == run_id)
            .values(status=RUN_FAILED, finished_at=now, error=error, **_count_values(counts))
        )


def latest_runs(engine: Engine, per_account: int = 5) -> list[RunRow]:
    """The newest `per_account` runs of every account and resource, newest first in each."""
    ranked = select(
        sync_runs,
        func.row_number()
        .over(
            partition_by=(sync_runs.c.account, sync_runs.c.resource),
            order_by=sync_runs.c.id.desc(),
        )
        .label("run_rank"),
    ).subquery()
    query = (
        select(*[ranked.c[c.name] for c in sync_runs.columns])
        .where(ranked.c.run_rank <= per_account)
        .order_by(ranked.c.account, ranked.c.id.desc())
    )
    with reading(engine).connect() as conn:
        return [RunRow(**row._mapping) for row in conn.execute(query)]


def last_successes(engine: Engine) -> dict[tuple[str, str], datetime]:
    """When each (account, resource)'s newest successful run finished."""
    query = (
        select(sync_runs.c.account, sync_runs.c.resource, func.max(sync_runs.c.finished_at))
        .where(sync_runs.c.status == RUN_SUCCESS)
        .group_by(sync_runs.c.account, sync_runs.c.resource)
    )
    with reading(engine).connect() as conn:
        return {
            (account, resource): _as_utc(finished)
            for account, resource, finished in conn.execute(query)
            if finished
        }


def _as_utc(value: datetime) -> datetime:
    # func.max() loses the column type on some backends, so re-attach UTC here.
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _count_values(counts: Counts) -> dict[str, int]:
    return {
        "datasets_seen": counts.seen,
        "inserted": counts.inserted,
        "updated": counts.updated,
        "unchanged": counts.unchanged,
        "deleted": counts.deleted,
        "rejected": counts.rejected,
    }
