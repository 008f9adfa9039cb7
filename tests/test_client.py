"""The HTTP client against a real local server: headers, retries, Retry-After, limits."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from sync.client import fetch_datasets, make_session
from sync.config import ApiSettings
from sync.errors import ApiError, AuthError, ResponseError
from tests.fakeapi import FakeApi, Reply, dataset


def api(fake: FakeApi, **overrides: object) -> ApiSettings:
    values: dict[str, object] = {
        "base_url": fake.url,
        "max_retries": 2,
        "backoff_factor": 0.0,
        "timeout_seconds": 5.0,
    }
    values.update(overrides)
    return ApiSettings(**values)  # type: ignore[arg-type]


def fetch(fake: FakeApi, **overrides: object) -> bytes:
    settings = api(fake, **overrides)
    with make_session(settings, "sk-client-test") as session:
        return fetch_datasets(session, settings).file.read()


def test_sends_key_user_agent_and_accept(fake_api: FakeApi) -> None:
    fake_api.datasets = [dataset("a")]
    assert b'"dataset_id": "a"' in fetch(fake_api)
    (seen,) = fake_api.requests
    assert seen.path == "/datasets"
    assert seen.headers["Api-Key"] == "sk-client-test"
    assert seen.headers["User-Agent"].startswith("ideogram-dataset-sync/0.")
    assert seen.headers["Accept"] == "application/json"


def test_retry_after_is_waited_for(fake_api: FakeApi) -> None:
    fake_api.push(Reply(429, {"detail": "slow"}, {"Retry-After": "1"}))
    fake_api.datasets = [dataset("a")]
    fetch(fake_api)
    first, second = fake_api.times[:2]
    assert len(fake_api.requests) == 2
    assert second - first >= 0.9  # the server asked for a second; backoff alone is 0 here


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_retry_until_they_run_out(fake_api: FakeApi, status: int) -> None:
    fake_api.push(*[Reply(status, {"detail": "down"})] * 3)
    with pytest.raises(ApiError, match=f"HTTP {status}.*3 attempts"):
        fetch(fake_api)
    assert len(fake_api.requests) == 3


def test_server_error_then_success(fake_api: FakeApi) -> None:
    fake_api.push(Reply(502), Reply(500))
    fake_api.datasets = [dataset("a")]
    fetch(fake_api)
    assert len(fake_api.requests) == 3


@pytest.mark.parametrize(
    ("status", "error"), [(400, ApiError), (401, AuthError), (403, AuthError), (404, ApiError)]
)
def test_client_errors_are_not_retried(fake_api: FakeApi, status: int, error: type) -> None:
    fake_api.push(Reply(status, {"detail": "nope"}))
    with pytest.raises(error, match=f"HTTP {status}.*nope"):
        fetch(fake_api)
    assert len(fake_api.requests) == 1


def test_connection_refused_is_one_clear_error() -> None:
    settings = ApiSettings(base_url="http://127.0.0.1:9", max_retries=1, backoff_factor=0)
    with (
        make_session(settings, "k") as session,
        pytest.raises(ApiError, match="connection refused"),
    ):
        fetch_datasets(session, settings)


def test_read_timeout_is_retried_then_reported(fake_api: FakeApi) -> None:
    fake_api.push(*[Reply(200, {"datasets": []}, delay=1.0)] * 2)
    started = time.monotonic()
    with pytest.raises(ApiError, match=r"did not answer within 0\.3s"):
        fetch(fake_api, timeout_seconds=0.3, max_retries=1)
    assert time.monotonic() - started < 5
    assert len(fake_api.requests) == 2


def test_redirects_are_not_followed(fake_api: FakeApi) -> None:
    fake_api.push(Reply(301, b"", {"Location": "http://127.0.0.1:9/datasets"}))
    with pytest.raises(ApiError, match="redirected"):
        fetch(fake_api)
    assert len(fake_api.requests) == 1


def test_response_larger_than_the_limit_fails(fake_api: FakeApi) -> None:
    fake_api.datasets = [dataset(f"d{i}") for i in range(50)]
    with pytest.raises(ResponseError, match=r"larger than api\.max_response_bytes"):
        fetch(fake_api, max_response_bytes=1000)


def test_non_json_200_is_refused(fake_api: FakeApi) -> None:
    fake_api.push(Reply(200, "<html></html>", {"Content-Type": "text/html; charset=utf-8"}))
    with pytest.raises(ResponseError, match="text/html instead of JSON"):
        fetch(fake_api)


def test_body_comes_with_the_sha256_of_its_bytes(fake_api: FakeApi) -> None:
    """The digest the job compares is of exactly the bytes the parser reads."""
    fake_api.datasets = [dataset("a"), dataset("b")]
    settings = api(fake_api)
    with make_session(settings, "sk-client-test") as session:
        body = fetch_datasets(session, settings)
    with body:
        data = body.file.read()
    assert data == json.dumps({"datasets": fake_api.datasets}).encode()
    assert body.sha256 == hashlib.sha256(data).hexdigest()
