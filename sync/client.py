"""The Ideogram API client: one retrying HTTP session, and a listing (`GET /datasets`,
`GET /models`) fetched into a file within a deadline. detail_fetch.py fetches the details."""

from __future__ import annotations

import contextvars
import hashlib
import io
import json
import logging
import tempfile
import threading
import time
from http import HTTPStatus
from typing import Any, BinaryIO, Protocol

import requests
from requests.adapters import HTTPAdapter
from urllib3 import exceptions as urllib3_exceptions
from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError
from urllib3.util.retry import Retry

from sync import __version__
from sync.config import ApiSettings
from sync.errors import ApiError, AuthError, Cancelled, ResponseError

log = logging.getLogger(__name__)

DATASETS_PATH = "/datasets"
USER_AGENT = f"ideogram-dataset-sync/{__version__} (+python-requests/{requests.__version__})"
# Transient answers worth another try; 4xx other than 429 will not change on retry.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_CHUNK = 256 * 1024
# Bodies up to this size stay in memory; larger ones go to a file in TMPDIR.
SPOOL_IN_MEMORY = 32 * 1024 * 1024


class CancelFlag(Protocol):
    """Anything that says whether to abandon the fetch (a threading.Event, say)."""

    def is_set(self) -> bool:
        """True once the fetch should be abandoned."""
        ...


def make_session(api: ApiSettings, api_key: str, retry_429: bool = True) -> requests.Session:
    """A Session with the key, a User-Agent and urllib3 retries (backoff, Retry-After).

    `retry_429=False` hands a 429 back to the caller (detail_fetch.py pauses every worker):
    urllib3 would retry any answer with a Retry-After itself, so it then ignores that header
    (a 503 is retried with the backoff).
    """
    retry = Retry(
        total=api.max_retries,
        connect=api.max_retries,
        read=api.max_retries,
        status=api.max_retries,
        other=0,
        allowed_methods=frozenset({"GET"}),
        status_forcelist=RETRY_STATUSES if retry_429 else RETRY_STATUSES - {429},
        backoff_factor=api.backoff_factor,
        respect_retry_after_header=retry_429,
        # Hand back the last response when retries run out, so we can name its status.
        raise_on_status=False,
    )
    # One connection kept alive per session: each session is used by one thread at a time.
    adapter = HTTPAdapter(max_retries=retry, pool_connections=1, pool_maxsize=1)
    session = requests.Session()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update(
        {"Api-Key": api_key, "User-Agent": USER_AGENT, "Accept": "application/json"}
    )
    return session


class Body:
    """A listing body: a file positioned at 0, and the SHA-256 (hex) of its bytes."""

    def __init__(self, file: BinaryIO, sha256: str) -> None:
        self.file = file
        self.sha256 = sha256

    @classmethod
    def from_bytes(cls, data: bytes) -> Body:
        """A Body held in memory (a saved listing, a test)."""
        return cls(io.BytesIO(data), hashlib.sha256(data).hexdigest())

    def __enter__(self) -> Body:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.file.close()


def fetch_datasets(
    session: requests.Session,
    api: ApiSettings,
    cancel: CancelFlag | None = None,
    path: str = DATASETS_PATH,
) -> Body:
    """GET `path` within api.deadline_seconds into a file (at 0); raise ApiError/AuthError/ResponseError.

    The body goes to a temporary file (in memory while small), not into one big bytes
    object, so a huge listing is parsed as a stream. Setting `cancel` abandons the fetch
    at once (raises Cancelled).
    """
    return PendingFetch(session, api, path=path).result(cancel)


def start_fetch(api: ApiSettings, api_key: str, path: str = DATASETS_PATH) -> PendingFetch:
    """Start GET `path` now, in the background, on a session of its own."""
    return PendingFetch(make_session(api, api_key), api, close_session=True, path=path)


class PendingFetch:
    """A listing GET running in a worker thread; `result` waits for it, within the deadline."""

    def __init__(
        self,
        session: requests.Session,
        api: ApiSettings,
        close_session: bool = False,
        path: str = DATASETS_PATH,
    ) -> None:
        self._api = api
        self._path = path
        self._outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                self._outcome["body"] = _fetch(session, api, path)
            except BaseException as exc:
                self._outcome["error"] = exc
            finally:
                if close_session:
                    session.close()

        # Timeouts bound each read, not a server that trickles bytes forever or a
        # long retry chain; the deadline bounds the whole fetch. Daemonic, so a stuck
        # socket never keeps the process alive after we give up on it.
        # In a copy of the caller's context: its log lines are about the caller's run.
        self._worker = threading.Thread(
            target=contextvars.copy_context().run, args=(work,), name="ideogram-fetch", daemon=True
        )
        self._deadline = time.monotonic() + api.deadline_seconds
        self._worker.start()

    def result(self, cancel: CancelFlag | None = None) -> Body:
        """The body; raise what the fetch raised, ApiError past the deadline, or Cancelled."""
        worker, deadline = self._worker, self._deadline
        while worker.is_alive() and time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            worker.join(min(0.2, max(deadline - time.monotonic(), 0)))
        if worker.is_alive():
            raise ApiError(
                f"the Ideogram API did not deliver GET {self._path} within api.deadline_seconds "
                f"({self._api.deadline_seconds:g}s); it may be overloaded or the network is "
                "slow. The next run will try again"
            )
        if "error" in self._outcome:
            raise self._outcome["error"]
        body: Body = self._outcome["body"]
        return body


def _fetch(session: requests.Session, api: ApiSettings, path: str) -> Body:
    url = api.base_url + path
    response = get(session, api, url, stream=True)
    with response:
        check_status(response, url, attempts(api))
        check_json(response, url)
        return read_body(response, api.max_response_bytes, url)


def attempts(api: ApiSettings) -> str:
    """How many attempts a request gets, for messages: "6 attempts"."""
    return f"{api.max_retries + 1} attempt{'s' if api.max_retries else ''}"


def get(
    session: requests.Session, api: ApiSettings, url: str, stream: bool = False
) -> requests.Response:
    """GET `url` (with the session's retries); ApiError, in one line, if no answer came."""
    try:
        # No redirects: requests would resend our custom Api-Key header to any host.
        return session.get(
            url,
            timeout=(api.timeout_seconds, api.timeout_seconds),
            allow_redirects=False,
            stream=stream,
        )
    except requests.exceptions.RequestException as exc:
        if not _is_timeout(exc):
            raise ApiError(
                f"cannot reach the Ideogram API at {url} ({attempts(api)}): {_reason(exc)}; "
                "check the network and api.base_url"
            ) from None
        raise ApiError(
            f"the Ideogram API at {url} did not answer within {api.timeout_seconds:g}s "
            f"({attempts(api)}); check the network or raise api.timeout_seconds"
        ) from None


def check_json(response: requests.Response, url: str) -> None:
    """ResponseError unless a 200 answer is JSON (or does not say what it is)."""
    content_type = response.headers.get("Content-Type", "")
    if content_type and "json" not in content_type.lower():
        raise ResponseError(
            f"the Ideogram API at {url} answered 200 with {content_type.split(';')[0]} "
            "instead of JSON; check api.base_url (a proxy or login page may be in the way)"
        )


def check_status(response: requests.Response, url: str, attempts: str) -> None:
    """Nothing for a 200; otherwise the ApiError (AuthError for 401/403) that says why."""
    status = response.status_code
    if status == 200:
        return
    label = _status_label(status)
    detail = _error_detail(response)
    if status in (401, 403):
        raise AuthError(
            f"the Ideogram API rejected the key ({label}{detail}); check that the API key "
            "variable (default IDEOGRAM_API_KEY) holds a valid, active key",
            status,
        )
    if 300 <= status < 400:
        location = response.headers.get("Location", "?")
        raise ApiError(
            f"the Ideogram API at {url} redirected ({label}) to {location}; "
            "set api.base_url to the final address",
            status,
        )
    if status == 429:
        raise ApiError(
            f"the Ideogram API kept rate-limiting the request ({label}, {attempts}); "
            "run less often or raise api.max_retries",
            status,
        )
    if status >= 500:
        raise ApiError(
            f"the Ideogram API failed ({label}{detail}, {attempts}); "
            "this is usually temporary, the next run will try again",
            status,
        )
    raise ApiError(
        f"the Ideogram API at {url} answered {label}{detail}; check api.base_url", status
    )


def read_body(response: requests.Response, limit: int, url: str) -> Body:
    """The answer's body in a file (at 0), hashed; ResponseError past `limit` bytes."""
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ResponseError(_too_large(url, limit))
    # Closed by the caller (job.py reads it in a with block), or below on failure.
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, prefix="ideogram-sync-")  # noqa: SIM115
    size = 0
    # Hashed while it arrives (hashlib releases the GIL): the job compares digests to
    # recognise a listing that did not change.
    digest = hashlib.sha256()
    try:
        for chunk in response.iter_content(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise ResponseError(_too_large(url, limit))
            spool.write(chunk)
            digest.update(chunk)
    except requests.exceptions.RequestException as exc:
        spool.close()
        raise ApiError(
            f"the connection to the Ideogram API broke while reading the response from {url}: "
            f"{_reason(exc)}; the next run will try again"
        ) from None
    except OSError as exc:
        spool.close()
        raise ApiError(
            f"cannot buffer the response from {url} in a temporary file "
            f"({exc.strerror or exc}); set TMPDIR to a writable folder with room for it"
        ) from None
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return Body(spool, digest.hexdigest())  # type: ignore[arg-type]


def _too_large(url: str, limit: int) -> str:
    return (
        f"the response from {url} is larger than api.max_response_bytes ({limit} bytes); "
        "raise the limit if the account really has that many datasets"
    )


def _status_label(status: int) -> str:
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _error_detail(response: requests.Response) -> str:
    # The server's framework usually says why in {"detail": ...}; not documented, so optional.
    try:
        raw = response.raw.read(4096, decode_content=True) if response.raw else b""
        detail = json.loads(raw).get("detail")
    except (ValueError, AttributeError, OSError, TypeError, requests.exceptions.RequestException):
        return ""
    if not isinstance(detail, str) or not detail.strip():
        return ""
    detail = " ".join(detail.split())
    return f": {detail[:200]}"


def _root_cause(exc: BaseException) -> BaseException:
    # requests wraps urllib3's MaxRetryError, which wraps what really happened.
    cause = exc
    for _ in range(10):
        if isinstance(cause, MaxRetryError) and cause.reason is not None:
            cause = cause.reason
        elif cause.args and isinstance(cause.args[0], BaseException):
            cause = cause.args[0]
        else:
            break
    return cause


def _is_timeout(exc: BaseException) -> bool:
    cause = _root_cause(exc)
    # urllib3 makes "connection refused" a subclass of its connect-timeout error.
    if isinstance(cause, NewConnectionError):
        return False
    return isinstance(exc, requests.exceptions.Timeout) or isinstance(
        cause, TimeoutError | urllib3_exceptions.TimeoutError
    )


def _reason(exc: BaseException) -> str:
    cause = _root_cause(exc)
    text = " ".join(str(cause).split())
    if "Connection refused" in text:
        return "connection refused"
    if (
        "Name or service not known" in text
        or "nodename nor servname" in text
        or "NameResolution" in text
    ):
        return "the host name does not resolve"
    if isinstance(cause, ProtocolError) and len(cause.args) > 1:
        text = f"{cause.args[0]} {cause.args[1]}"
    return text[:200]
