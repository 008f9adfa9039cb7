"""Configuration: file lookup, precedence, validation, the API key, config.example.toml."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from sync.config import load_settings
from sync.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_defaults_without_any_file() -> None:
    s = load_settings(env={})
    assert s.database.url == "sqlite:///ideogram_sync.db"
    assert s.api.base_url == "https://api.ideogram.ai"
    assert s.api.api_key_env == "IDEOGRAM_API_KEY"
    assert (s.api.timeout_seconds, s.api.max_retries) == (30.0, 5)
    assert s.sync.on_invalid_record == "skip"
    assert [a.name for a in s.accounts] == ["default"] and s.source is None
    assert s.accounts[0].api == s.api


def test_example_config_loads_and_matches_defaults() -> None:
    example = load_settings(str(ROOT / "config.example.toml"), env={})
    assert example.database == load_settings(env={}).database
    assert example.api == load_settings(env={}).api
    assert example.sync == load_settings(env={}).sync


def test_example_config_documents_every_key() -> None:
    from sync.config import _SCHEMA

    text = (ROOT / "config.example.toml").read_text()
    for section, keys in _SCHEMA.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"{key} =" in text, f"{section}.{key} is not in config.example.toml"


def test_schema_must_be_an_identifier(tmp_path: Path) -> None:
    ok = write(tmp_path / "ok.toml", '[database]\nschema = "ideogram_2"\n')
    assert load_settings(ok, env={}).database.schema == "ideogram_2"
    bad = write(tmp_path / "bad.toml", '[database]\nschema = "x; DROP TABLE y"\n')
    with pytest.raises(ConfigError, match=r"database\.schema must be a plain lowercase identifier"):
        load_settings(bad, env={})


def test_precedence_file_env_cli(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "c.toml",
        '[database]\nurl = "sqlite:///file.db"\n[api]\nbase_url = "http://file:1/"\n',
    )
    assert load_settings(cfg, env={}).database.url == "sqlite:///file.db"
    assert load_settings(cfg, env={}).api.base_url == "http://file:1"
    env = {
        "IDEOGRAM_SYNC_DATABASE_URL": "sqlite:///env.db",
        "IDEOGRAM_API_BASE_URL": "http://env:2",
    }
    assert load_settings(cfg, env=env).database.url == "sqlite:///env.db"
    assert load_settings(cfg, env=env).api.base_url == "http://env:2"
    cli = load_settings(cfg, env=env, database_url="sqlite:///cli.db")
    assert cli.database.url == "sqlite:///cli.db"


def test_file_lookup_order(tmp_path: Path) -> None:
    write(tmp_path / "ideogram-sync.toml", '[database]\nurl = "sqlite:///local.db"\n')
    other = write(tmp_path / "other.toml", '[database]\nurl = "sqlite:///other.db"\n')
    assert load_settings(env={}).database.url == "sqlite:///local.db"
    assert load_settings(env={"IDEOGRAM_SYNC_CONFIG": other}).database.url == "sqlite:///other.db"
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_settings("missing.toml", env={})
    with pytest.raises(ConfigError, match="IDEOGRAM_SYNC_CONFIG"):
        load_settings(env={"IDEOGRAM_SYNC_CONFIG": "nope.toml"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[api]\ntimeout = 3\n", "unknown key api.timeout"),
        ("[apii]\n", r"unknown section \[apii\]"),
        ("[api]\nmax_retries = '3'\n", "api.max_retries must be int, not str"),
        ("[api]\nmax_retries = true\n", "api.max_retries must be int, not bool"),
        ("[api]\ntimeout_seconds = 0\n", "api.timeout_seconds must be greater than 0"),
        ("[api]\nmax_retries = -1\n", "api.max_retries must be 0 or more"),
        ("[api]\nbase_url = 'ftp://x'\n", "api.base_url must start with http"),
        ("[sync]\non_invalid_record = 'ignore'\n", "sync.on_invalid_record must be"),
        ("[database]\nurl = 5\n", "database.url must be str"),
        ("[database]\nurl = 'not a url'\n", "not a valid SQLAlchemy URL"),
        ("database = 1\n", r"\[database\] must be a table"),
        ("[api\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    cfg = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg, env={})


def test_api_key_from_env_file_or_config(tmp_path: Path) -> None:
    assert load_settings(env={"IDEOGRAM_API_KEY": "sk-env-1234"}).api.key() == "sk-env-1234"
    named = write(tmp_path / "n.toml", '[api]\napi_key_env = "MY_KEY"\n')
    assert load_settings(named, env={"MY_KEY": "sk-named-99"}).api.key() == "sk-named-99"

    key_file = tmp_path / "key"
    key_file.write_text("sk-file-5678\n")
    cfg = write(tmp_path / "f.toml", f'[api]\napi_key_file = "{key_file}"\n')
    assert load_settings(cfg, env={}).api.key() == "sk-file-5678"
    # The environment wins over the file.
    assert load_settings(cfg, env={"IDEOGRAM_API_KEY": "sk-env-1234"}).api.key() == "sk-env-1234"

    with pytest.raises(ConfigError, match="set the environment variable IDEOGRAM_API_KEY"):
        load_settings(env={}).api.key()
    missing = write(tmp_path / "m.toml", '[api]\napi_key_file = "/nonexistent/key"\n')
    with pytest.raises(ConfigError, match="cannot read the API key file"):
        load_settings(missing, env={}).api.key()


def test_key_in_readable_file_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text('[api]\napi_key = "sk-in-file-42"\n')
    os.chmod(cfg, 0o644)
    with caplog.at_level(logging.WARNING):
        s = load_settings(str(cfg), env={})
    assert s.api.key() == "sk-in-file-42"
    assert "other users can read it" in caplog.text
    assert "sk-in-file-42" not in caplog.text
    assert "sk-in-file-42" not in repr(s)

    caplog.clear()
    os.chmod(cfg, 0o600)
    with caplog.at_level(logging.WARNING):
        load_settings(str(cfg), env={})
    assert "other users" not in caplog.text
