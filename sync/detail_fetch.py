"""Many small GETs (one per dataset or model), a bounded number at once, politely.

`fetch_each` runs `concurrency` worker threads, each with its own keep-alive session (with
the usual urllib3 retries for connection errors and 5xx). A 429 is not retried by urllib3,
which would sleep in the one thread that got it: it sets a pause, `Throttle`, that every
worker waits out before its next request, then the request is tried again. The caller's
`stop` (the run's cancel and deadline) is checked while waiting; the workers are daemonic,
so one stuck on a socket never keeps the process alive.
"""

from __future__ import annotations

import contextvars
import queue
import threading
import time
from collections.abc import Callable, Sequence
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import requests

from sync import client
from sync.config import ApiSettings
from sync.errors import Cancelled

# A Retry-After longer than this is read as this: the run's deadline bounds the wait anyway.
MAX_PAUSE_SECONDS = 300.0
# How often a waiting thread looks at the stop flag.
_POLL_SECONDS = 0.1

Progress = Callable[[int, int], None]


class Throttle:
    """A pause shared by every worker: after a 429, none sends until it is over."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until = 0.0

    def pause(self, seconds: float) -> None:
        """Hold every worker for `seconds` from now (a longer pause already set stays)."""
        with self._lock:
            self._until = max(self._until, time.monotonic() + min(seconds, MAX_PAUSE_SECONDS))

    def wait(self, stop: threading.Event) -> None:
        """Return once no pause is in force; raise Cancelled when `stop` is set meanwhile."""
        while True:
            with self._lock:
                left = self._until - time.monotonic()
            if stop.is_set():
                raise Cancelled()
            if left <= 0:
                return
            stop.wait(min(left, _POLL_SECONDS))


def fetch_each(
    api: ApiSettings,
    api_key: str,
    path: str,
    keys: Sequence[str],
    concurrency: int,
    stop: client.CancelFlag,
    progress: Progress | None = None,
) -> list[tuple[str, bytes | None]]:
    """GET `path` (with {} for the key) for each key: (key, body, or None for a 404).

    Raises the first failure (ApiError, AuthError, ResponseError) after stopping the other
    workers, and Cancelled when `stop` is set.
    """
    if not keys:
        return []
    todo: queue.SimpleQueue[str] = queue.SimpleQueue()
    for key in keys:
        todo.put(key)
    done: queue.SimpleQueue[tuple[str, bytes | None] | BaseException] = queue.SimpleQueue()
    halt = threading.Event()
    throttle = Throttle()

    def work() -> None:
        with client.make_session(api, api_key, retry_429=False) as session:
            while not halt.is_set():
                try:
                    key = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    url = api.base_url + path.format(quote(key, safe=""))
                    done.put((key, _get(session, api, url, throttle, halt)))
                except BaseException as exc:
                    done.put(exc)
                    return

    workers = [
        threading.Thread(
            target=contextvars.copy_context().run,
            args=(work,),
            name=f"ideogram-details-{n}",
            daemon=True,
        )
        for n in range(min(concurrency, len(keys)))
    ]
    for worker in workers:
        worker.start()
    results: list[tuple[str, bytes | None]] = []
    try:
        while len(results) < len(keys):
            if stop.is_set():
                raise Cancelled()
            try:
                item = done.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if not any(worker.is_alive() for worker in workers) and done.empty():
                    raise RuntimeError("the detail workers stopped without an answer") from None
                continue
            if isinstance(item, BaseException):
                raise item
            results.append(item)
            if progress is not None:
                progress(len(results), len(keys))
    finally:
        halt.set()
    return results


def _get(
    session: requests.Session,
    api: ApiSettings,
    url: str,
    throttle: Throttle,
    halt: threading.Event,
) -> bytes | None:
    """One detail's body; None for a 404. A 429 pauses every worker, then is tried again."""
    limited = 0
    while True:
        throttle.wait(halt)
        # Streamed, so read_body enforces max_response_bytes as the body arrives.
        response = client.get(session, api, url, stream=True)
        with response:
            if response.status_code == 429 and limited < api.max_retries:
                limited += 1
                throttle.pause(_retry_after(response) or api.backoff_factor * 2 ** (limited - 1))
                continue
            if response.status_code == 404:
                return None
            client.check_status(response, url, client.attempts(api))
            client.check_json(response, url)
            with client.read_body(response, api.max_response_bytes, url) as body:
                data: bytes = body.file.read()
                return data


def _retry_after(response: requests.Response) -> float | None:
    """Seconds from a Retry-After header (a number or an HTTP date), or None."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when: Any = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)
