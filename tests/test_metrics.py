"""The daemon's Prometheus exposition: which series exist before any run, and after runs."""

from __future__ import annotations

import re

import sync
from sync.errors import LockHeld, SyncError
from sync.job import Outcome, RunResult
from sync.metrics import Metrics
from sync.models import Counts

ACCOUNTS = ("one", "two")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def samples(metrics: Metrics) -> dict[str, float]:
    """`name{labels}` -> value for every sample line of the exposition."""
    found = {}
    for line in metrics.exposition().decode().splitlines():
        if line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, line
        found[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return found


def test_every_accounts_series_exist_at_0_before_any_run() -> None:
    found = samples(Metrics(ACCOUNTS))
    for account in ACCOUNTS:
        for status in ("success", "failed", "locked", "skipped"):
            assert found[f'ideogram_sync_runs_total{{account="{account}",status="{status}"}}'] == 0
        for change in ("inserted", "updated", "unchanged", "deleted", "rejected"):
            assert found[f'ideogram_sync_rows_total{{account="{account}",change="{change}"}}'] == 0
        assert found[f'ideogram_sync_run_duration_seconds_count{{account="{account}"}}'] == 0
        # Read from the database, never assumed: absent until it has been read.
        assert not any(f'account="{account}"' in name for name in found if "last_success" in name)
        assert not any(
            f'account="{account}"' in name for name in found if "datasets_active" in name
        )


def test_no_created_series_and_a_build_info_with_the_version() -> None:
    metrics = Metrics(ACCOUNTS)
    metrics.record(Outcome("one", error=SyncError("HTTP 500")))
    text = metrics.exposition().decode()
    assert "_created" not in text, text
    assert samples(metrics)[f'ideogram_sync_build_info{{version="{sync.__version__}"}}'] == 1


def test_recording_any_outcome_adds_no_series() -> None:
    """The series created at start are every series a run can produce (none appears later,
    which is what increase() over the first failure needs)."""
    metrics = Metrics(ACCOUNTS)
    before = samples(metrics)
    counts = Counts(seen=6, inserted=1, updated=1, unchanged=1, deleted=1, rejected=2)
    for account in ACCOUNTS:
        metrics.record(Outcome(account, result=RunResult(7, account, counts, 1.5)))
        metrics.record(Outcome(account, error=SyncError("HTTP 500")))
        metrics.record(Outcome(account, error=LockHeld("held by another run")))
        metrics.record(Outcome(account))  # the slot was already synced
    after = samples(metrics)
    assert set(after) == set(before)
    for status in ("success", "failed", "locked", "skipped"):
        assert after[f'ideogram_sync_runs_total{{account="one",status="{status}"}}'] == 1
    assert after['ideogram_sync_rows_total{account="two",change="rejected"}'] == 2
    assert after['ideogram_sync_run_duration_seconds_count{account="two"}'] == 1
