"""dataset_history and the views, on every backend."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from alembic import command

from sync.db import alembic_config, make_engine, migrate
from sync.models import sync_runs
from tests.conftest import rows
from tests.fakeapi import FakeApi, Reply, dataset


def history(url: str) -> list[dict[str, Any]]:
    return rows(url, "dataset_history", order="id")


def view(url: str, name: str) -> list[dict[str, Any]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text(f"SELECT * FROM {name}"))]
    finally:
        engine.dispose()


def as_of(versions: list[dict[str, Any]], when: datetime) -> dict[str, str]:
    """The listing (id -> name) that the history says was current at `when`."""
    return {
        v["dataset_id"]: v["name"]
        for v in versions
        if v["valid_from"] <= when
        and (v["valid_to"] is None or when < v["valid_to"])
        and v["change_type"] != "delete"
    }


def test_history_records_each_version(cli, fake_api: FakeApi, db_url: str) -> None:
    listings = [
        [dataset("a"), dataset("b")],
        [dataset("a"), dataset("b")],  # unchanged: no history rows
        [dataset("a", "A2"), dataset("b")],  # update
        [dataset("a", "A2")],  # delete b
        [dataset("a", "A2"), dataset("b", "B2")],  # restore b with a new name
    ]
    moments = []
    for listing in listings:
        fake_api.datasets = listing
        assert cli("--database-url", db_url, "run").code == 0
        moments.append(datetime.now(UTC))

    versions = history(db_url)
    summary = [(v["dataset_id"], v["change_type"], v["name"]) for v in versions]
    assert summary == [
        ("a", "insert", "Dataset a"),
        ("b", "insert", "Dataset b"),
        ("a", "update", "A2"),
        ("b", "delete", "Dataset b"),
        ("b", "restore", "B2"),
    ]
    current = [v for v in versions if v["valid_to"] is None]
    assert sorted((v["dataset_id"], v["name"]) for v in current) == [("a", "A2"), ("b", "B2")]
    for old in (v for v in versions if v["valid_to"] is not None):
        assert old["valid_to"] >= old["valid_from"]
    run_ids = [r["id"] for r in rows(db_url, "sync_runs", order="id")]
    assert [v["sync_run_id"] for v in versions] == [
        run_ids[0],
        run_ids[0],
        run_ids[2],
        run_ids[3],
        run_ids[4],
    ]
    # Every earlier listing can be rebuilt from the history.
    for listing, moment in zip(listings, moments, strict=True):
        assert as_of(versions, moment) == {d["dataset_id"]: d["name"] for d in listing}


def test_migration_backfills_history(db_url: str) -> None:
    engine = make_engine(db_url)
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0001")
        meta = sa.MetaData()
        datasets = sa.Table("datasets", meta, autoload_with=engine)
        with engine.begin() as conn:
            for dataset_id, deleted in (("kept", None), ("gone", now)):
                conn.execute(
                    datasets.insert().values(
                        dataset_id=dataset_id, account="default", name=dataset_id, user_id="u",
                        creation_time=now.replace(tzinfo=None), first_seen_at=now.replace(tzinfo=None),
                        updated_at=now.replace(tzinfo=None), deleted_at=deleted and deleted.replace(tzinfo=None),
                        last_sync_run_id=7,
                    )
                )  # fmt: skip
        migrate(engine)
    finally:
        engine.dispose()
    versions = {v["dataset_id"]: v for v in history(db_url)}
    assert set(versions) == {"kept", "gone"}
    assert versions["kept"]["change_type"] == "insert"
    assert versions["gone"]["change_type"] == "delete"
    assert all(v["valid_to"] is None and v["sync_run_id"] == 7 for v in versions.values())
    assert versions["kept"]["valid_from"] == now


def test_views(cli, fake_api: FakeApi, db_url: str) -> None:
    fake_api.datasets = [dataset("a"), dataset("b")]
    assert cli("--database-url", db_url, "run").code == 0
    fake_api.datasets = [dataset("a")]
    assert cli("--database-url", db_url, "run").code == 0
    fake_api.push(Reply(401))
    assert cli("--database-url", db_url, "run").code == 3

    current = view(db_url, "datasets_current")
    assert [r["dataset_id"] for r in current] == ["a"]
    assert "deleted_at" not in current[0]

    (latest,) = view(db_url, "sync_runs_latest")
    runs = rows(db_url, "sync_runs", order="id")
    assert latest["account"] == "default" and latest["run_id"] == runs[-1]["id"]
    assert latest["status"] == "failed"
    assert 0 <= latest["age_seconds"] < 120
    assert 0 <= latest["seconds_since_success"] < 120
    assert latest["last_success_at"] is not None

    (daily,) = view(db_url, "sync_daily")
    assert (daily["runs"], daily["successes"], daily["failures"]) == (3, 2, 1)
    assert (daily["inserted"], daily["updated"], daily["deleted"]) == (2, 0, 1)
    assert str(daily["day"])[:10] == runs[0]["started_at"].date().isoformat()


def test_day_and_age_are_utc(db_url: str) -> None:
    """A run at 23:30 UTC belongs to that UTC day, even for a client in another time zone."""
    engine = make_engine(db_url)
    started = datetime(2026, 3, 1, 23, 30, tzinfo=UTC)
    try:
        migrate(engine)
        with engine.begin() as conn:
            conn.execute(
                sync_runs.insert().values(
                    account="x", started_at=started, finished_at=started + timedelta(seconds=5),
                    status="success", datasets_seen=0, inserted=0, updated=0, unchanged=0,
                    deleted=0, rejected=0,
                )
            )  # fmt: skip
        with engine.connect() as conn:
            # What a BI tool sees when its session is not in UTC.
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SET TIME ZONE 'America/Los_Angeles'")
            elif conn.dialect.name in ("mysql", "mariadb"):
                conn.exec_driver_sql("SET time_zone = '-08:00'")
            day = conn.exec_driver_sql("SELECT day FROM sync_daily").scalar_one()
            age = conn.exec_driver_sql("SELECT age_seconds FROM sync_runs_latest").scalar_one()
    finally:
        engine.dispose()
    assert str(day)[:10] == "2026-03-01"
    expected = (datetime.now(UTC) - started - timedelta(seconds=5)).total_seconds()
    assert abs(age - expected) < 60


def test_sync_daily_counts_are_integers(db_url: str) -> None:
    """Every count of sync_daily reaches a BI tool as an integer, beyond 32 bits too: on
    MariaDB/MySQL a SUM used to come back as DECIMAL (Python's Decimal through the driver)."""
    engine = make_engine(db_url)
    started = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    try:
        migrate(engine)
        with engine.begin() as conn:
            for status, inserted in (("success", 2_000_000_000), ("failed", 2_000_000_000)):
                conn.execute(
                    sync_runs.insert().values(
                        account="x", started_at=started, finished_at=started, status=status,
                        datasets_seen=0, inserted=inserted, updated=1, unchanged=0, deleted=0,
                        rejected=2,
                    )
                )  # fmt: skip
        with engine.connect() as conn:
            daily = conn.exec_driver_sql("SELECT * FROM sync_daily").mappings().one()
    finally:
        engine.dispose()
    counts = {
        "runs": 2,
        "successes": 1,
        "failures": 1,
        "inserted": 4_000_000_000,
        "updated": 2,
        "deleted": 0,
        "rejected": 4,
    }
    assert {name: type(daily[name]) for name in counts} == dict.fromkeys(counts, int)
    assert {name: daily[name] for name in counts} == counts
