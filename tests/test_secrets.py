"""Neither the API key nor a database password ever shows: not in output, log records,
exception messages or database rows, whatever fails, at DEBUG level with tracebacks."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sync.db import make_engine
from tests.fakeapi import FakeApi, Reply

KEY = "sk-live-Zq8u1XyW3secret"
PASSWORD = "pw-Hn4k9Wd2secret"

SCENARIOS: dict[str, list[Reply]] = {
    "401-echoing-the-key": [Reply(401, {"detail": f"bad key {KEY}"})],
    "500s-echoing-the-key": [Reply(500, {"detail": f"boom {KEY}"})] * 2,
    "not-json-echoing-the-key": [Reply(200, f"<html>{KEY}</html>")],
    "html-page": [
        Reply(502, f"<html>proxy saw Api-Key: {KEY}</html>", {"Content-Type": "text/html"})
    ]
    * 2,
    "bad-records": [Reply(200, {"datasets": [{"dataset_id": KEY, "name": 1}]})],
}


def _all_text(result: Any, caplog: pytest.LogCaptureFixture) -> str:
    parts = [result.out, result.err]
    formatter = logging.Formatter()
    for record in caplog.records:
        parts.append(record.getMessage())
        if record.exc_info:
            parts.append(formatter.formatException(record.exc_info))
        if record.exc_text:
            parts.append(record.exc_text)
    return "\n".join(parts)


def _db_text(url: str) -> str:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            tables = sa.inspect(conn).get_table_names()
            return "\n".join(
                repr(row)
                for table in tables
                for row in conn.exec_driver_sql(f"SELECT * FROM {table}")
            )
    finally:
        engine.dispose()


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_api_failures_never_show_the_key(
    cli,
    fake_api: FakeApi,
    sqlite_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    scenario: str,
) -> None:
    (tmp_path / "fast.toml").write_text("[api]\nmax_retries = 1\nbackoff_factor = 0\n")
    fake_api.push(*SCENARIOS[scenario])
    caplog.set_level(logging.DEBUG)
    outputs = []
    for command in (["run"], ["status"], ["datasets", "--format", "json"], ["migrate"]):
        result = cli(
            "--config",
            "fast.toml",
            "--database-url",
            sqlite_url,
            "-v",
            "--log-level",
            "DEBUG",
            *command,
            key=KEY,
        )
        outputs.append(_all_text(result, caplog))
    text = "\n".join(outputs)
    assert KEY not in text
    assert KEY not in _db_text(sqlite_url)
    if scenario.endswith("echoing-the-key") and not scenario.startswith("not-json"):
        assert "***" in text  # the echoed key reached a message, masked


def test_key_from_a_file_is_masked_too(
    cli, fake_api: FakeApi, sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file-Pq7secret\n")
    (tmp_path / "c.toml").write_text(f'[api]\napi_key_file = "{key_file}"\nmax_retries = 0\n')
    fake_api.push(Reply(403, {"detail": "sk-from-file-Pq7secret is revoked"}))
    caplog.set_level(logging.DEBUG)
    result = cli("--config", "c.toml", "--database-url", sqlite_url, "-v", "run", key=None)
    assert result.code == 3
    assert fake_api.requests[-1].headers["Api-Key"] == "sk-from-file-Pq7secret"
    assert "sk-from-file-Pq7secret" not in _all_text(result, caplog)
    assert "sk-from-file-Pq7secret" not in _db_text(sqlite_url)


def _unreachable_urls() -> list[str]:
    urls = [
        f"postgresql://sync:{PASSWORD}@127.0.0.1:1/nowhere",
        f"mysql://sync:{PASSWORD}@127.0.0.1:1/nowhere",
    ]
    if os.environ.get("TEST_MYSQL_URL"):
        # A real server that refuses the credentials.
        url = sa.make_url(os.environ["TEST_MYSQL_URL"])
        urls.append(
            url.set(username="no_such_user", password=PASSWORD).render_as_string(
                hide_password=False
            )
        )
    if os.environ.get("TEST_POSTGRES_URL"):
        url = sa.make_url(os.environ["TEST_POSTGRES_URL"])
        urls.append(
            url.set(password=PASSWORD, database="no_such_db").render_as_string(hide_password=False)
        )
    return urls


@pytest.mark.parametrize(
    "url", _unreachable_urls(), ids=lambda u: sa.make_url(u).drivername + str(sa.make_url(u).port)
)
def test_database_password_never_shows(cli, url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    example = str(Path(__file__).resolve().parents[1] / "examples" / "datasets.json")
    for command in (["run", "--input", example], ["run"], ["status"], ["migrate"], ["datasets"]):
        result = cli("--database-url", url, "-v", "--log-level", "DEBUG", *command)
        assert result.code == 1, result.err
        text = _all_text(result, caplog)
        assert PASSWORD not in text
        assert "database error" in result.err
    # The same URL through the environment and a config file.
    result = cli("status", env={"IDEOGRAM_SYNC_DATABASE_URL": url})
    assert result.code == 1 and PASSWORD not in _all_text(result, caplog)
