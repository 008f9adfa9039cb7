"""The daemon's status page (GET / on the metrics port): its HTML, its escaping, its reads
from sync_runs, its answer when the database is down, and a real headless Chromium against a
running daemon after a success and after a failure."""

from __future__ import annotations

import os
import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from sync.config import Settings
from sync.db import make_engine, migrate
from sync.metrics import Metrics, serve
from sync.models import Counts
from sync.runs import RunRow, fail_run, finish_run, start_run
from sync.status_page import (
    FAILING,
    OK,
    STALE,
    UNREACHABLE,
    WAITING,
    AccountStatus,
    ResourceStatus,
    Snapshot,
    StatusPage,
    overall,
    read_accounts,
    render,
)
from tests.conftest import ALL_RESOURCES, database_url_for, rows
from tests.fakeapi import FakeApi, Reply, dataset, model
from tests.test_daemon import daemon, free_port, get, stop, successes, until

NOW = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)
SCREENSHOT = Path("/tmp/ideogram-status-page.png")  # noqa: S108 - for people to look at
SCREENSHOT_SUCCESS = Path("/tmp/ideogram-status-page-success.png")  # noqa: S108
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
HOSTILE = "<script>alert(\"x\")</script> & 'quotes' <img src=x onerror=alert(1)>"


def run(
    run_id: int,
    resource: str = "datasets",
    status: str = "success",
    *,
    account: str = "default",
    started: datetime = NOW - timedelta(minutes=5),
    seconds: float | None = 2.5,
    error: str | None = None,
    **counts: int,
) -> RunRow:
    values = {
        name: counts.get(name, 0)
        for name in ("datasets_seen", "inserted", "updated", "unchanged", "deleted", "rejected")
    }
    finished = None if seconds is None else started + timedelta(seconds=seconds)
    return RunRow(
        run_id, account, started, finished, status, **values, error=error, resource=resource
    )


def snapshot(*accounts: AccountStatus, **changes: Any) -> Snapshot:
    values: dict[str, Any] = {
        "now": NOW,
        "accounts": accounts,
        "max_age_seconds": 3600.0,
        "schedule": "every 30s, aligned to the epoch (UTC)",
        "next_slot": NOW + timedelta(seconds=12),
    }
    return Snapshot(**(values | changes))


def account(
    name: str, *resources: ResourceStatus, recent: tuple[RunRow, ...] = ()
) -> AccountStatus:
    return AccountStatus(name, resources, recent)


class Tags(HTMLParser):
    """The tags, attributes and text of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attributes: set[str] = set()
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


# -- the HTML ------------------------------------------------------------------------


def test_a_plain_page_that_refreshes_itself_without_javascript() -> None:
    good = run(7, datasets_seen=3, inserted=2, updated=1, started=NOW - timedelta(minutes=3))
    page = render(
        snapshot(
            account(
                "default",
                ResourceStatus("datasets", good, good.finished_at),
                recent=(good, run(6, "datasets", "failed", error="HTTP 500")),
            )
        )
    )
    assert page.startswith("<!DOCTYPE html>\n")
    assert '<meta charset="utf-8">' in page
    assert '<meta http-equiv="refresh" content="30">' in page
    assert "<title>ideogram-sync: OK</title>" in page
    parsed = Tags(page)
    # No JavaScript, and nothing fetched from anywhere else.
    assert not parsed.tags & {"script", "link", "img", "iframe", "object", "embed"}
    assert not {a for a in parsed.attributes if a.startswith("on")} | (
        parsed.attributes & {"src", "href"}
    )
    assert "http://" not in page and "https://" not in page
    text = " ".join(" ".join(parsed.text).split())
    assert "Next slot 2026-11-25 10:00:12 UTC (in 12.0s)" in text
    assert "max_age 1h 00m" in text
    assert "Account default" in text
    assert "datasets success 2026-11-25 09:57:00 UTC 2.5s 3 2 1 0 0 0" in text
    assert "2026-11-25 09:57:02 UTC (2m 57s ago) fresh" in text
    # The history: newest first, with the resource and the error.
    assert text.index("7 datasets success") < text.index("6 datasets failed")
    assert "HTTP 500" in text


def test_everything_from_the_database_and_the_api_is_escaped() -> None:
    bad = run(9, HOSTILE, HOSTILE, error=HOSTILE + "\nsecond line")
    page = render(
        snapshot(
            account(HOSTILE, ResourceStatus(HOSTILE, bad, None), recent=(bad,)),
            schedule=HOSTILE,
        )
    )
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;quotes&#x27;" in page
    parsed = Tags(page)
    assert "script" not in parsed.tags and "img" not in parsed.tags
    assert not [a for a in parsed.attributes if a.startswith("on")]
    # Read back, the text is the original (the error on one line).
    text = "".join(parsed.text)
    assert f"Account {HOSTILE}" in text
    assert f"{HOSTILE} second line" in text


def test_a_long_error_is_clipped_with_the_whole_line_in_its_tooltip() -> None:
    error = "HTTP 500: " + "x" * 1000
    failed = run(3, status="failed", error=error)
    page = render(snapshot(account("default", ResourceStatus("datasets", failed, None))))
    assert f'title="{error}"' in page
    assert ">HTTP 500: " + "x" * 289 + "…</td>" in page


@pytest.mark.parametrize(
    ("resources", "max_age", "state"),
    [
        ([("success", 60)], 3600.0, OK),
        ([("success", 60), ("success", 7200)], 3600.0, STALE),
        ([("success", 60), ("failed", None)], 3600.0, FAILING),
        ([("failed", 7200)], 3600.0, STALE),  # stale wins
        ([("success", 60), ("abandoned", 60)], 3600.0, FAILING),
        ([("success", 60), (None, None)], 3600.0, WAITING),  # a resource never run yet
        ([("running", None)], 3600.0, WAITING),
        ([("success", 7200)], None, OK),  # no max_age: no staleness
        ([("running", 60)], 3600.0, OK),
    ],
)
def test_the_title_carries_the_worst_state(
    resources: list[tuple[str | None, float | None]], max_age: float | None, state: str
) -> None:
    statuses = []
    for i, (status, success_age) in enumerate(resources):
        last = None if status is None else run(i + 1, f"r{i}", status)
        success = None if success_age is None else NOW - timedelta(seconds=success_age)
        statuses.append(ResourceStatus(f"r{i}", last, success))
    shot = snapshot(account("default", *statuses), max_age_seconds=max_age)
    assert overall(shot) == state
    assert f"<title>ideogram-sync: {state}</title>" in render(shot)


def test_a_running_run_shows_how_long_so_far_and_no_counts_yet() -> None:
    running = run(4, status="running", seconds=None, started=NOW - timedelta(seconds=75))
    page = render(snapshot(account("default", ResourceStatus("datasets", running, None))))
    text = " ".join(" ".join(Tags(page).text).split())
    assert "datasets running 2026-11-25 09:58:45 UTC 1m 15s so far never no success yet" in text


def test_the_next_slot_and_shutdown() -> None:
    assert "not scheduled" in render(snapshot(next_slot=None))
    assert "shutting down" in render(snapshot(stopping=True))


# -- reading the database ----------------------------------------------------------


def _record(engine: Any, account: str, resource: str, status: str, at: datetime) -> int:
    run_id = start_run(engine, account, at, resource=resource)
    counts = Counts(seen=4, inserted=1, unchanged=3)
    if status == "success":
        with engine.begin() as conn:
            finish_run(conn, run_id, counts, at + timedelta(seconds=2))
    elif status == "failed":
        fail_run(
            engine, run_id, f"HTTP 500 ({resource} {run_id})", counts, at + timedelta(seconds=1)
        )
    return run_id


def test_read_accounts_is_per_account_and_resource_newest_first(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrate(engine)
        at = NOW - timedelta(hours=2)
        first_success = _record(engine, "one", "datasets", "success", at)
        for i in range(22):  # pushes the success out of the last 20 runs
            _record(engine, "one", "datasets", "failed", at + timedelta(minutes=i + 1))
        models_ok = _record(engine, "one", "models", "success", at + timedelta(minutes=30))
        # A resource no longer configured still shows in the history.
        _record(engine, "one", "model_details", "failed", at + timedelta(minutes=31))
        _record(engine, "two", "datasets", "running", at + timedelta(minutes=40))
        _record(engine, "not-configured", "datasets", "success", at)

        found = read_accounts(engine, ["one", "two", "three"], ("datasets", "models"))
    finally:
        engine.dispose()
    one, two, three = found
    assert [a.name for a in found] == ["one", "two", "three"]
    datasets, models = one.resources
    assert (datasets.resource, datasets.last and datasets.last.status) == ("datasets", "failed")
    # The last success is older than the 20 runs shown, and still found.
    assert datasets.last_success == at + timedelta(seconds=2)
    assert first_success not in [r.id for r in one.recent]
    assert models.last is not None and models.last.id == models_ok
    assert models.last_success == at + timedelta(minutes=30, seconds=2)
    assert len(one.recent) == 20
    ids = [r.id for r in one.recent]
    assert ids == sorted(ids, reverse=True)
    assert [r.resource for r in one.recent[:2]] == ["model_details", "models"]
    assert one.recent[2].error and one.recent[2].error.startswith("HTTP 500 (datasets")
    assert two.resources[0].last is not None and two.resources[0].last.status == "running"
    assert two.resources[0].last_success is None and two.resources[1].last is None
    assert three.recent == () and all(r.last is None for r in three.resources)


def _settings(**schedule: Any) -> Settings:
    settings = Settings()
    return replace(
        settings,
        schedule=replace(settings.schedule, **schedule),
        sync=replace(settings.sync, resources=("datasets",)),
    )


def test_the_page_reads_the_database_at_each_request(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'status.db'}")
    try:
        migrate(engine)
        page = StatusPage(
            engine, _settings(max_age_seconds=3600), "every 30s", lambda: NOW + timedelta(seconds=5)
        )
        status, text = page(NOW)
        assert status == 200
        assert "<title>ideogram-sync: WAITING</title>" in text and "No runs yet." in text
        _record(engine, "default", "datasets", "success", NOW - timedelta(minutes=1))
        status, text = page(NOW)
        assert status == 200
        assert "<title>ideogram-sync: OK</title>" in text and "No runs yet." not in text
    finally:
        engine.dispose()


def test_an_unreadable_database_is_a_clear_503_without_a_traceback(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'missing' / 'nowhere.db'}")
    status, text = StatusPage(engine, Settings(), "every 30s", lambda: None)(NOW)
    assert status == 503
    assert "<title>ideogram-sync: DATABASE UNREACHABLE</title>" in text
    assert "The database could not be read." in text
    assert "unable to open database file" in text
    assert "Traceback" not in text and 'File "' not in text


def test_a_database_password_never_reaches_the_page() -> None:
    pytest.importorskip("psycopg")
    engine = make_engine("postgresql://sync:pw-status-91@127.0.0.1:1/nowhere")
    try:
        status, text = StatusPage(engine, Settings(), "every 30s", lambda: None)(NOW)
    finally:
        engine.dispose()
    assert status == 503 and UNREACHABLE in text
    assert "pw-status-91" not in text
    assert "Traceback" not in text


# -- the HTTP server -----------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[Any]:
    started = []

    def start(page: Any) -> str:
        httpd = serve("127.0.0.1", 0, Metrics(["default"]), lambda: (True, "ok"), page)
        started.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


def test_get_slash_serves_the_page_beside_metrics_and_healthz(server: Any) -> None:
    base = server(lambda: (200, "<!DOCTYPE html>\n<p>é</p>\n"))
    with urllib.request.urlopen(base + "/?x=1", timeout=5) as response:  # noqa: S310
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert response.read().decode() == "<!DOCTYPE html>\n<p>é</p>\n"
    assert get(base + "/healthz") == (200, "ok\n")
    status, metrics = get(base + "/metrics")
    assert status == 200 and "ideogram_sync_runs_total" in metrics
    assert get(base + "/nothing") == (404, "not found: try /, /metrics or /healthz\n")


def test_a_failing_page_is_a_500_without_a_traceback(server: Any) -> None:
    def broken() -> tuple[int, str]:
        raise RuntimeError("secret internals")

    base = server(broken)
    status, text = get(base + "/")
    assert status == 500
    assert "status page failed" in text and "RuntimeError" in text
    assert "secret internals" not in text and "Traceback" not in text
    assert get(base + "/healthz") == (200, "ok\n")


def test_without_a_page_slash_is_not_found(server: Any) -> None:
    base = server(None)
    assert get(base + "/") == (404, "not found: try /metrics or /healthz\n")


# -- against a running daemon ------------------------------------------------------


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[str]:
    yield from database_url_for("sqlite", tmp_path)


def _daemon_config(port: int, interval: str = "1s") -> str:
    return (
        f'[api]\nmax_retries = 0\n[schedule]\ninterval = "{interval}"\nmax_age = "1h"\n'
        f'[metrics]\nport = {port}\nhost = "127.0.0.1"\n'
    )


def _latest_datasets_run(url: str) -> dict[str, Any] | None:
    runs = [r for r in rows(url, "sync_runs", order="id") if r["resource"] == "datasets"]
    return runs[-1] if runs else None


FAILURE = Reply(500, {"detail": '<script>alert("pwned")</script> upstream down'})


def test_the_daemon_serves_the_page_after_a_success_and_a_failure(
    fake_api: FakeApi, sqlite_db: str, tmp_path: Path
) -> None:
    fake_api.datasets = [dataset("a"), dataset("b")]
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    proc = daemon(fake_api, sqlite_db, tmp_path, _daemon_config(port))
    try:
        until(lambda: successes(sqlite_db), proc=proc)
        # The newest datasets run may be running (a 1 s interval): wait for a page that shows
        # a finished success, not just the word in the history.
        good = '<tr data-resource="datasets"><td>datasets</td><td class="status good">'
        status, page = until(lambda: (answer := get(base)) and good in answer[1] and answer)
        assert status == 200
        assert "<title>ideogram-sync: OK</title>" in page
        assert "Next slot" in page and "every 1s" in page
        first = Tags(page)
        assert "script" not in first.tags

        fake_api.push(*[FAILURE] * 500)
        until(lambda: (r := _latest_datasets_run(sqlite_db)) and r["status"] == "failed")
        status, page = until(lambda: (a := get(base)) and "FAILING</title>" in a[1] and a)
        assert status == 200  # a failure is shown, not an HTTP error: /healthz is the probe
        assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt; upstream down" in page
        assert "<script" not in page
        text = " ".join(" ".join(Tags(page).text).split())
        assert "datasets failed" in text and "HTTP 500" in text
        # The last success is still there, and fresh.
        assert " ago) fresh" in text
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert "Traceback" not in err


def require_chromium() -> None:
    """Skip without Chromium, its driver or Selenium, except on CI, where they must be there
    (as promtool in tests/test_deploy.py)."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (the test extra)")
    if not missing:
        return
    why = (
        f"{', '.join(missing)} missing: the browser test needs Debian's chromium and "
        "chromium-driver packages (.ci/run installs them)"
    )
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"on CI: {why}")
    pytest.skip(why)


def test_chromium_shows_the_page_after_a_success_and_after_a_failure(
    fake_api: FakeApi, sqlite_db: str, tmp_path: Path
) -> None:
    require_chromium()
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    fake_api.datasets = [dataset("a"), dataset("b"), dataset("c")]
    fake_api.models = [model("m1", dataset_id="a")]
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    proc = daemon(fake_api, sqlite_db, tmp_path, _daemon_config(port, "2s"), env=ALL_RESOURCES)

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # never Selenium Manager, never a download
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1500,1400",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    # The page is read with JavaScript off: it needs none.
    options.add_experimental_option(
        "prefs", {"profile.managed_default_content_settings.javascript": 2}
    )
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "driver.log"))
    browser = None
    try:
        until(lambda: successes(sqlite_db), proc=proc)
        browser = webdriver.Chrome(service=service, options=options)
        browser.set_page_load_timeout(30)

        def status_of(resource: str) -> str:
            row = browser.find_element(By.CSS_SELECTOR, f'tr[data-resource="{resource}"]')
            return str(row.find_element(By.CSS_SELECTOR, "td.status").text)

        def datasets_row(status: str) -> Any:
            """The datasets row once it shows `status` and the models run of the same slot
            has finished too (it starts as the datasets run ends)."""
            browser.get(base)
            row = browser.find_element(By.CSS_SELECTOR, 'tr[data-resource="datasets"]')
            history = browser.find_element(By.CSS_SELECTOR, "table.history").text
            wanted = status_of("datasets") == status and status_of("models") == "success"
            return row if wanted and "models success" in history else None

        def shoot(name: str, stable: Path) -> None:
            path = tmp_path / name
            assert browser.save_screenshot(str(path)), "no screenshot"
            assert path.stat().st_size > 10_000
            shutil.copyfile(path, stable)

        # After a success.
        row = until(lambda: datasets_row("success"), proc=proc)
        cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
        assert cells[0] == "datasets"
        assert cells[1] == "success"
        assert cells[4] == "3", cells  # seen
        assert cells[11] == "fresh"
        assert browser.title == "ideogram-sync: OK"
        assert browser.find_element(By.ID, "overall").text == "OK"
        assert "UTC (in " in browser.find_element(By.ID, "next-slot").text
        history = browser.find_element(By.CSS_SELECTOR, "table.history").text
        assert "datasets success" in history and "models success" in history
        # Seen 3: inserted by the first run, unchanged by later ones.
        assert (cells[5], cells[7]) in (("3", "0"), ("0", "3")), cells
        shoot("status-success.png", SCREENSHOT_SUCCESS)

        # After a failure: the API answers 500 (with markup in its detail) from now on.
        fake_api.push(*[FAILURE] * 1000)
        row = until(lambda: datasets_row("failed"), proc=proc)
        error = row.find_element(By.CSS_SELECTOR, "td.error").text
        assert "HTTP 500" in error
        # Shown as text: escaped, not run.
        assert '<script>alert("pwned")</script> upstream down' in error
        with pytest.raises(NoAlertPresentException):
            _ = browser.switch_to.alert.text
        cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
        assert cells[11] == "fresh"  # the last success is still within max_age
        assert cells[10].endswith(" ago)")
        assert browser.title == "ideogram-sync: FAILING"
        assert browser.find_element(By.ID, "overall").text == "FAILING"
        assert status_of("models") == "success"
        history = browser.find_element(By.CSS_SELECTOR, "table.history").text
        assert "datasets failed" in history
        shoot("status-failure.png", SCREENSHOT)
    finally:
        if browser is not None:
            browser.quit()
        code, err = stop(proc)
    assert code == 0, err
    assert os.path.getsize(SCREENSHOT) > 10_000


def test_the_browser_test_is_required_on_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import tests.test_status_page as me

    monkeypatch.setattr(me, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-chromium missing"):
        me.require_chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"on CI: .*chromium-driver"):
        me.require_chromium()
