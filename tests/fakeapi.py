"""A real HTTP server on 127.0.0.1 that plays the Ideogram API's GET /datasets."""

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
    """Serve a listing (or scripted replies, first come first served) on a free local port."""

    def __init__(self) -> None:
        self.datasets: list[Any] = []
        # Listings per API key (several accounts); keys not in it get `datasets`.
        self.by_key: dict[str, list[Any]] = {}
        # Keys answered with 401.
        self.rejected_keys: set[str] = set()
        self.script: deque[Reply] = deque()
        self.requests: list[Seen] = []
        self.times: list[float] = []
        self._lock = threading.Lock()
        # While set to an unset Event, requests wait (up to a minute) before any answer.
        self.gate: threading.Event | None = None
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

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

    def push(self, *replies: Reply) -> None:
        """Answer the next requests with these replies, then go back to the listing."""
        with self._lock:
            self.script.extend(replies)

    def _next(self, key: str | None) -> Reply:
        with self._lock:
            if self.script:
                return self.script.popleft()
            if key in self.rejected_keys:
                return Reply(401, {"detail": "Unauthorized"})
            listing = self.by_key.get(key or "", self.datasets)
            return Reply(200, {"datasets": listing}, {"Content-Type": "application/json"})

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append(Seen("GET", handler.path, dict(handler.headers.items())))
            self.times.append(time.monotonic())
        key = handler.headers.get("Api-Key")
        reply = self._next(key) if handler.path.split("?")[0] == "/datasets" else Reply(404)
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
