"""Several accounts: one run row, lock and soft-delete scope each; worst exit code; shared ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sync.cli import worst_exit_code
from sync.config import load_settings
from sync.errors import ConfigError
from tests.conftest import rows
from tests.fakeapi import FakeApi, dataset

ACCOUNTS = """
[sync]
max_workers = 2

[[accounts]]
name = "alpha"
api_key_env = "KEY_ALPHA"

[[accounts]]
name = "beta"
api_key_env = "KEY_BETA"

[[accounts]]
name = "gamma"
api_key_env = "KEY_GAMMA"
"""
KEYS = {"KEY_ALPHA": "sk-alpha-0001", "KEY_BETA": "sk-beta-0002", "KEY_GAMMA": "sk-gamma-0003"}


@pytest.fixture
def accounts_config(tmp_path: Path) -> str:
    path = tmp_path / "accounts.toml"
    path.write_text(ACCOUNTS)
    return str(path)


def by_account(url: str) -> dict[str, set[str]]:
    result: dict[str, set[str]] = {}
    for row in rows(url):
        if row["deleted_at"] is None:
            result.setdefault(row["account"], set()).add(row["dataset_id"])
    return result


def last_runs(url: str) -> dict[str, dict[str, Any]]:
    return {r["account"]: r for r in rows(url, "sync_runs", order="id")}


def listings() -> dict[str, list[dict[str, Any]]]:
    """Per key: alpha lists a1 and a2, beta lists b1, gamma lists nothing."""
    return {
        "sk-alpha-0001": [dataset("a1"), dataset("a2")],
        "sk-beta-0002": [dataset("b1")],
        "sk-gamma-0003": [],
    }


def test_every_account_is_synced_with_its_own_key_and_run(
    cli, fake_api: FakeApi, db_url: str, accounts_config: str
) -> None:
    fake_api.by_key = listings()
    result = cli("--config", accounts_config, "--database-url", db_url, "run", env=KEYS)
    assert result.code == 0, result.err
    assert by_account(db_url) == {"alpha": {"a1", "a2"}, "beta": {"b1"}}
    runs = last_runs(db_url)
    assert set(runs) == {"alpha", "beta", "gamma"}
    assert all(r["status"] == "success" for r in runs.values())
    assert (runs["alpha"]["inserted"], runs["beta"]["inserted"], runs["gamma"]["inserted"]) == (
        2,
        1,
        0,
    )
    assert {r.headers["Api-Key"] for r in fake_api.requests} == set(KEYS.values())


def test_soft_deletes_stay_within_the_account(
    cli, fake_api: FakeApi, db_url: str, accounts_config: str
) -> None:
    fake_api.by_key = {
        "sk-alpha-0001": [dataset("a1")],
        "sk-beta-0002": [dataset("b1")],
        "sk-gamma-0003": [],
    }
    assert cli("--config", accounts_config, "--database-url", db_url, "run", env=KEYS).code == 0
    # alpha's listing empties: only alpha's rows go; beta's row is untouched.
    fake_api.by_key["sk-alpha-0001"] = []
    assert cli("--config", accounts_config, "--database-url", db_url, "run", env=KEYS).code == 0
    assert by_account(db_url) == {"beta": {"b1"}}
    assert last_runs(db_url)["alpha"]["deleted"] == 1
    assert last_runs(db_url)["beta"]["deleted"] == 0


def test_one_failure_spares_the_others_and_the_worst_code_wins(
    cli, fake_api: FakeApi, db_url: str, accounts_config: str
) -> None:
    fake_api.by_key = {"sk-alpha-0001": [dataset("a1")], "sk-gamma-0003": [dataset("g1")]}
    fake_api.rejected_keys = {"sk-beta-0002"}
    result = cli("--config", accounts_config, "--database-url", db_url, "run", env=KEYS)
    assert result.code == 3
    runs = last_runs(db_url)
    assert runs["beta"]["status"] == "failed" and "HTTP 401" in runs["beta"]["error"]
    assert runs["alpha"]["status"] == runs["gamma"]["status"] == "success"
    assert "run failed for account beta" in result.err


def test_account_option_selects(cli, fake_api: FakeApi, db_url: str, accounts_config: str) -> None:
    fake_api.by_key = {"sk-alpha-0001": [dataset("a1")], "sk-beta-0002": [dataset("b1")]}
    result = cli(
        "--config", accounts_config, "--database-url", db_url, "run", "--account", "beta", env=KEYS
    )
    assert result.code == 0
    assert set(last_runs(db_url)) == {"beta"}
    unknown = cli(
        "--config", accounts_config, "--database-url", db_url, "run", "--account", "delta", env=KEYS
    )
    assert unknown.code == 2 and "no account named 'delta'" in unknown.err


def test_input_needs_a_single_account(cli, db_url: str, accounts_config: str) -> None:
    example = str(Path(__file__).resolve().parents[1] / "examples" / "datasets.json")
    both = cli(
        "--config", accounts_config, "--database-url", db_url, "run", "--input", example, env=KEYS
    )
    assert both.code == 2 and "--account" in both.err
    one = cli(
        "--config", accounts_config, "--database-url", db_url,
        "run", "--input", example, "--account", "gamma", env=KEYS,
    )  # fmt: skip
    assert one.code == 0
    assert by_account(db_url) == {
        "gamma": {d["dataset_id"] for d in json.loads(Path(example).read_text())["datasets"]}
    }


def test_a_dataset_listed_by_two_accounts(
    cli, fake_api: FakeApi, db_url: str, accounts_config: str
) -> None:
    """Documented in docs/accounts.md: the account that has it keeps it; no ping-pong."""

    def sync(*accounts: str) -> int:
        chosen = [arg for name in accounts for arg in ("--account", name)]
        return int(
            cli(
                "--config", accounts_config, "--database-url", db_url, "run", *chosen, env=KEYS
            ).code
        )

    shared = dataset("shared", "v1")
    fake_api.by_key = {"sk-alpha-0001": [shared], "sk-beta-0002": [], "sk-gamma-0003": []}
    assert sync("alpha") == 0
    fake_api.by_key["sk-beta-0002"] = [shared]
    for _ in range(2):
        assert sync() == 0
    (row,) = rows(db_url)
    assert row["account"] == "alpha"
    assert len(rows(db_url, "dataset_history")) == 1  # beta's runs changed nothing
    assert last_runs(db_url)["beta"]["unchanged"] == 1

    # beta sees a rename first: the content follows, the row stays alpha's.
    fake_api.by_key["sk-beta-0002"] = [dataset("shared", "v2")]
    assert sync("beta") == 0
    (row,) = rows(db_url)
    assert (row["account"], row["name"]) == ("alpha", "v2")

    # alpha loses it: alpha's run soft-deletes it; beta's next run restores it as beta's.
    fake_api.by_key["sk-alpha-0001"] = []
    assert sync("alpha") == 0
    assert rows(db_url)[0]["deleted_at"] is not None
    assert sync("beta") == 0
    (row,) = rows(db_url)
    assert (row["account"], row["deleted_at"]) == ("beta", None)
    changes = [
        (h["change_type"], h["account"]) for h in rows(db_url, "dataset_history", order="id")
    ]
    assert changes == [
        ("insert", "alpha"),
        ("update", "alpha"),
        ("delete", "alpha"),
        ("restore", "beta"),
    ]


def test_worst_exit_code() -> None:
    assert worst_exit_code([0, 5, 1]) == 1
    assert worst_exit_code([0, 1, 3]) == 3
    assert worst_exit_code([3, 2, 0]) == 2
    assert worst_exit_code([0, 5]) == 5
    assert worst_exit_code([0, 0]) == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[accounts]]\napi_key_env = 'X'\n", "accounts.name is required"),
        ("[[accounts]]\nname = 'a b'\napi_key_env = 'X'\n", "accounts.name is required"),
        ("[[accounts]]\nname = 'a'\n", "needs api_key_env or api_key_file"),
        (
            "[[accounts]]\nname = 'a'\napi_key_env = 'X'\n[[accounts]]\nname = 'a'\napi_key_env = 'Y'\n",
            "used twice",
        ),
        ("[[accounts]]\nname = 'a'\napi_key_env = 'X'\ntoken = 1\n", "unknown key accounts.token"),
        ("accounts = 3\n", r"\[\[accounts\]\] tables"),
    ],
)
def test_bad_accounts_config(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(str(path), env={})


def test_account_settings(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    key_file = tmp_path / "k"
    key_file.write_text("sk-file-key-9")
    path.write_text(
        '[api]\ntimeout_seconds = "2m"\n'
        '[[accounts]]\nname = "one"\napi_key_env = "ONE"\nbase_url = "http://one:1/"\n'
        f'[[accounts]]\nname = "two"\napi_key_file = "{key_file}"\n'
    )
    settings = load_settings(str(path), env={"ONE": "sk-one-1"})
    one, two = settings.accounts
    assert (one.name, one.api.base_url, one.api.key(), one.api.timeout_seconds) == (
        "one",
        "http://one:1",
        "sk-one-1",
        120.0,
    )
    assert (two.name, two.api.base_url, two.api.key()) == (
        "two",
        "https://api.ideogram.ai",
        "sk-file-key-9",
    )
    # The environment points every account at one server.
    moved = load_settings(str(path), env={"ONE": "k", "IDEOGRAM_API_BASE_URL": "http://fake:2"})
    assert {a.api.base_url for a in moved.accounts} == {"http://fake:2"}


def test_a_run_loads_only_its_own_accounts_rows(
    cli, fake_api: FakeApi, db_url: str, accounts_config: str
) -> None:
    """Another account's rows cost a run nothing up front: only its own are loaded."""
    from sync import store
    from sync.db import make_engine
    from sync.records import DATASETS

    fake_api.by_key = listings()
    args = ("--config", accounts_config, "--database-url", db_url, "run")
    assert cli(*args, "--account", "alpha", env=KEYS).code == 0
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            stored, deleted, shared = store._load(conn, DATASETS, "alpha")
            assert (set(stored), deleted, shared) == ({"a1", "a2"}, set(), False)
        assert cli(*args, env=KEYS).code == 0
        with engine.connect() as conn:
            stored, deleted, shared = store._load(conn, DATASETS, "beta")
            assert (set(stored), deleted, shared) == ({"b1"}, set(), True)
            stored, deleted, shared = store._load(conn, DATASETS, "gamma")
            assert (stored, deleted, shared) == ({}, set(), True)
    finally:
        engine.dispose()


def test_another_accounts_datasets_across_batches(
    cli, fake_api: FakeApi, db_url: str, accounts_config: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ids of another account's rows are decided per written batch, repeats included."""
    from sync import store

    # Two rows a batch: every lookup of another account's ids happens mid-listing.
    monkeypatch.setattr(store, "FLUSH_ROWS", 2)
    alpha = [dataset("s1", "v1"), dataset("s2", "v1"), dataset("s3", "v1"), dataset("s4", "v1")]
    fake_api.by_key = {"sk-alpha-0001": alpha, "sk-beta-0002": [], "sk-gamma-0003": []}
    args = ("--config", accounts_config, "--database-url", db_url, "run")
    assert cli(*args, "--account", "alpha", env=KEYS).code == 0
    fake_api.by_key["sk-alpha-0001"] = [alpha[0], alpha[1], alpha[3]]  # alpha drops s3
    assert cli(*args, "--account", "alpha", env=KEYS).code == 0
    fake_api.by_key["sk-beta-0002"] = [
        dataset("s1", "v1"),  # alpha's, unchanged ...
        dataset("s2", "v2"),  # alpha's, changed: stays alpha's
        dataset("n1", "v1"),  # nobody's: beta's
        dataset("s3", "v1"),  # deleted by alpha: restored as beta's
        dataset("s4", "v1"),  # alpha's, unchanged
        dataset("s1", "v3"),  # ... then listed again, changed: the last one counts
    ]
    result = cli(*args, "--account", "beta", env=KEYS)
    assert result.code == 0, result.output

    stored = {r["dataset_id"]: (r["account"], r["name"], r["deleted_at"]) for r in rows(db_url)}
    assert stored == {
        "s1": ("alpha", "v3", None),
        "s2": ("alpha", "v2", None),
        "s3": ("beta", "v1", None),
        "s4": ("alpha", "v1", None),
        "n1": ("beta", "v1", None),
    }
    run = last_runs(db_url)["beta"]
    counts = {k: run[k] for k in ("datasets_seen", "inserted", "updated", "unchanged", "deleted")}
    assert counts == {"datasets_seen": 6, "inserted": 1, "updated": 3, "unchanged": 1, "deleted": 0}
    beta_versions = sorted(
        (h["dataset_id"], h["change_type"], h["account"], h["valid_to"] is None)
        for h in rows(db_url, "dataset_history")
        if h["sync_run_id"] == run["id"]
    )
    assert beta_versions == [
        ("n1", "insert", "beta", True),
        ("s1", "update", "alpha", True),
        ("s2", "update", "alpha", True),
        ("s3", "restore", "beta", True),
    ]
    # Every dataset has exactly one open version.
    open_versions = [
        h["dataset_id"] for h in rows(db_url, "dataset_history") if h["valid_to"] is None
    ]
    assert sorted(open_versions) == ["n1", "s1", "s2", "s3", "s4"]
