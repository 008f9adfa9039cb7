#!/usr/bin/env python3
"""Benchmark the concurrent details fetch (issue 17) against its ideal time.

A local HTTP server (the test suite's `tests.fakeapi.FakeApi`) serves N synthetic datasets,
each with a couple of files, and answers every `GET /datasets/{id}` after `--delay` seconds.
The real CLI runs a first sync as a separate process (`python -m sync run`, a fresh SQLite
file each time, `IDEOGRAM_SYNC_RESOURCES=datasets,dataset_details`, `[sync]
details_concurrency` from a config file): one `GET /datasets`, then one details request per
dataset.

The details phase is timed by the tool's own record of it: `finished_at - started_at` of the
`sync_runs` row with `resource = 'dataset_details'` (choosing what is due, fetching, and
writing the files, without interpreter start-up, migrations and the listing). The ideal is
N x delay / concurrency: every worker always waiting on the server, nothing else costing
anything. The target of issue 17: ratio = details time / ideal <= 1.3 at N = 2,000, 20 ms,
concurrency 4 (ideal 10 s), median over the repetitions.

The server also records, for each details request, when it arrived and when its answer was
written, and on which connection (a handler thread per connection): the report splits the
details run into before the first request, the fetch window (first request in to last answer
out) and after the last answer (applying the bodies and committing), and gives the client's
mean gap between an answer and the next request on the same connection (its per-request
overhead), the connections used and the most requests in flight at once (at most the
concurrency, or the fetcher is not bounded).

    python benchmarks/bench_details.py                       # N = 2,000, 20 ms, c = 4, 3 runs
    python benchmarks/bench_details.py --datasets 20 --delay 0.001 --repeat 1   # smoke test

Writes `results.json` and `results.md` to `--out` (default `benchmarks/results/details/`).
See docs/benchmarks.md, "Details fetch (issue 17)".
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sync import _commit, _machine, code_fingerprint, project_code  # noqa: E402

API_KEY = "bench-key-0123456789"
RESOURCES = "datasets,dataset_details"
FILES_PER_DATASET = 2
TARGET_RATIO = 1.3
DEFAULT_DATASETS = 2_000
DEFAULT_DELAY = 0.02
DEFAULT_CONCURRENCY = 4
DEFAULT_CONTEXT = (1, 8)


class BenchmarkError(Exception):
    """A run failed or did not do what a first sync means."""


# --------------------------------------------------------------------------------------
# The server.
# --------------------------------------------------------------------------------------


def start_server(n: int, delay: float, plain: bool = False) -> Any:
    """A FakeApi with `n` synthetic datasets of FILES_PER_DATASET files each, answering every
    details request after `delay` seconds, that records each request's span and connection.

    Unless `plain` (FakeApi exactly as the tests use it), one thing of the fake that a real
    API does not do is undone, so that what is measured is the tool (FakeApi itself sets
    TCP_NODELAY, without which each answer waited about 40 ms for the client's delayed ACK):

    - Per-request CPU. FakeApi finds a dataset by scanning the listing under its lock and
      encodes the body on every request (about 0.2 ms a request at N = 2,000, on the same
      cores as the tool); here each body is encoded once, up front. The bodies are the ones
      FakeApi would send.
    """
    from tests.fakeapi import FakeApi, Reply, file, synthetic

    class DetailsApi(FakeApi):
        def __init__(self) -> None:
            super().__init__()
            # (path, arrived, answered, handler thread = connection), wall clock seconds.
            self.spans: list[tuple[str, float, float, int]] = []
            self.bodies: dict[str, bytes] = {}

        def load(self, n: int, delay: float) -> None:
            self.datasets = synthetic(n)
            self.files = {
                d["dataset_id"]: [
                    file(f"{d['dataset_id']}-{k}.png", 1000 + k) for k in range(FILES_PER_DATASET)
                ]
                for d in self.datasets
            }
            self.detail_delay = delay
            if plain:
                return
            self.bodies = {
                f"/datasets/{d['dataset_id']}": Reply(
                    200,
                    {
                        "dataset": d,
                        "file_count": FILES_PER_DATASET,
                        "files": self.files[d["dataset_id"]],
                        "custom_model_ids": [],
                    },
                ).encoded()
                for d in self.datasets
            }

        def reset(self) -> None:
            with self._lock:
                self.requests.clear()
                self.times.clear()
                self.spans.clear()
                self.max_in_flight = 0

        def _answer(self, path: str, key: str | None) -> Reply:
            body = None if plain else self.bodies.get(path)
            if body is not None:
                return Reply(200, body, delay=self.detail_delay)
            return super()._answer(path, key)

        def _handle(self, handler: Any) -> None:
            arrived = time.time()
            try:
                super()._handle(handler)
            finally:
                answered = time.time()
                with self._lock:
                    self.spans.append((handler.path, arrived, answered, threading.get_ident()))

    api = DetailsApi()
    api.load(n, delay)
    return api


# --------------------------------------------------------------------------------------
# One run.
# --------------------------------------------------------------------------------------


def child_env(api_url: str) -> dict[str, str]:
    """Our environment minus the tool's settings, plus the key, the URL and the resources."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDEOGRAM_", "MY_IDEOGRAM"))}
    env["IDEOGRAM_API_KEY"] = API_KEY
    env["IDEOGRAM_API_BASE_URL"] = api_url
    env["IDEOGRAM_SYNC_RESOURCES"] = RESOURCES
    return env


def _utc(text: str) -> float:
    """A sync_runs timestamp (naive UTC text on SQLite) as epoch seconds."""
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def read_runs(path: Path) -> dict[str, dict[str, Any]]:
    """The sync_runs rows of the file by resource: status, counts, start and end (epoch s)."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT resource, status, started_at, finished_at, datasets_seen, inserted, "
            "rejected, error FROM sync_runs ORDER BY id"
        ).fetchall()
        files = conn.execute("SELECT count(*) FROM dataset_files").fetchone()[0]
    finally:
        conn.close()
    runs: dict[str, dict[str, Any]] = {}
    for resource, status, started, finished, seen, inserted, rejected, error in rows:
        runs[resource] = {
            "status": status,
            "started": _utc(started),
            "finished": _utc(finished) if finished else None,
            "seen": seen,
            "inserted": inserted,
            "rejected": rejected,
            "error": error,
        }
    runs["_files"] = {"count": files}
    return runs


def server_profile(spans: list[tuple[str, float, float, int]], delay: float) -> dict[str, Any]:
    """What the server saw of the details requests: count, window, connections, gaps."""
    details = sorted((s for s in spans if s[0].startswith("/datasets/")), key=lambda s: s[1])
    if not details:
        return {"requests": 0}
    by_connection: dict[int, list[tuple[float, float]]] = {}
    for _path, arrived, answered, conn in details:
        by_connection.setdefault(conn, []).append((arrived, answered))
    gaps = []
    for seq in by_connection.values():
        seq.sort()
        gaps += [nxt[0] - prev[1] for prev, nxt in itertools.pairwise(seq)]
    served = [answered - arrived for _p, arrived, answered, _c in details]
    return {
        "requests": len(details),
        "first_arrived": details[0][1],
        "last_answered": max(s[2] for s in details),
        "connections": len(by_connection),
        "server_ms_mean": round(statistics.mean(served) * 1000, 3),
        "server_overhead_ms_mean": round((statistics.mean(served) - delay) * 1000, 3),
        "client_gap_ms_mean": round(statistics.mean(gaps) * 1000, 3) if gaps else None,
        "client_gap_ms_p95": (
            round(statistics.quantiles(gaps, n=20)[-1] * 1000, 3) if len(gaps) >= 20 else None
        ),
        "client_gap_ms_max": round(max(gaps) * 1000, 3) if gaps else None,
    }


def run_once(
    api: Any,
    n: int,
    delay: float,
    concurrency: int,
    workdir: Path,
    timeout: float,
) -> dict[str, Any]:
    """One first sync at `concurrency` into a fresh SQLite file; its measurements."""
    database = workdir / f"bench-c{concurrency}-{time.monotonic_ns()}.db"
    config = workdir / f"details-c{concurrency}.toml"
    config.write_text(f"[sync]\ndetails_concurrency = {concurrency}\n")
    argv = [
        sys.executable,
        "-m",
        "sync",
        "--config",
        str(config),
        "--log-level",
        "WARNING",
        "--database-url",
        f"sqlite:///{database}",
        "run",
    ]
    api.reset()
    start = time.perf_counter()
    try:
        result = subprocess.run(
            argv,
            env=child_env(api.url),
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"concurrency {concurrency}: no exit within {timeout:.0f}s") from None
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise BenchmarkError(
            f"concurrency {concurrency}: exit {result.returncode}\n{result.stderr[-3000:]}"
        )
    try:
        runs = read_runs(database)
    finally:
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
    listing, details = runs.get("datasets"), runs.get("dataset_details")
    if listing is None or details is None:
        raise BenchmarkError(f"concurrency {concurrency}: run rows {sorted(runs)}")
    for name, row in (("datasets", listing), ("dataset_details", details)):
        if row["status"] != "success" or row["inserted"] != n or row["rejected"]:
            raise BenchmarkError(f"concurrency {concurrency}: {name} run row {row}, want {n} new")
    if runs["_files"]["count"] != n * FILES_PER_DATASET:
        raise BenchmarkError(
            f"concurrency {concurrency}: {runs['_files']['count']} dataset_files rows, "
            f"want {n * FILES_PER_DATASET}"
        )
    with api._lock:
        spans = list(api.spans)
        max_in_flight = api.max_in_flight
    profile = server_profile(spans, delay)
    if profile["requests"] != n:
        raise BenchmarkError(f"concurrency {concurrency}: {profile['requests']} details requests")
    ideal = n * delay / concurrency
    details_s = details["finished"] - details["started"]
    fetch_s = profile.pop("last_answered") - profile["first_arrived"]
    before_s = profile.pop("first_arrived") - details["started"]
    return {
        "concurrency": concurrency,
        "wall_s": round(wall, 4),
        "listing_s": round(listing["finished"] - listing["started"], 4),
        "details_s": round(details_s, 4),
        "ideal_s": round(ideal, 4),
        "ratio": round(details_s / ideal, 4),
        "fetch_s": round(fetch_s, 4),
        "fetch_ratio": round(fetch_s / ideal, 4),
        "before_fetch_s": round(before_s, 4),
        "after_fetch_s": round(details_s - before_s - fetch_s, 4),
        "max_in_flight": max_in_flight,
        **profile,
    }


# --------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], limit: float | None) -> dict[str, Any]:
    """One concurrency's repetitions: medians, the verdict (for the target concurrency)."""
    ratios = [r["ratio"] for r in runs]
    median = statistics.median(ratios)
    summary: dict[str, Any] = {
        "concurrency": runs[0]["concurrency"],
        "ideal_s": runs[0]["ideal_s"],
        "ratios": ratios,
        "median_ratio": round(median, 4),
        "median_details_s": round(statistics.median(r["details_s"] for r in runs), 4),
        "median_fetch_ratio": round(statistics.median(r["fetch_ratio"] for r in runs), 4),
        "median_wall_s": round(statistics.median(r["wall_s"] for r in runs), 4),
        "max_in_flight": max(r["max_in_flight"] for r in runs),
        "bounded": all(r["max_in_flight"] <= r["concurrency"] for r in runs),
        "runs": runs,
    }
    if limit is not None:
        summary["limit"] = limit
        summary["pass"] = median <= limit and summary["bounded"]
    return summary


def render_markdown(report: dict[str, Any]) -> str:
    """results.md: the verdict, then every run."""
    meta = report["meta"]
    target = report["target"]
    lines = [
        "# ideogram-sync details fetch benchmark",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}, Python {meta['python']}",
        f"- commit: {meta['commit']} (code {meta['code_fingerprint']}"
        + (", changed during the run!" if meta.get("code_changed_during_run") else "")
        + ")",
        f"- {meta['datasets']:,} datasets x {meta['delay'] * 1000:g} ms per details request, "
        f"{meta['repeat']} repetition(s); SQLite, fresh file per run",
        f"- server: {meta['server']}",
        "",
    ]
    if target is not None:
        verdict = "PASS" if target["pass"] else "FAIL"
        lines += [
            f"**Concurrency {target['concurrency']}: median ratio {target['median_ratio']:.3f} "
            f"(limit {target['limit']:g}) {verdict}**; ideal {target['ideal_s']:.3f} s, "
            f"max in flight {target['max_in_flight']}"
            + ("" if target["bounded"] else " (above the concurrency!)"),
            "",
        ]
    lines += [
        "| concurrency | rep | ideal s | details s | ratio | fetch s | fetch ratio "
        "| before s | after s | whole run s | requests | connections | max in flight "
        "| client gap ms (mean / p95) | server overhead ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: |",
    ]
    for summary in report["results"]:
        for rep, r in enumerate(summary["runs"], 1):
            gap = r.get("client_gap_ms_mean")
            p95 = r.get("client_gap_ms_p95")
            gaps = "-" if gap is None else f"{gap:.2f} / " + ("-" if p95 is None else f"{p95:.2f}")
            lines.append(
                f"| {r['concurrency']} | {rep} | {r['ideal_s']:.3f} | {r['details_s']:.3f} | "
                f"{r['ratio']:.3f} | {r['fetch_s']:.3f} | {r['fetch_ratio']:.3f} | "
                f"{r['before_fetch_s']:.3f} | {r['after_fetch_s']:.3f} | {r['wall_s']:.3f} | "
                f"{r['requests']:,} | {r['connections']} | {r['max_in_flight']} | {gaps} | "
                f"{r['server_overhead_ms_mean']:.2f} |"
            )
    lines += [
        "",
        "details s: the dataset_details run's finished_at - started_at (sync_runs). "
        "ratio = details s / ideal (N x delay / concurrency). fetch s: first details request "
        "in to last answer out, at the server; before/after: the rest of the details run "
        "(choosing what is due; applying the bodies and committing). client gap: on one "
        "connection, from an answer written to the next request received.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from None
    if any(not 1 <= v <= 64 for v in values):
        raise argparse.ArgumentTypeError("a concurrency is between 1 and 64")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(
        description="Time the details phase of a first sync against N x delay / concurrency."
    )
    parser.add_argument(
        "--datasets",
        type=int,
        default=DEFAULT_DATASETS,
        help=f"datasets in the listing (default: {DEFAULT_DATASETS})",
    )
    parser.add_argument(
        "--delay",
        type=float,
        default=DEFAULT_DELAY,
        help=f"seconds before each details answer (default: {DEFAULT_DELAY})",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"[sync] details_concurrency of the timed runs (default: {DEFAULT_CONCURRENCY})",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs at --concurrency (default: 3)")
    parser.add_argument(
        "--context",
        type=_concurrencies,
        default=list(DEFAULT_CONTEXT),
        help="other concurrencies, one run each, for context ('' for none; default: 1,8)",
    )
    parser.add_argument(
        "--limit",
        type=float,
        default=TARGET_RATIO,
        help=f"the largest passing median ratio (default: {TARGET_RATIO})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results" / "details",
        help="folder for results.json and results.md (default: benchmarks/results/details)",
    )
    parser.add_argument(
        "--plain-fakeapi",
        action="store_true",
        help="serve with tests.fakeapi.FakeApi as the tests use it: Nagle's algorithm on "
        "(about 40 ms more per request) and the listing scanned per request",
    )
    parser.add_argument("--label", default="", help="free text recorded in the report")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when it ran (whatever the verdict), 1 when a run failed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.datasets < 1 or args.delay <= 0 or args.repeat < 1:
        parser.error("--datasets and --repeat must be at least 1, --delay above 0")
    if not 1 <= args.concurrency <= 64:
        parser.error("--concurrency must be between 1 and 64")
    n, delay = args.datasets, args.delay

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="ideogram-bench-details-"))
    api = start_server(n, delay, plain=args.plain_fakeapi)
    package = project_code(child_env(api.url))
    report: dict[str, Any] = {
        "meta": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": _machine(),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "label": args.label,
            "project_code": str(package),
            "commit": _commit(package),
            "code_fingerprint": code_fingerprint(package),
            "datasets": n,
            "files_per_dataset": FILES_PER_DATASET,
            "delay": delay,
            "concurrency": args.concurrency,
            "repeat": args.repeat,
            "context": args.context,
            "server": "FakeApi as the tests use it (Nagle on)"
            if args.plain_fakeapi
            else "FakeApi with TCP_NODELAY and pre-encoded details bodies",
            "argv": list(sys.argv[1:] if argv is None else argv),
        },
        "target": None,
        "results": [],
    }
    plan: list[tuple[int, int, float | None]] = [(args.concurrency, args.repeat, args.limit)]
    plan += [(c, 1, None) for c in args.context if c != args.concurrency]
    try:
        for concurrency, repeat, limit in plan:
            # A generous bound: the ideal time three times over, plus start-up and listing.
            timeout = 120 + 3 * n * delay / concurrency
            runs = []
            for rep in range(repeat):
                measured = run_once(api, n, delay, concurrency, workdir, timeout)
                runs.append(measured)
                log(
                    f"c={concurrency} {rep + 1}/{repeat}: details {measured['details_s']:.3f}s "
                    f"(ideal {measured['ideal_s']:.3f}s, ratio {measured['ratio']:.3f}), "
                    f"whole run {measured['wall_s']:.3f}s, "
                    f"max in flight {measured['max_in_flight']}"
                )
            summary = summarize(runs, limit)
            report["results"].append(summary)
            if limit is not None:
                report["target"] = {k: v for k, v in summary.items() if k != "runs"}
            _write(args.out, report)
    except BenchmarkError as exc:
        log(f"benchmark failed: {exc}")
        return 1
    finally:
        api.close()
        shutil.rmtree(workdir, ignore_errors=True)
    sys.stdout.write(render_markdown(report))
    log(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


def _write(out: Path, report: dict[str, Any]) -> None:
    meta = report["meta"]
    meta["code_changed_during_run"] = (
        code_fingerprint(Path(meta["project_code"])) != meta["code_fingerprint"]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(render_markdown(report))


if __name__ == "__main__":
    raise SystemExit(main())
