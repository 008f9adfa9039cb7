"""The daemon's Prometheus exposition: which series exist before any run, and after runs."""

from __future__ import annotations

import re

import sync
from sync.config import RESOURCES
from sync.errors import LockHeld, SyncError
from sync.job import Outcome, RunResult
from sync.metrics import Metrics
from sync.models import Counts

ACCOUNTS = ("one", "two")
RUNS = "ideogram_sync_runs_total"
ROWS = "ideogram_sync_rows_total"
DURATION_COUNT = "ideogram_sync_run_duration_seconds_count"
RESOURCE = re.compile(r'resource="([^"]*)"')
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def series(name: str, **labels: str) -> str:
    """`name{labels}` with the labels in name order, as samples() writes them."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def samples(metrics: Metrics) -> dict[str, float]:
    """`name{labels}` -> value for every sample line of the exposition, the labels in name
    order."""
    found = {}
    for line in metrics.exposition().decode().splitlines():
        if line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, line
        labels = dict(LABEL.findall(match.group(2) or ""))
        key = series(match.group(1), **labels)
        assert key not in found, line
        found[key] = float(match.group(3))
    return found


def test_every_accounts_series_exist_at_0_before_any_run() -> None:
    found = samples(Metrics(ACCOUNTS))
    for account in ACCOUNTS:
        for resource in RESOURCES:
            for status in ("success", "failed", "locked", "skipped"):
                name = series(RUNS, account=account, resource=resource, status=status)
                assert found[name] == 0
            for change in ("inserted", "updated", "unchanged", "deleted", "rejected"):
                name = series(ROWS, account=account, resource=resource, change=change)
                assert found[name] == 0
            assert found[series(DURATION_COUNT, account=account, resource=resource)] == 0
        # Read from the database, never assumed: absent until it has been read.
        for gauge in ("last_success", "datasets_active", "models_active"):
            assert not any(f'account="{account}"' in name for name in found if gauge in name)


def test_only_the_configured_resources_have_series() -> None:
    found = samples(Metrics(ACCOUNTS, resources=("datasets", "models")))
    labelled = [
        name for name in found if name.startswith(("ideogram_sync_run", "ideogram_sync_rows"))
    ]
    resources = {
        found_resource.group(1) for name in labelled if (found_resource := RESOURCE.search(name))
    }
    assert all('resource="' in name for name in labelled)
    assert resources == {"datasets", "models"}
    # 2 accounts x 2 resources x (4 statuses + 5 changes + count, sum, 13 buckets)
    assert len(labelled) == 2 * 2 * (4 + 5 + 2 + 13)
    assert found[series(RUNS, account="two", resource="models", status="failed")] == 0
    assert found[series(DURATION_COUNT, account="one", resource="datasets")] == 0


def test_no_created_series_and_a_build_info_with_the_version() -> None:
    metrics = Metrics(ACCOUNTS)
    metrics.record(Outcome("one", error=SyncError("HTTP 500")))
    text = metrics.exposition().decode()
    assert "_created" not in text, text
    assert samples(metrics)[series("ideogram_sync_build_info", version=sync.__version__)] == 1


def test_recording_any_outcome_adds_no_series() -> None:
    """The series created at start are every series a run can produce (none appears later,
    which is what increase() over the first failure needs)."""
    metrics = Metrics(ACCOUNTS)
    before = samples(metrics)
    counts = Counts(seen=6, inserted=1, updated=1, unchanged=1, deleted=1, rejected=2)
    for account in ACCOUNTS:
        for resource in RESOURCES:
            result = RunResult(7, account, counts, 1.5, resource=resource)
            metrics.record(Outcome(account, resource, result=result))
            metrics.record(Outcome(account, resource, error=SyncError("HTTP 500")))
            metrics.record(Outcome(account, resource, error=LockHeld("held by another run")))
            metrics.record(Outcome(account, resource))  # the slot was already synced
    after = samples(metrics)
    assert set(after) == set(before)
    for resource in RESOURCES:
        for status in ("success", "failed", "locked", "skipped"):
            assert after[series(RUNS, account="one", resource=resource, status=status)] == 1
        assert after[series(ROWS, account="two", resource=resource, change="rejected")] == 2
        assert after[series(DURATION_COUNT, account="two", resource=resource)] == 1


def test_each_outcome_counts_under_its_own_account_and_resource() -> None:
    metrics = Metrics(ACCOUNTS)
    before = samples(metrics)
    details = RunResult(8, "one", Counts(seen=3, inserted=3), 2.0, resource="dataset_details")
    metrics.record(Outcome("one", "models", error=SyncError("HTTP 500")))
    metrics.record(Outcome("one", "dataset_details", result=details))
    metrics.record(Outcome("two", error=SyncError("HTTP 500")))  # datasets, by default
    after = samples(metrics)
    assert set(after) == set(before)
    one_details = {"account": "one", "resource": "dataset_details"}
    expected = {
        series(RUNS, account="one", resource="models", status="failed"): 1,
        series(RUNS, status="success", **one_details): 1,
        series(ROWS, change="inserted", **one_details): 3,
        series(DURATION_COUNT, **one_details): 1,
        series("ideogram_sync_run_duration_seconds_sum", **one_details): 2.0,
        series(RUNS, account="two", resource="datasets", status="failed"): 1,
    } | {
        series("ideogram_sync_run_duration_seconds_bucket", le=le, **one_details): 1
        for le in (
            "2.5",
            "5.0",
            "10.0",
            "30.0",
            "60.0",
            "120.0",
            "300.0",
            "600.0",
            "1800.0",
            "+Inf",
        )
    }
    changed = {name: value for name, value in after.items() if value != before[name]}
    assert changed == expected
