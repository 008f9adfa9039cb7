#!/usr/bin/env python3
"""Benchmark `ideogram-sync run` against a plain requests + json + SQL baseline.

A local HTTP server (the test suite's `tests.fakeapi.FakeApi`) serves N synthetic datasets
in the API's exact shape. For each backend, N and phase, the real CLI runs as a separate
process (`python -m sync run`), alternating with a baseline that is also a separate process
(this file in `--baseline-worker` mode): it fetches the same listing with requests, parses it
with `json` and writes it the fastest plain way (SQLite: one transaction of `executemany`
`INSERT … ON CONFLICT DO UPDATE … WHERE` changed; PostgreSQL: `COPY` into a temporary table,
then one `INSERT … ON CONFLICT DO UPDATE … WHERE … IS DISTINCT FROM`).

Phases: `first` (empty database), `unchanged` (the same listing again) and `changed_1pct`
(1% of the datasets renamed). Every timed run gets a fresh database, prepared identically for
both tools (for `unchanged` and `changed_1pct`, an untimed initial load by the same tool).

    python benchmarks/bench_sync.py                          # N = 1k, 10k, 100k; SQLite
    python benchmarks/bench_sync.py --million --backends sqlite
    BENCH_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/postgres python benchmarks/bench_sync.py
    python benchmarks/bench_sync.py --quick                  # CI smoke test: N = 1,000, once

Writes `results.json` and `results.md` to `--out` (default `benchmarks/results/`). See
docs/benchmarks.md for how to read them and for the targets.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import select
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
PHASES = ("first", "unchanged", "changed_1pct")
TOOLS = ("project", "baseline")
DEFAULT_SIZES = (1_000, 10_000, 100_000)
MILLION = 1_000_000
API_KEY = "bench-key-0123456789"
# Every RENAME_STRIDE-th dataset is renamed in the changed_1pct listing: 1%.
RENAME_STRIDE = 100
ACCOUNT = "default"

# The budget (issue 16). Ratios are project time / baseline time at N = 1,000,000; at
# N = 100,000 they are reported beside the floors, without a verdict.
TARGET_N = 1_000_000
RATIO_TARGETS = {"first": 1.6, "unchanged": 0.2, "changed_1pct": 0.7}
RSS_TARGET_MB = 400.0
# `status` start-up: at most this much more than `python -c "import sqlalchemy"`, same run.
STARTUP_OVER_SQLALCHEMY_S = 0.1

# The baseline's table: the columns of sync/models.py `datasets`, and the same indexes.
BASELINE_COLUMNS = (
    "dataset_id",
    "account",
    "name",
    "user_id",
    "creation_time",
    "cover_asset_type",
    "cover_asset_id",
    "extra",
    "first_seen_at",
    "updated_at",
    "deleted_at",
    "last_sync_run_id",
)
_CONTENT = ("name", "user_id", "creation_time", "cover_asset_type", "cover_asset_id", "extra")
_KNOWN_FIELDS = frozenset(
    {"dataset_id", "name", "user_id", "creation_time", "cover_asset_identifier"}
)
_KNOWN_COVER_FIELDS = frozenset({"asset_type", "asset_id"})
_INDEXES = ("user_id", "creation_time", "deleted_at", "account")


def _ddl(timestamp: str, json_type: str) -> list[str]:
    """CREATE TABLE/INDEX statements for the baseline's `datasets` table."""
    table = f"""CREATE TABLE IF NOT EXISTS datasets (
        dataset_id VARCHAR(255) NOT NULL PRIMARY KEY,
        account VARCHAR(255) NOT NULL,
        name VARCHAR(1024) NOT NULL,
        user_id VARCHAR(255) NOT NULL,
        creation_time {timestamp} NOT NULL,
        cover_asset_type VARCHAR(64),
        cover_asset_id VARCHAR(255),
        extra {json_type},
        first_seen_at {timestamp} NOT NULL,
        updated_at {timestamp} NOT NULL,
        deleted_at {timestamp},
        last_sync_run_id INTEGER NOT NULL
    )"""
    indexes = [f"CREATE INDEX IF NOT EXISTS ix_datasets_{c} ON datasets ({c})" for c in _INDEXES]
    return [table, *indexes]


_UPDATE_SET = ", ".join(
    [f"{c} = excluded.{c}" for c in ("account", *_CONTENT)]
    + [
        "updated_at = excluded.updated_at",
        "deleted_at = NULL",
        "last_sync_run_id = excluded.last_sync_run_id",
    ]
)

SQLITE_UPSERT = (
    f"INSERT INTO datasets ({', '.join(BASELINE_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in BASELINE_COLUMNS)}) "
    f"ON CONFLICT (dataset_id) DO UPDATE SET {_UPDATE_SET} "
    "WHERE "
    + " OR ".join(f"datasets.{c} IS NOT excluded.{c}" for c in _CONTENT)
    + " OR datasets.deleted_at IS NOT NULL"
)

POSTGRES_INCOMING = """CREATE TEMPORARY TABLE incoming (
    dataset_id VARCHAR(255) NOT NULL,
    name VARCHAR(1024) NOT NULL,
    user_id VARCHAR(255) NOT NULL,
    creation_time TIMESTAMPTZ NOT NULL,
    cover_asset_type VARCHAR(64),
    cover_asset_id VARCHAR(255),
    extra JSONB
) ON COMMIT DROP"""

POSTGRES_UPSERT = (
    f"INSERT INTO datasets ({', '.join(BASELINE_COLUMNS)}) "
    f"SELECT dataset_id, %(account)s, {', '.join(_CONTENT)}, %(now)s, %(now)s, NULL, %(run)s "
    f"FROM incoming ON CONFLICT (dataset_id) DO UPDATE SET {_UPDATE_SET} "
    f"WHERE ({', '.join(f'datasets.{c}' for c in _CONTENT)}) "
    f"IS DISTINCT FROM ({', '.join(f'excluded.{c}' for c in _CONTENT)}) "
    "OR datasets.deleted_at IS NOT NULL"
)


# --------------------------------------------------------------------------------------
# The baseline worker: runs in its own process, like the project's CLI.
# --------------------------------------------------------------------------------------


def baseline_fetch() -> list[dict[str, Any]]:
    """GET <IDEOGRAM_API_BASE_URL>/datasets with requests; parse the body with `json`."""
    import requests

    base = os.environ["IDEOGRAM_API_BASE_URL"].rstrip("/")
    response = requests.get(
        f"{base}/datasets",
        headers={"Api-Key": os.environ["IDEOGRAM_API_KEY"], "Accept": "application/json"},
        timeout=300,
    )
    response.raise_for_status()
    records: list[dict[str, Any]] = json.loads(response.content)["datasets"]
    return records


def baseline_content(record: dict[str, Any]) -> tuple[Any, ...]:
    """(dataset_id, name, user_id, creation_time, cover type, cover id, extra JSON or None).

    No validation; `creation_time` stays the API's ISO 8601 text. Unknown fields go to
    `extra` as JSON text, as the project stores them.
    """
    cover = record.get("cover_asset_identifier") or {}
    extra = {k: v for k, v in record.items() if k not in _KNOWN_FIELDS}
    cover_extra = {k: v for k, v in cover.items() if k not in _KNOWN_COVER_FIELDS}
    if cover_extra:
        extra["cover_asset_identifier"] = cover_extra
    return (
        record["dataset_id"],
        record["name"],
        record["user_id"],
        record["creation_time"],
        cover.get("asset_type"),
        cover.get("asset_id"),
        json.dumps(extra) if extra else None,
    )


def baseline_sqlite(path: str, records: list[dict[str, Any]]) -> int:
    """Upsert `records` into the SQLite file at `path` in one transaction; rows written."""
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")
    run_id = int(time.time())
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        for statement in _ddl("DATETIME", "JSON"):
            conn.execute(statement)
        rows = (
            (c[0], ACCOUNT, *c[1:], now, now, None, run_id) for c in map(baseline_content, records)
        )
        conn.execute("BEGIN IMMEDIATE")
        written = conn.executemany(SQLITE_UPSERT, rows).rowcount
        conn.execute("COMMIT")
    finally:
        conn.close()
    return written


def baseline_postgres(url: str, records: list[dict[str, Any]]) -> int:
    """COPY `records` into a temporary table, then one upsert of the changed rows."""
    import psycopg

    now = datetime.now(UTC)
    run_id = int(time.time())
    with psycopg.connect(url) as conn:
        with conn.cursor() as cur:
            for statement in _ddl("TIMESTAMPTZ", "JSONB"):
                cur.execute(statement)
        conn.commit()
        with conn.cursor() as cur:
            cur.execute(POSTGRES_INCOMING)
            with cur.copy(
                f"COPY incoming ({', '.join(('dataset_id', *_CONTENT))}) FROM STDIN"
            ) as copy:
                for record in records:
                    copy.write_row(baseline_content(record))
            cur.execute(POSTGRES_UPSERT, {"account": ACCOUNT, "now": now, "run": run_id})
            written = cur.rowcount
        conn.commit()
    return written


def baseline_main(backend: str, target: str) -> int:
    """The `--baseline-worker` process: fetch, parse, write; print {"rows", "written"}."""
    records = baseline_fetch()
    if backend == "sqlite":
        written = baseline_sqlite(target, records)
    else:
        written = baseline_postgres(target, records)
    print(json.dumps({"rows": len(records), "written": written}))
    return 0


# --------------------------------------------------------------------------------------
# Measuring child processes.
# --------------------------------------------------------------------------------------


@dataclass
class Measured:
    """One finished child process: exit code, wall seconds, its own peak RSS, output."""

    code: int
    wall_s: float
    peak_rss_mb: float
    stdout: str
    stderr: str


# The launcher: a tiny Python process, started before the benchmark holds any listing,
# that starts each measured child, reaps it with os.wait4 and reports its wall time and
# rusage. Why not start children from the benchmark itself: on Linux a child's ru_maxrss
# starts at the high-water RSS of the process it was forked (or vforked) from, because
# exec keeps the old address space's peak. Children of a benchmark holding a million
# datasets would all "use" 1.4 GB. The launcher's own peak (about 11 MB, reported as
# rss_floor_mb) is below any Python child's, so what wait4 gives is the child's own peak.
# And wait4 rather than getrusage(RUSAGE_CHILDREN): the latter is a maximum over every
# child ever reaped, not the last one.
LAUNCHER = """
import json, os, subprocess, sys, threading, time
for line in sys.stdin:
    job = json.loads(line)
    with open(job["stdout"], "wb") as out, open(job["stderr"], "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(job["argv"], env=job["env"], cwd=job["cwd"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        timer = threading.Timer(job["timeout"], proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
    floor = int(hwm[0].split()[1]) if hwm else 0
    try:
        print(json.dumps({"code": proc.returncode, "wall_s": wall,
                          "maxrss_kb": usage.ru_maxrss, "floor_kb": floor}), flush=True)
    except BrokenPipeError:  # the benchmark is gone
        break
"""


class Launcher:
    """Runs measured children from a lean helper process (see LAUNCHER above)."""

    def __init__(self) -> None:
        # -S: no site-packages, the launcher needs only the standard library.
        self.proc = subprocess.Popen(
            [sys.executable, "-S", "-c", LAUNCHER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            # Its own process group, so an interrupted benchmark can stop it and its child.
            start_new_session=True,
        )
        self.floor_mb = 0.0

    def run(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        timeout: float = 600.0,
    ) -> Measured:
        """Run `argv` to completion; its exit code, wall seconds, own peak RSS and output."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with tempfile.TemporaryDirectory(prefix="ideogram-bench-out-") as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            job = {
                "argv": list(argv),
                "env": dict(os.environ if env is None else env),
                "cwd": str(cwd) if cwd is not None else None,
                "stdout": str(out),
                "stderr": str(err),
                "timeout": timeout,
            }
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            try:
                # Wake up now and then: a signal that the OS hands to another thread
                # (the server's) would otherwise wait for the child to end.
                while not select.select([self.proc.stdout], [], [], 0.2)[0]:
                    pass
                line = self.proc.stdout.readline()
            except BaseException:  # Ctrl-C, SIGTERM: do not leave the child running
                self.close(interrupted=True)
                raise
            if not line:
                raise BenchmarkError("the launcher process died")
            reply = json.loads(line)
            self.floor_mb = max(self.floor_mb, reply["floor_kb"] / 1024)
            return Measured(
                code=reply["code"],
                wall_s=reply["wall_s"],
                # Linux reports ru_maxrss in KiB.
                peak_rss_mb=reply["maxrss_kb"] / 1024,
                stdout=out.read_text(errors="replace"),
                stderr=err.read_text(errors="replace"),
            )

    def close(self, *, interrupted: bool = False) -> None:
        """Stop the launcher: it ends when its standard input closes. When the benchmark was
        interrupted, a measured child may still be running: stop it and the launcher."""
        if interrupted and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class BenchmarkError(RuntimeError):
    """A run failed or did something other than expected: the numbers would mean nothing."""


def _check_exit(what: str, measured: Measured) -> None:
    if measured.code != 0:
        tail = "\n".join((measured.stderr or measured.stdout).strip().splitlines()[-15:])
        raise BenchmarkError(f"{what} exited {measured.code}:\n{tail}")


# --------------------------------------------------------------------------------------
# Listings and the server.
# --------------------------------------------------------------------------------------


@dataclass
class Bodies:
    """The encoded listings for one N: as first served, and with 1% of the names changed."""

    n: int
    original: bytes
    changed: bytes
    renamed: int


def make_bodies(n: int) -> Bodies:
    """Encode `tests.fakeapi.synthetic(n)` once, and once more with every 100th renamed."""
    from tests.fakeapi import Reply, synthetic

    listing = synthetic(n)
    # Reply.encoded is exactly how FakeApi encodes a listing.
    original = Reply(200, {"datasets": listing}).encoded()
    renamed = 0
    for record in listing[::RENAME_STRIDE]:
        record["name"] = f"{record['name']} (renamed)"
        renamed += 1
    changed = Reply(200, {"datasets": listing}).encoded()
    return Bodies(n=n, original=original, changed=changed, renamed=renamed)


def start_server() -> Any:
    """A FakeApi that answers GET /datasets with a pre-encoded body (`serve(body)`).

    FakeApi json-encodes its listing on every request; for a million datasets that is
    seconds of CPU in the benchmark's own process, so the body is encoded once instead.
    """
    from tests.fakeapi import FakeApi, Reply

    class PreEncodedApi(FakeApi):
        body: bytes = b'{"datasets": []}'

        def serve(self, body: bytes) -> None:
            with self._lock:
                self.body = body
                self.requests.clear()
                self.times.clear()

        def _answer(self, path: str, key: str | None) -> Reply:
            # Called under FakeApi's lock.
            if path != "/datasets":
                return super()._answer(path, key)
            return Reply(200, self.body, {"Content-Type": "application/json"})

    return PreEncodedApi()


# --------------------------------------------------------------------------------------
# Backends: fresh databases, and what the project recorded.
# --------------------------------------------------------------------------------------


class Backend:
    """Creates and drops fresh databases; reads the project's last run row."""

    name = ""

    def create(self) -> str:
        """Create a fresh, empty database; return the baseline's target (path or URL)."""
        raise NotImplementedError

    def drop(self, target: str) -> None:
        """Remove the database made by `create`."""
        raise NotImplementedError

    def project_url(self, target: str) -> str:
        """The `--database-url` for the project."""
        raise NotImplementedError

    def last_run(self, target: str) -> dict[str, Any]:
        """The project's newest `sync_runs` row: status and counts."""
        raise NotImplementedError

    def describe(self) -> str:
        """Server/library version, for the report."""
        raise NotImplementedError

    def close(self) -> None:
        """Release anything the backend holds."""


_RUN_QUERY = (
    "SELECT status, datasets_seen, inserted, updated, unchanged, deleted, rejected "
    "FROM sync_runs ORDER BY id DESC LIMIT 1"
)
_RUN_KEYS = ("status", "seen", "inserted", "updated", "unchanged", "deleted", "rejected")


class SqliteBackend(Backend):
    """A new database file per run in a temporary folder."""

    name = "sqlite"

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="ideogram-bench-"))

    def create(self) -> str:
        """A path for a database file that does not exist yet."""
        return str(self.folder / f"bench-{uuid.uuid4().hex[:10]}.db")

    def drop(self, target: str) -> None:
        """Delete the file and its journals."""
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(target + suffix).unlink(missing_ok=True)

    def project_url(self, target: str) -> str:
        """sqlite:////absolute/path."""
        return f"sqlite:///{target}"

    def last_run(self, target: str) -> dict[str, Any]:
        """The newest sync_runs row of the file."""
        conn = sqlite3.connect(target)
        try:
            row = conn.execute(_RUN_QUERY).fetchone()
        finally:
            conn.close()
        return dict(zip(_RUN_KEYS, row, strict=True))

    def describe(self) -> str:
        """SQLite library version."""
        return f"SQLite {sqlite3.sqlite_version}"

    def close(self) -> None:
        """Remove the temporary folder."""
        shutil.rmtree(self.folder, ignore_errors=True)


def libpq_url(url: str) -> str:
    """A PostgreSQL URL libpq accepts: `postgresql+psycopg://` becomes `postgresql://`."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+")[0]
    if scheme not in ("postgresql", "postgres"):
        raise SystemExit(f"not a PostgreSQL URL: {parts.scheme}://…")
    return urlunsplit(("postgresql", parts.netloc, parts.path, parts.query, parts.fragment))


def _mask_url(text: str) -> str:
    """`text` with the password of a URL in it replaced by ***."""
    parts = urlsplit(text)
    if not parts.scheme or parts.password is None:
        return text
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def with_database(url: str, name: str) -> str:
    """`url` with its database name replaced by `name`."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


class PostgresBackend(Backend):
    """CREATE DATABASE / DROP DATABASE through a maintenance connection."""

    name = "postgresql"

    def __init__(self, url: str) -> None:
        import psycopg

        self.url = libpq_url(url)
        try:
            self.admin = psycopg.connect(self.url, autocommit=True, connect_timeout=15)
        except psycopg.Error as exc:
            raise SystemExit(
                f"cannot connect to PostgreSQL at {_mask_url(self.url)}: {exc}"
            ) from None
        # Databases that may exist: dropped again by close() after an interruption.
        self.pending: set[str] = set()

    def create(self) -> str:
        """A new empty database named ids_bench_<random>; returns its URL."""
        name = f"ids_bench_{uuid.uuid4().hex[:10]}"
        self.pending.add(name)
        self.admin.execute(f'CREATE DATABASE "{name}"')
        return with_database(self.url, name)

    def drop(self, target: str) -> None:
        """DROP DATABASE … WITH (FORCE) (PostgreSQL 13+)."""
        name = urlsplit(target).path.lstrip("/")
        self.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.pending.discard(name)

    def project_url(self, target: str) -> str:
        """The same URL; the project maps postgresql:// to psycopg 3."""
        return target

    def last_run(self, target: str) -> dict[str, Any]:
        """The newest sync_runs row of the database."""
        import psycopg

        with psycopg.connect(target) as conn:
            row = conn.execute(_RUN_QUERY).fetchone()
        assert row is not None
        return dict(zip(_RUN_KEYS, row, strict=True))

    def describe(self) -> str:
        """The server's version string."""
        row = self.admin.execute("SHOW server_version").fetchone()
        return f"PostgreSQL {row[0] if row else '?'}"

    def close(self) -> None:
        """Drop what an interruption left behind, over a fresh connection (the maintenance
        connection may have been interrupted mid-command), and close."""
        import psycopg

        self.admin.close()
        if not self.pending:
            return
        with psycopg.connect(self.url, autocommit=True, connect_timeout=15) as conn:
            for name in sorted(self.pending):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.pending.clear()


# --------------------------------------------------------------------------------------
# One phase, one tool, one repetition.
# --------------------------------------------------------------------------------------


@dataclass
class Runner:
    """Runs the project or the baseline against a database, with the server's URL."""

    launcher: Launcher
    api_url: str
    workdir: Path
    timeout: float = 600.0

    def env(self) -> dict[str, str]:
        """The environment of every child: ours, minus the tool's settings, plus key and URL."""
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("IDEOGRAM_", "MY_IDEOGRAM"))
        }
        env["IDEOGRAM_API_KEY"] = API_KEY
        env["IDEOGRAM_API_BASE_URL"] = self.api_url
        # What the baseline does and this benchmark measures: the datasets listing
        # (bench_details.py measures the details).
        env["IDEOGRAM_SYNC_RESOURCES"] = "datasets"
        return env

    def run(self, tool: str, backend: Backend, target: str) -> Measured:
        """One run of `tool` ("project" or "baseline") into `target`; fails on exit != 0."""
        if tool == "project":
            argv = [
                sys.executable,
                "-m",
                "sync",
                "--log-level",
                "WARNING",
                "--database-url",
                backend.project_url(target),
                "run",
            ]
        else:
            argv = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--baseline-worker",
                backend.name,
                target,
            ]
        # In an empty folder: no ./ideogram-sync.toml can change the project's settings.
        measured = self.launcher.run(argv, env=self.env(), cwd=self.workdir, timeout=self.timeout)
        _check_exit(f"{tool} on {backend.name}", measured)
        return measured


def expected_counts(phase: str, bodies: Bodies) -> dict[str, int]:
    """What the project's run row and the baseline's written count must say for `phase`."""
    n = bodies.n
    if phase == "first":
        return {"inserted": n, "updated": 0, "unchanged": 0, "written": n}
    if phase == "unchanged":
        return {"inserted": 0, "updated": 0, "unchanged": n, "written": 0}
    return {
        "inserted": 0,
        "updated": bodies.renamed,
        "unchanged": n - bodies.renamed,
        "written": bodies.renamed,
    }


def run_phase(
    runner: Runner, api: Any, backend: Backend, tool: str, phase: str, bodies: Bodies
) -> Measured:
    """Fresh database, untimed initial load unless `phase` is first, then the timed run.

    Checks the run did what the phase means (the project's sync_runs row, the baseline's
    count of written rows), so a broken benchmark cannot report numbers.
    """
    target = backend.create()
    try:
        if phase != "first":
            api.serve(bodies.original)
            runner.run(tool, backend, target)
        api.serve(bodies.changed if phase == "changed_1pct" else bodies.original)
        measured = runner.run(tool, backend, target)
        want = expected_counts(phase, bodies)
        if tool == "project":
            got = backend.last_run(target)
            keys = ("inserted", "updated", "unchanged")
            if got["status"] != "success" or any(got[k] != want[k] for k in keys):
                raise BenchmarkError(
                    f"project {phase} on {backend.name}: run row {got}, want {want}"
                )
        else:
            report = json.loads(measured.stdout.strip().splitlines()[-1])
            if report["rows"] != bodies.n or report["written"] != want["written"]:
                raise BenchmarkError(f"baseline {phase} on {backend.name}: {report}, want {want}")
        return measured
    finally:
        backend.drop(target)


# --------------------------------------------------------------------------------------
# Results.
# --------------------------------------------------------------------------------------


@dataclass
class Samples:
    """Wall times and peak RSS of the timed runs of one tool."""

    wall_s: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)

    def add(self, measured: Measured) -> None:
        """Record one timed run."""
        self.wall_s.append(measured.wall_s)
        self.peak_rss_mb.append(measured.peak_rss_mb)

    def summary(self, n: int) -> dict[str, Any]:
        """Median wall seconds, rows per second, peak RSS (max over repetitions), raw samples."""
        median = statistics.median(self.wall_s)
        return {
            "median_s": round(median, 4),
            "rows_per_s": round(n / median, 1),
            "peak_rss_mb": round(max(self.peak_rss_mb), 1),
            "wall_s": [round(w, 4) for w in self.wall_s],
            "rss_mb": [round(r, 1) for r in self.peak_rss_mb],
        }


def measure_size(
    runner: Runner,
    api: Any,
    backend: Backend,
    bodies: Bodies,
    repeat: int,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Every phase at one N on one backend: project and baseline runs, alternating."""
    results = []
    for phase in PHASES:
        samples = {tool: Samples() for tool in TOOLS}
        for rep in range(repeat):
            for tool in TOOLS:
                measured = run_phase(runner, api, backend, tool, phase, bodies)
                samples[tool].add(measured)
                log(
                    f"{backend.name} N={bodies.n} {phase} {rep + 1}/{repeat} {tool}: "
                    f"{measured.wall_s:.3f}s, {measured.peak_rss_mb:.0f} MB"
                )
        project = samples["project"].summary(bodies.n)
        baseline = samples["baseline"].summary(bodies.n)
        results.append(
            {
                "backend": backend.name,
                "n": bodies.n,
                "phase": phase,
                "repeat": repeat,
                "project": project,
                "baseline": baseline,
                "ratio": round(project["median_s"] / baseline["median_s"], 3),
            }
        )
    return results


def ideogram_sync_command() -> list[str]:
    """The installed `ideogram-sync` script beside this Python, else `python -m sync`."""
    script = shutil.which("ideogram-sync", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "sync"]


def measure_startup(
    launcher: Launcher, runs: int, workdir: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """Median wall time of `ideogram-sync --help`, of `status` on an empty SQLite database,
    of `python -c pass` (the interpreter's own floor) and of `python -c "import sqlalchemy"`
    (the floor of any command that opens the database), over `runs` runs each."""
    command = ideogram_sync_command()
    empty = workdir / "startup-empty.db"
    sqlite3.connect(empty).close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEOGRAM_")}
    cases = {
        "help": [*command, "--help"],
        # An empty database: status says there is no synced database yet and exits 2.
        "status": [*command, "--database-url", f"sqlite:///{empty}", "status"],
        "python": [sys.executable, "-c", "pass"],
        "sqlalchemy": [sys.executable, "-c", "import sqlalchemy"],
    }
    result: dict[str, Any] = {}
    for name, argv in cases.items():
        walls = []
        for _ in range(runs):
            measured = launcher.run(argv, env=env, cwd=workdir, timeout=60)
            if measured.code not in (0, 1, 2):
                _check_exit(" ".join(argv), measured)
            walls.append(measured.wall_s)
        shown = [Path(argv[0]).name, *argv[1:]]
        result[name] = {
            "command": shlex.join(shown).replace(str(empty), "EMPTY.db"),
            "median_s": round(statistics.median(walls), 4),
            "wall_s": [round(w, 4) for w in walls],
        }
        log(f"start-up {name}: {result[name]['median_s']:.3f}s")
    empty.unlink(missing_ok=True)
    return result


def evaluate_targets(
    results: list[dict[str, Any]], startup: dict[str, Any]
) -> list[dict[str, Any]]:
    """PASS/FAIL for every target the measured sizes allow checking."""
    by_key = {(r["backend"], r["n"], r["phase"]): r for r in results}
    backends = sorted({r["backend"] for r in results}, key=["sqlite", "postgresql"].index)
    targets: list[dict[str, Any]] = []

    def add(name: str, backend: str, value: float, limit: float, unit: str, passed: bool) -> None:
        targets.append(
            {
                "target": name,
                "backend": backend,
                "value": round(value, 3),
                "limit": limit,
                "unit": unit,
                "pass": passed,
            }
        )

    for backend in backends:
        for phase, limit in RATIO_TARGETS.items():
            row = by_key.get((backend, TARGET_N, phase))
            if row:
                add(
                    f"{phase} at N=1,000,000: project/baseline",
                    backend,
                    row["ratio"],
                    limit,
                    "x",
                    row["ratio"] <= limit,
                )
        million = [by_key.get((backend, MILLION, p)) for p in PHASES]
        present = [r for r in million if r]
        if present:
            worst = max(present, key=lambda r: r["project"]["peak_rss_mb"])
            peak = worst["project"]["peak_rss_mb"]
            add(
                f"peak RSS at N=1,000,000 (max over phases: {worst['phase']})",
                backend,
                peak,
                RSS_TARGET_MB,
                "MB",
                peak <= RSS_TARGET_MB,
            )
    if "status" in startup and "sqlalchemy" in startup:
        value = startup["status"]["median_s"]
        limit = round(startup["sqlalchemy"]["median_s"] + STARTUP_OVER_SQLALCHEMY_S, 3)
        add("`ideogram-sync status` start-up", "-", value, limit, "s", value <= limit)
    return targets


def evaluate_floors(results: list[dict[str, Any]], startup: dict[str, Any]) -> list[dict[str, Any]]:
    """The least that two targets can measure, given work the tool cannot skip.

    A 1%-changed run does all that an unchanged run does (start-up, download, the body's
    digest) and then more, so the project's unchanged time over the 1% baseline's time is
    a floor for the 1% ratio. `status` opens the database through SQLAlchemy, so the time
    of `python -c "import sqlalchemy"` is a floor for its start-up.
    """
    by_key = {(r["backend"], r["n"], r["phase"]): r for r in results}
    floors: list[dict[str, Any]] = []
    for (backend, n, phase), row in by_key.items():
        unchanged = by_key.get((backend, n, "unchanged"))
        if phase != "changed_1pct" or unchanged is None:
            continue
        floors.append(
            {
                "floor": f"changed_1pct at N={n:,}: project unchanged run / 1% baseline",
                "backend": backend,
                "value": round(unchanged["project"]["median_s"] / row["baseline"]["median_s"], 3),
                "limit": RATIO_TARGETS["changed_1pct"],
                "unit": "x",
            }
        )
    if "sqlalchemy" in startup:
        floors.append(
            {
                "floor": '`status` start-up: `python -c "import sqlalchemy"`',
                "backend": "-",
                "value": startup["sqlalchemy"]["median_s"],
                "limit": None,
                "unit": "s",
            }
        )
    return floors


PHASE_LABELS = {"first": "first", "unchanged": "unchanged", "changed_1pct": "changed 1%"}


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: one table per backend, start-up, targets."""
    meta = report["meta"]
    lines = [
        "# ideogram-sync benchmark",
        "",
        f"- date: {meta['date']}",
        *([f"- label: {meta['label']}"] if meta.get("label") else []),
        f"- machine: {meta['machine']}",
        f"- Python {meta['python']}; " + "; ".join(meta["backends"].values()),
        f"- code: {meta['project_code']}, commit {meta['commit']}, "
        f"fingerprint {meta['code_fingerprint']}",
        f"- sizes: {', '.join(f'{n:,}' for n in meta['sizes'])}; repetitions: {meta['repeat']}"
        " (median reported; peak RSS is the maximum over repetitions)",
        f"- peak RSS is each child's own (measured with wait4; floor {meta['rss_floor_mb']:.0f} MB,"
        " the launcher's peak)",
        *(
            ["- **WARNING: sync/ or migrations/ changed during this run; rerun it.**"]
            if meta.get("code_changed_during_run")
            else []
        ),
        "",
        "Ratio = project median / baseline median, measured alternately in this run. "
        "Only ratios from the same run are comparable.",
    ]
    for backend in meta["backends"]:
        rows = [r for r in report["results"] if r["backend"] == backend]
        if not rows:
            continue
        lines += [
            "",
            f"## {backend}",
            "",
            "| N | phase | project s (median) | baseline s (median) | ratio | project rows/s "
            "| project peak RSS MB | baseline peak RSS MB |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            p, b = r["project"], r["baseline"]
            lines.append(
                f"| {r['n']:,} | {PHASE_LABELS[r['phase']]} | {p['median_s']:.3f} | "
                f"{b['median_s']:.3f} | {r['ratio']:.2f} | {p['rows_per_s']:,.0f} | "
                f"{p['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} |"
            )
    startup = report["startup"]
    if startup:
        lines += ["", "## Start-up", "", "| command | median s | runs |", "| --- | ---: | ---: |"]
        for item in startup.values():
            lines.append(
                f"| `{item['command']}` | {item['median_s']:.3f} | {len(item['wall_s'])} |"
            )
    lines += ["", "## Targets", ""]
    if report["targets"]:
        lines += [
            "| target | backend | measured | limit | result |",
            "| --- | --- | ---: | ---: | --- |",
        ]
        for t in report["targets"]:
            lines.append(
                f"| {t['target']} | {t['backend']} | {_quantity(t['value'], t['unit'])} | "
                f"{'≤' if t['unit'] == 'x' else '<'} {_quantity(t['limit'], t['unit'])} | "
                f"{'PASS' if t['pass'] else 'FAIL'} |"
            )
    else:
        lines.append("No target can be checked at the measured sizes.")
    if report.get("floors"):
        lines += [
            "",
            "## Floors",
            "",
            "What the tool pays before the work a target is about: a target whose floor is near"
            " or above its limit cannot be met by making that work faster.",
            "",
            "| floor | backend | measured | target's limit |",
            "| --- | --- | ---: | ---: |",
        ]
        for f in report["floors"]:
            lines.append(
                f"| {f['floor']} | {f['backend']} | {_quantity(f['value'], f['unit'])} | "
                f"{'-' if f['limit'] is None else _quantity(f['limit'], f['unit'])} |"
            )
    return "\n".join(lines) + "\n"


def _quantity(value: float, unit: str) -> str:
    if unit == "MB":
        return f"{value:.0f} MB"
    if unit == "s":
        return f"{value:.3g} s"
    return f"{value:g}x" if value == round(value, 1) else f"{value:.2f}x"


def _machine() -> str:
    memory = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {memory} RAM"


def project_code(env: dict[str, str]) -> Path:
    """The `sync` package the project's runs import (with `env`: PYTHONPATH may point elsewhere)."""
    probe = "import os, sync; print(os.path.dirname(os.path.abspath(sync.__file__)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise SystemExit(f"cannot import the project (`sync`): {result.stderr.strip()[-500:]}")
    return Path(result.stdout.strip())


def code_fingerprint(package: Path) -> str:
    """A digest of the code under test (the package and the migrations): shows edits made
    during a run, when the numbers would mix two versions."""
    digest = hashlib.sha256()
    folders = [package]
    if not (package / "migrations").is_dir():
        folders.append(package.parent / "migrations")
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            digest.update(str(path.relative_to(folder.parent)).encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _commit(package: Path) -> str:
    root = str(package.parent)
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "sync", "migrations"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    if head.returncode != 0:
        return "not a git checkout"
    modified = " (sync/ or migrations/ modified)" if dirty.stdout.strip() else ""
    return head.stdout.strip() + modified


def _write(out: Path, report: dict[str, Any], launcher: Launcher) -> None:
    meta = report["meta"]
    meta["rss_floor_mb"] = round(launcher.floor_mb, 1)
    now = code_fingerprint(Path(meta["project_code"]))
    meta["code_changed_during_run"] = now != meta["code_fingerprint"]
    report["targets"] = evaluate_targets(report["results"], report["startup"])
    report["floors"] = evaluate_floors(report["results"], report["startup"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(render_markdown(report))


# --------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of sizes: {text}") from None
    if not sizes or any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError("sizes must be positive")
    return sizes


def _backends(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        if name not in ("sqlite", "postgresql"):
            raise argparse.ArgumentTypeError(f"unknown backend {name} (sqlite, postgresql)")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(
        description="Benchmark `ideogram-sync run` against a plain requests+json+SQL baseline.",
    )
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=list(DEFAULT_SIZES),
        help="comma-separated dataset counts (default: 1000,10000,100000)",
    )
    parser.add_argument("--million", action="store_true", help="add N = 1,000,000")
    parser.add_argument(
        "--backends",
        type=_backends,
        help="sqlite,postgresql (default: both when a PostgreSQL URL is given, else sqlite)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("BENCH_POSTGRES_URL") or os.environ.get("TEST_POSTGRES_URL"),
        help="maintenance URL of a PostgreSQL server where databases may be created "
        "(default: $BENCH_POSTGRES_URL, else $TEST_POSTGRES_URL)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed runs per tool and phase (default: 3)"
    )
    parser.add_argument(
        "--startup-runs", type=int, default=5, help="runs per start-up command (default: 5)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results",
        help="folder for results.json and results.md (default: benchmarks/results)",
    )
    parser.add_argument(
        "--label",
        default="",
        help="free text recorded in the report, e.g. which version of the code this is",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke test: N = 1,000, one repetition, one start-up run each",
    )
    return parser


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 when a run failed, 2 on bad options."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["--baseline-worker"]:
        if len(args_list) != 3 or args_list[1] not in ("sqlite", "postgresql"):
            print(
                "usage: bench_sync.py --baseline-worker sqlite|postgresql TARGET", file=sys.stderr
            )
            return 2
        return baseline_main(args_list[1], args_list[2])

    parser = build_parser()
    args = parser.parse_args(args_list)
    sizes: list[int] = [1_000] if args.quick else sorted(set(args.sizes))
    if args.million and MILLION not in sizes:
        sizes.append(MILLION)
    repeat = 1 if args.quick else args.repeat
    startup_runs = 1 if args.quick else args.startup_runs
    if repeat < 1 or startup_runs < 0:
        parser.error("--repeat must be at least 1 and --startup-runs at least 0")
    backends: list[str] = args.backends or (
        ["sqlite", "postgresql"] if args.postgres_url else ["sqlite"]
    )
    if "postgresql" in backends and not args.postgres_url:
        parser.error("postgresql needs --postgres-url (or $BENCH_POSTGRES_URL/$TEST_POSTGRES_URL)")

    sys.path.insert(0, str(REPO))

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    # SIGTERM unwinds like Ctrl-C, so the finally blocks drop the PostgreSQL databases.
    signal.signal(signal.SIGTERM, _terminate)
    # First, while this process is still small: see LAUNCHER.
    launcher = Launcher()
    workdir = Path(tempfile.mkdtemp(prefix="ideogram-bench-cwd-"))
    opened: list[Backend] = []
    api = start_server()
    try:
        for name in backends:
            opened.append(
                SqliteBackend() if name == "sqlite" else PostgresBackend(args.postgres_url)
            )
        runner = Runner(launcher=launcher, api_url=api.url, workdir=workdir)
        package = project_code(runner.env())
        report: dict[str, Any] = {
            "meta": {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": _machine(),
                "python": platform.python_version(),
                "label": args.label,
                "project_code": str(package),
                "commit": _commit(package),
                "code_fingerprint": code_fingerprint(package),
                "backends": {b.name: b.describe() for b in opened},
                "sizes": sizes,
                "repeat": repeat,
                "phases": list(PHASES),
                "quick": args.quick,
                "argv": [_mask_url(a) for a in args_list],
                "rss_floor_mb": 0.0,
            },
            "startup": {},
            "results": [],
            "targets": [],
            "floors": [],
        }
        if startup_runs:
            report["startup"] = measure_startup(launcher, startup_runs, workdir, log)
        for n in sizes:
            log(f"encoding {n:,} datasets")
            bodies = make_bodies(n)
            # A generous bound per child: minutes even for a million datasets on a slow box.
            runner.timeout = 300 + n * 0.01
            for backend in opened:
                report["results"] += measure_size(runner, api, backend, bodies, repeat, log)
                _write(args.out, report, launcher)
            del bodies
        _write(args.out, report, launcher)
    except BenchmarkError as exc:
        log(f"benchmark failed: {exc}")
        return 1
    finally:
        api.close()
        for backend in opened:
            backend.close()
        launcher.close()
        shutil.rmtree(workdir, ignore_errors=True)
    sys.stdout.write(render_markdown(report))
    log(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
