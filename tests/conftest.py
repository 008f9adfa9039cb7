"""Fixtures: a fake Ideogram API on 127.0.0.1, fresh databases on SQLite/PostgreSQL/MariaDB."""

from __future__ import annotations

import os
import random
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sync.cli import main
from tests.fakeapi import FakeApi

API_KEY = "sk-test-4f1c9a2b7e"
BACKENDS = ["sqlite", "postgresql", "mysql"]
_ENV_FOR = {"postgresql": "TEST_POSTGRES_URL", "mysql": "TEST_MYSQL_URL"}


@pytest.fixture
def fake_api() -> Iterator[FakeApi]:
    api = FakeApi()
    yield api
    api.close()


# Most tests are about the datasets listing, and count its requests and runs: they sync it
# alone. Tests of the other resources (tests/test_resources.py) use ALL_RESOURCES.
ONLY_DATASETS = {"IDEOGRAM_SYNC_RESOURCES": "datasets"}
ALL_RESOURCES = {"IDEOGRAM_SYNC_RESOURCES": "datasets,dataset_details,models,model_details"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test starts in an empty folder with none of the tool's variables set (but
    ONLY_DATASETS)."""
    for name in list(os.environ):
        if name.startswith(("IDEOGRAM_", "MY_IDEOGRAM")):
            monkeypatch.delenv(name)
    for name, value in ONLY_DATASETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)


def _server_database(backend: str, base_url: str) -> Iterator[str]:
    from sync.db import normalize_url

    url = normalize_url(base_url)
    name = f"ids_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if backend == "postgresql":
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        else:
            conn.exec_driver_sql(
                f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
            )
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            if backend == "postgresql":
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            else:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()


def database_url_for(backend: str, tmp_path: Path) -> Iterator[str]:
    """Yield a URL of a fresh, empty database on `backend`, or skip when it is not configured."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    env = _ENV_FOR[backend]
    if not os.environ.get(env):
        pytest.skip(f"{env} is not set; .ci/run sets it to test against a real {backend} server")
    yield from _server_database(backend, os.environ[env])


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh empty database on each backend (server backends skip when not configured)."""
    yield from database_url_for(request.param, tmp_path)


@pytest.fixture
def synced(cli: Any, fake_api: FakeApi, db_url: str) -> Iterator[str]:
    """A database after one good sync of three datasets; the API then lists a change."""
    from tests.fakeapi import dataset

    fake_api.datasets = [dataset("a"), dataset("b"), dataset("c")]
    assert cli("--database-url", db_url, "run").code == 0
    fake_api.datasets = [dataset("a", "renamed"), dataset("b"), dataset("d")]
    yield db_url


@pytest.fixture(params=["postgresql", "mysql"])
def server_synced(
    request: pytest.FixtureRequest, cli: Any, fake_api: FakeApi, tmp_path: Path
) -> Iterator[str]:
    """Like `synced`, on the database servers only (a connection to drop, a server to stop)."""
    from tests.fakeapi import dataset

    for url in database_url_for(request.param, tmp_path):
        fake_api.datasets = [dataset("a"), dataset("b"), dataset("c")]
        assert cli("--database-url", url, "run").code == 0
        fake_api.datasets = [dataset("a", "renamed"), dataset("b"), dataset("d")]
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'test.db'}"


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def output(self) -> str:
        return self.out + self.err


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fake_api: FakeApi
) -> Any:
    """Run `ideogram-sync` in-process against the fake API; returns exit code and output."""

    def run(*args: str, env: dict[str, str] | None = None, key: str | None = API_KEY) -> Result:
        monkeypatch.setenv("IDEOGRAM_API_BASE_URL", fake_api.url)
        if key is not None:
            monkeypatch.setenv("IDEOGRAM_API_KEY", key)
        else:
            monkeypatch.delenv("IDEOGRAM_API_KEY", raising=False)
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def free_port() -> int:
    """A port for a server a test starts, free now, below the kernel's ephemeral range.

    A port taken with bind(0) is an ephemeral one, which the kernel may hand out again at
    once to another test's bind(0) or to a client socket before our server gets to bind it:
    a test then talked to another test's server. Ports from 20000 to 32767 are never handed
    out that way.
    """
    for _ in range(100):
        port = random.randrange(20000, 32768)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port between 20000 and 32767")


def handles_signal(pid: int, signum: int) -> bool:
    """Whether process `pid` has installed a handler for `signum` (Linux's /proc).

    A signal sent before the handler is there kills the process instead of stopping it
    cleanly: tests wait for this rather than sleeping "long enough".
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signum - 1)))


def subprocess_env(fake_api: FakeApi, db_url: str, **extra: str) -> dict[str, str]:
    """Environment for a real `python -m sync` process against the fake API and `db_url`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEOGRAM_")}
    env.update(
        ONLY_DATASETS,
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
        IDEOGRAM_API_KEY=API_KEY,
        IDEOGRAM_API_BASE_URL=fake_api.url,
        IDEOGRAM_SYNC_DATABASE_URL=db_url,
    )
    env.update(extra)
    return env


def rows(url: str, table: str = "datasets", order: str = "1") -> list[dict[str, Any]]:
    """Every row of `table`, as dicts, through the tool's own column types."""
    from sync.db import make_engine
    from sync.models import metadata

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            tbl = metadata.tables[table]
            result = conn.execute(sa.select(tbl).order_by(sa.text(order)))
            return [dict(r._mapping) for r in result]
    finally:
        engine.dispose()
