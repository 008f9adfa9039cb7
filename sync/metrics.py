"""Prometheus metrics and the /healthz answer, served by the daemon over HTTP."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)

from sync import __version__
from sync.config import RESOURCES
from sync.job import Outcome

log = logging.getLogger(__name__)

# Runs take seconds to minutes; the buckets cover both ends.
_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

# Every value `record` can give each label: the series created at 0 at start-up.
STATUSES = ("success", "failed", "locked", "skipped")
CHANGES = ("inserted", "updated", "unchanged", "deleted", "rejected")


class Metrics:
    """The daemon's metrics, in a registry of their own."""

    def __init__(self, accounts: Iterable[str] = (), resources: Iterable[str] = RESOURCES) -> None:
        """Create the metrics, with every series of each account and resource that can
        start at 0."""
        # The *_created samples prometheus_client adds to counters and histograms double
        # the series for no use here. The switch is process-global; this process serves
        # no other Prometheus metrics.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.runs = Counter(
            "ideogram_sync_runs",
            "Sync runs by account, resource and how they ended (success, failed, locked, skipped).",
            ["account", "resource", "status"],
            registry=self.registry,
        )
        self.last_success = Gauge(
            "ideogram_sync_last_success_timestamp_seconds",
            "Unix time when the account's last successful sync of the resource finished.",
            ["account", "resource"],
            registry=self.registry,
        )
        self.rows = Counter(
            "ideogram_sync_rows",
            "Rows (or details) by resource and what a sync did to them (inserted, updated, "
            "unchanged, deleted, rejected).",
            ["account", "resource", "change"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "ideogram_sync_run_duration_seconds",
            "Wall time of successful sync runs.",
            ["account", "resource"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.active = Gauge(
            "ideogram_sync_datasets_active",
            "Datasets of the account that are not soft-deleted.",
            ["account"],
            registry=self.registry,
        )
        self.build = Info(
            "ideogram_sync_build",
            "The running ideogram-sync version.",
            registry=self.registry,
        )
        self.build.info({"version": __version__})
        self.models_active = Gauge(
            "ideogram_sync_models_active",
            "Custom models of the account that are not soft-deleted.",
            ["account"],
            registry=self.registry,
        )
        resources = tuple(resources)
        for account in accounts:
            for resource in resources:
                self._start(account, resource)

    def _start(self, account: str, resource: str) -> None:
        """Create the account's counters and histogram at 0.

        A series that first appears with its first increment is invisible to increase()
        and rate(), which need an earlier sample: a "two failures in an hour" alert saw
        the first failure only as the series' start, and fired on the third.
        The gauges are left out: last_success and datasets_active are read from the
        database, and 0 would be a false reading (absent last_success means "never
        succeeded"; 0 would read as "last success in 1970" or "no active datasets").
        """
        for status in STATUSES:
            self.runs.labels(account, resource, status)
        for change in CHANGES:
            self.rows.labels(account, resource, change)
        self.duration.labels(account, resource)  # _count and _sum 0, every bucket 0

    def record(self, outcome: Outcome) -> None:
        """Count one account's run of one resource."""
        account, resource = outcome.account, outcome.resource
        if outcome.error is not None:
            status = "locked" if outcome.error.exit_code == 5 else "failed"
            self.runs.labels(account, resource, status).inc()
            return
        if outcome.result is None:
            self.runs.labels(account, resource, "skipped").inc()
            return
        result = outcome.result
        self.runs.labels(account, resource, "success").inc()
        self.duration.labels(account, resource).observe(result.duration_seconds)
        counts = result.counts
        for change, value in (
            ("inserted", counts.inserted),
            ("updated", counts.updated),
            ("unchanged", counts.unchanged),
            ("deleted", counts.deleted),
            ("rejected", counts.rejected),
        ):
            self.rows.labels(account, resource, change).inc(value)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)


HealthCheck = Callable[[], tuple[bool, str]]
# The status page (sync/status_page.py): (HTTP status, HTML).
StatusPage = Callable[[], tuple[int, str]]
_HTML = "text/html; charset=utf-8"
_PAGE_FAILED = (
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
    '<meta http-equiv="refresh" content="30"><title>ideogram-sync: status page failed</title>'
    "</head><body><h1>ideogram-sync: status page failed</h1><p>The status page could not be "
    "built ({error}); the daemon's log has the details. /metrics and /healthz still answer."
    "</p></body></html>\n"
)


def serve(
    host: str,
    port: int,
    metrics: Metrics,
    health: HealthCheck,
    page: StatusPage | None = None,
) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and (with `page`) the status page at / from a background
    thread; returns the server to shut down."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/" and page is not None:
                try:
                    status, text = page()
                except Exception as exc:  # a bug: said plainly, the traceback in the log only
                    log.exception("the status page failed")
                    status, text = 500, _PAGE_FAILED.format(error=type(exc).__name__)
                self._send(status, text.encode(), _HTML)
            elif path == "/metrics":
                self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                try:
                    ok, reason = health()
                except Exception as exc:  # a probe must answer, never hang or crash
                    ok, reason = False, f"health check failed: {type(exc).__name__}"
                self._send(200 if ok else 503, (reason + "\n").encode(), "text/plain")
            else:
                where = "/, /metrics or /healthz" if page is not None else "/metrics or /healthz"
                self._send(404, f"not found: try {where}\n".encode(), "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass  # probes every few seconds would drown the log

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True, name="metrics"
    )
    thread.start()
    log.info(
        "serving %s/metrics and /healthz on http://%s:%d",
        "the status page at /, " if page is not None else "",
        host,
        server.server_address[1],
    )
    return server
