"""Many small GETs (one per dataset or model), a bounded number at once, politely.

`fetch_each` runs `concurrency` worker threads, each with its own keep-alive session (with
the usual urllib3 retries for connection errors and 5xx). A 429 is not retried by urllib3,
which would sleep in the one thread that got it: it sets a pause, `Throttle`, that every
worker waits out before its next request, then the request is tried again. The caller's
`stop` (the run's cancel and deadline) is checked while waiting; the workers are daemonic,
so one stuck on a socket never keeps the process alive.

An answer that is not a usable 200 for one item (a 403 or 500 after the retries, a body that
is not JSON or too large) is that item's `Failed`, not the run's: the other items go on. A
401 (the key), or no answer at all (the server unreachable, a timeout), ends the fetch.
With `until`, no request starts after that moment: what was fetched by then is returned.
"""

from __future__ import annotations

import contextvars
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import requests

from sync import client
from sync.config import ApiSettings
from sync.errors import ApiError, AuthError, Cancelled, ResponseError

# A Retry-After longer than this is read as this: the run's deadline bounds the wait anyway.
MAX_PAUSE_SECONDS = 300.0
# How often a waiting thread looks at the stop flag.
_POLL_SECONDS = 0.1

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Failed:
    """One item's answer that could not be used, with why (and its HTTP status)."""

    reason: str
    status: int | None = None


Fetched = bytes | Failed | None  # the body; why not; or None: 404, the item is gone


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
    until: float | None = None,
) -> list[tuple[str, Fetched]]:
    """GET `path` (with {} for the key) for each key: (key, body, Failed, or None for a 404).

    Raises what ends the whole fetch (AuthError, an ApiError without an answer) after
    stopping the other workers, and Cancelled when `stop` is set. With `until` (a
    time.monotonic() value) the keys not asked for by then are left out of the result.
    """
    if not keys:
        return []
    todo: queue.SimpleQueue[str] = queue.SimpleQueue()
    for key in keys:
        todo.put(key)
    done: queue.SimpleQueue[tuple[str, Fetched] | BaseException] = queue.SimpleQueue()
    halt = threading.Event()
    throttle = Throttle()

    def work() -> None:
        with client.make_session(api, api_key, retry_429=False) as session:
            while not halt.is_set():
                if until is not None and time.monotonic() > until:
                    return
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
    results: list[tuple[str, Fetched]] = []
    try:
        while len(results) < len(keys):
            if stop.is_set():
                raise Cancelled()
            try:
                item = done.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if not any(worker.is_alive() for worker in workers) and done.empty():
                    break  # past `until`: the workers took no more keys
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
) -> Fetched:
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
            try:
                client.check_status(response, url, client.attempts(api))
                client.check_json(response, url)
                with client.read_body(response, api.max_response_bytes, url) as body:
                    data: bytes = body.file.read()
                    return data
            except AuthError as exc:
                if exc.status == 401:
                    raise  # the key: every other request would be refused too
                return Failed(str(exc), exc.status)
            except ResponseError as exc:
                return Failed(str(exc), 200)
            except ApiError as exc:
                if exc.status is None:
                    raise  # no answer at all: the server or the network, not this item
                return Failed(str(exc), exc.status)


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
