"""The benchmark still works: `benchmarks/bench_sync.py --quick` at N = 1,000, no timing checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "bench_sync.py"
PHASES = ("first", "unchanged", "changed_1pct")
TOOL_KEYS = {"median_s", "rows_per_s", "peak_rss_mb", "wall_s", "rss_mb"}


def test_benchmark_quick_run_writes_results_for_every_phase(tmp_path: Path) -> None:
    """--quick exits 0 and reports project and baseline numbers for each backend and phase."""
    backends = ["sqlite"]
    args = [sys.executable, str(BENCH), "--quick", "--out", str(tmp_path / "out")]
    postgres_url = os.environ.get("TEST_POSTGRES_URL")
    if postgres_url:
        backends.append("postgresql")
        args += ["--postgres-url", postgres_url]
    args += ["--backends", ",".join(backends)]

    result = subprocess.run(
        args, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False
    )

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (tmp_path / "out" / "results.md").read_text().startswith("# ideogram-sync benchmark")
    assert {"meta", "startup", "results", "targets"} <= report.keys()
    assert set(report["meta"]["backends"]) == set(backends)
    assert {"help", "status", "python", "sqlalchemy"} <= report["startup"].keys()
    for item in report["startup"].values():
        assert item["median_s"] > 0
    found = {(r["backend"], r["n"], r["phase"]): r for r in report["results"]}
    assert set(found) == {(b, 1000, p) for b in backends for p in PHASES}
    for row in found.values():
        assert row["repeat"] == 1
        assert row["ratio"] > 0
        for tool in ("project", "baseline"):
            assert row[tool].keys() >= TOOL_KEYS
            assert len(row[tool]["wall_s"]) == 1
            assert row[tool]["peak_rss_mb"] > 0
    # At N = 1,000 only the start-up target can be checked (the ratios are at 1,000,000).
    assert {t["target"] for t in report["targets"]} == {"`ideogram-sync status` start-up"}
    assert all(isinstance(t["pass"], bool) for t in report["targets"])
    # The floors: one per backend for the 1% re-run, and SQLAlchemy's import for `status`.
    floors = {(f["floor"], f["backend"]): f for f in report["floors"]}
    one_pct = "changed_1pct at N=1,000: project unchanged run / 1% baseline"
    assert set(floors) == {(one_pct, b) for b in backends} | {
        ('`status` start-up: `python -c "import sqlalchemy"`', "-")
    }
    assert all(f["value"] > 0 for f in floors.values())
    assert "## Floors" in (tmp_path / "out" / "results.md").read_text()


DETAILS_BENCH = REPO / "benchmarks" / "bench_details.py"


def test_details_benchmark_tiny_run_writes_results(tmp_path: Path) -> None:
    """bench_details.py at 20 datasets and 1 ms exits 0 and writes every run's numbers."""
    out = tmp_path / "out"
    args = [sys.executable, str(DETAILS_BENCH), "--datasets", "20", "--delay", "0.001"]
    args += ["--repeat", "1", "--context", "2", "--out", str(out)]

    result = subprocess.run(
        args, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# ideogram-sync details fetch benchmark")
    assert report["meta"]["datasets"] == 20
    assert [s["concurrency"] for s in report["results"]] == [4, 2]
    target = report["target"]
    assert target["concurrency"] == 4 and target["limit"] == 1.3
    assert isinstance(target["pass"], bool)
    for summary in report["results"]:
        (run,) = summary["runs"]
        assert run["requests"] == 20
        assert 1 <= run["max_in_flight"] <= run["concurrency"]
        assert run["details_s"] > 0 and run["ratio"] > 0 and run["wall_s"] > 0
