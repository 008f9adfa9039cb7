"""A real HTTP server on 127.0.0.1 that plays the Ideogram API: GET /datasets,
/datasets/{id}, /models and /models/{id}."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote


@dataclass
class Reply:
    """One scripted answer: status, body (bytes, str, or JSON-able), headers, delay."""

    status: int = 200
    body: Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    # Send fewer body bytes than Content-Length promises, then close.
    truncate_to: int | None = None
    # Seconds between body bytes: a server that trickles its answer.
    trickle: float = 0.0

    def encoded(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body).encode()


@dataclass
class Seen:
    """A request the server received."""

    method: str
    path: str
    headers: dict[str, str]


class FakeApi:
    """Serve the listings and details (or scripted replies, first come first served, per
    path) on a free local port."""

    def __init__(self) -> None:
        self.datasets: list[Any] = []
        # Listings per API key (several accounts); keys not in it get `datasets`.
        self.by_key: dict[str, list[Any]] = {}
        self.models: list[Any] = []
        # Model listings per API key; keys not in it get `models`.
        self.models_by_key: dict[str, list[Any]] = {}
        # A dataset's files (GET /datasets/{id}), and a model's training runs (GET /models/{id}).
        self.files: dict[str, list[Any]] = {}
        self.training_runs: dict[str, list[Any]] = {}
        # Answers for a path (or every path under a prefix ending in "/"): status only.
        self.refused: dict[str, int] = {}
        # Seconds every details request waits before its answer (a real API's latency).
        self.detail_delay = 0.0
        # Keys answered with 401.
        self.rejected_keys: set[str] = set()
        # Scripted replies by path ("/datasets", or a prefix such as "/datasets/").
        self.scripts: dict[str, deque[Reply]] = {}
        self.requests: list[Seen] = []
        self.times: list[float] = []
        # Requests being answered now, and the most there ever were at once.
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        # While set to an unset Event, requests wait (up to a minute) before any answer.
        self.gate: threading.Event | None = None
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: without this the body waits for the
            # client's delayed ACK, about 40 ms a request, where a real API answers at once.
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                api._handle(self)

            def log_message(self, *_args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                # A client that hangs up early (as ours does on a non-JSON answer) is
                # normal for a server; socketserver would print a traceback to stderr,
                # where it would look like the CLI's own output.
                if isinstance(sys.exc_info()[1], ConnectionError):
                    return
                super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def push(self, *replies: Reply, path: str = "/datasets") -> None:
        """Answer the next requests of `path` with these replies, then go back to the data."""
        with self._lock:
            self.scripts.setdefault(path, deque()).extend(replies)

    def paths(self, prefix: str = "") -> list[str]:
        """The paths requested so far (those starting with `prefix`)."""
        with self._lock:
            return [r.path for r in self.requests if r.path.startswith(prefix)]

    def _next(self, path: str, key: str | None) -> Reply:
        with self._lock:
            parent = path.rsplit("/", 1)[0] + "/"
            for where in (path, parent):
                if self.scripts.get(where):
                    return self.scripts[where].popleft()
            if key in self.rejected_keys:
                return Reply(401, {"detail": "Unauthorized"})
            for where in (path, parent):
                if where in self.refused:
                    return Reply(self.refused[where], {"detail": "Forbidden"})
            return self._answer(path, key)

    def _answer(self, path: str, key: str | None) -> Reply:
        listing = self.by_key.get(key or "", self.datasets)
        models = self.models_by_key.get(key or "", self.models)
        if path == "/datasets":
            return Reply(200, {"datasets": listing})
        if path == "/models":
            return Reply(200, {"models": models})
        kind, _, item = path.strip("/").partition("/")
        item = unquote(item)
        if kind == "datasets":
            found = [d for d in listing if isinstance(d, dict) and d.get("dataset_id") == item]
            if not found:
                return Reply(404, {"detail": "Dataset not found"})
            files = self.files.get(item, [])
            trained = [
                m["model_id"] for m in models if isinstance(m, dict) and m.get("dataset_id") == item
            ]
            body = {
                "dataset": found[-1],
                "file_count": len(files),
                "files": files,
                "custom_model_ids": trained,
            }
            return Reply(200, body, delay=self.detail_delay)
        if kind == "models":
            found = [m for m in models if isinstance(m, dict) and m.get("model_id") == item]
            if not found:
                return Reply(404, {"detail": "Model not found"})
            model = {**found[-1], "training_runs": self.training_runs.get(item, [])}
            return Reply(200, {"model": model}, delay=self.detail_delay)
        return Reply(404, {"detail": "Not Found"})

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append(Seen("GET", handler.path, dict(handler.headers.items())))
            self.times.append(time.monotonic())
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self._reply(handler)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _reply(self, handler: BaseHTTPRequestHandler) -> None:
        key = handler.headers.get("Api-Key")
        reply = self._next(handler.path.split("?")[0], key)
        gate = self.gate
        if gate is not None:
            gate.wait(60)
        if reply.delay:
            time.sleep(reply.delay)
        body = reply.encoded()
        handler.send_response(reply.status)
        headers = {"Content-Type": "application/json", **reply.headers}
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        if reply.truncate_to is not None:
            handler.send_header("Connection", "close")
        handler.end_headers()
        try:
            if reply.trickle:
                for i in range(len(body)):
                    handler.wfile.write(body[i : i + 1])
                    handler.wfile.flush()
                    time.sleep(reply.trickle)
            else:
                handler.wfile.write(
                    body if reply.truncate_to is None else body[: reply.truncate_to]
                )
                handler.wfile.flush()
        except OSError:
            pass
        if reply.truncate_to is not None:
            handler.close_connection = True

    def close(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self.server.shutdown()
        self.server.server_close()


def dataset(
    dataset_id: str,
    name: str | None = None,
    *,
    user_id: str = "user-1",
    created: str = "2024-12-15T17:32:00.965408+00:00",
    cover: dict[str, Any] | str | None = "default",
    **extra: Any,
) -> dict[str, Any]:
    """One Dataset object in the API's exact shape."""
    record: dict[str, Any] = {
        "dataset_id": dataset_id,
        "name": name if name is not None else f"Dataset {dataset_id}",
        "user_id": user_id,
        "creation_time": created,
    }
    if cover == "default":
        record["cover_asset_identifier"] = {
            "asset_type": "RESPONSE",
            "asset_id": f"cov-{dataset_id}",
        }
    elif cover is not None:
        record["cover_asset_identifier"] = cover
    else:
        record["cover_asset_identifier"] = None
    record.update(extra)
    return record


def synthetic(count: int, start: datetime | None = None) -> list[dict[str, Any]]:
    """`count` distinct datasets, newest first, as the API orders them."""
    start = start or datetime(2025, 1, 1, tzinfo=UTC)
    return [
        dataset(
            f"ds-{i:07d}",
            user_id=f"user-{i % 7}",
            created=(start + timedelta(minutes=i)).isoformat(),
        )
        for i in reversed(range(count))
    ]


def model(
    model_id: str,
    name: str | None = None,
    *,
    dataset_id: str | None = None,
    status: str | None = "COMPLETED",
    owned: bool = True,
    created: str = "2025-02-01T10:00:00+00:00",
    updated: str | None = "2025-02-01T12:00:00+00:00",
    **extra: Any,
) -> dict[str, Any]:
    """One CustomModel object in the API's exact shape (as GET /models lists it)."""
    record: dict[str, Any] = {
        "model_id": model_id,
        "name": name if name is not None else f"Model {model_id}",
        "status": status,
        "dataset_id": dataset_id,
        "custom_model_uri": f"model/{model_id}/version/1" if owned else None,
        "is_owned": owned,
        "is_available_for_generation": status == "COMPLETED",
        "creation_time": created,
        "last_update_time": updated,
    }
    record.update(extra)
    return record


def training_run(
    run_id: str,
    status: str | None = "COMPLETED",
    *,
    created: str = "2025-02-01T10:05:00+00:00",
    updated: str | None = "2025-02-01T11:55:00Z",
    **extra: Any,
) -> dict[str, Any]:
    """One TrainingRun object in the API's exact shape."""
    record: dict[str, Any] = {
        "training_run_id": run_id,
        "status": status,
        "training_steps": 1000,
        "lora_rank": 16,
        "num_chips": 4,
        "ema": 0.999,
        "learning_rate": 0.0001,
        "creation_time": created,
        "last_update_time": updated,
    }
    record.update(extra)
    return record


def file(name: str | None, size: int | None = 1024, **extra: Any) -> dict[str, Any]:
    """One DatasetFile object."""
    return {"file_name": name, "file_size_bytes": size, **extra}
