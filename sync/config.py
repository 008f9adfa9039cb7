"""Settings from a TOML file, the environment and the command line, as frozen dataclasses."""

from __future__ import annotations

import logging
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

from sync import redact
from sync.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CONFIG_FILE = "ideogram-sync.toml"
DEFAULT_ACCOUNT = "default"
ENV_CONFIG = "IDEOGRAM_SYNC_CONFIG"
ENV_DATABASE_URL = "IDEOGRAM_SYNC_DATABASE_URL"
ENV_BASE_URL = "IDEOGRAM_API_BASE_URL"
INVALID_RECORD_POLICIES = ("skip", "fail")
# An unquoted PostgreSQL identifier: safe to put in search_path and CREATE SCHEMA.
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True)
class DatabaseSettings:
    """Where the tables live."""

    url: str = "sqlite:///ideogram_sync.db"
    # PostgreSQL only: the schema that holds every table, view and alembic_version.
    schema: str | None = None


@dataclass(frozen=True)
class ApiSettings:
    """How to reach the Ideogram API."""

    base_url: str = "https://api.ideogram.ai"
    api_key_env: str = "IDEOGRAM_API_KEY"
    api_key_file: Path | None = None
    # Already taken from the environment (or the file's `api_key`); never printed.
    api_key: str | None = field(default=None, repr=False)
    timeout_seconds: float = 30.0
    max_retries: int = 5
    backoff_factor: float = 1.0
    max_response_bytes: int = 256 * 1024 * 1024
    # The whole fetch, retries and a trickling body included, ends by then.
    deadline_seconds: float = 300.0

    def key(self) -> str:
        """Return the API key, from the environment, `api_key_file` or the file's `api_key`."""
        if self.api_key:
            return self.api_key
        if self.api_key_file is not None:
            try:
                value = self.api_key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the API key file {self.api_key_file}: {exc.strerror}; "
                    "fix [api] api_key_file or its permissions"
                ) from None
            if not value:
                raise ConfigError(f"the API key file {self.api_key_file} is empty")
            redact.register(value)
            return value
        raise ConfigError(
            f"no API key: set the environment variable {self.api_key_env} "
            "(or [api] api_key_file in the config), or sync a saved body with `run --input FILE`"
        )


@dataclass(frozen=True)
class SyncOptions:
    """How a sync treats what it receives."""

    on_invalid_record: str = "skip"
    lock_ttl_seconds: float = 600.0
    # None: off. Else the largest share of active datasets one run may soft-delete.
    max_delete_fraction: float | None = None


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to know, resolved once."""

    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    sync: SyncOptions = field(default_factory=SyncOptions)
    account: str = DEFAULT_ACCOUNT
    source: Path | None = None


_NUMBER = (int, float)
# section -> key -> accepted Python types of the TOML value
_SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "database": {"url": (str,), "schema": (str,)},
    "api": {
        "base_url": (str,),
        "api_key_env": (str,),
        "api_key_file": (str,),
        "api_key": (str,),
        "timeout_seconds": _NUMBER,
        "max_retries": (int,),
        "backoff_factor": _NUMBER,
        "max_response_bytes": (int,),
        "deadline_seconds": _NUMBER,
    },
    "sync": {
        "on_invalid_record": (str,),
        "lock_ttl_seconds": _NUMBER,
        "max_delete_fraction": _NUMBER,
    },
}


def find_config_file(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    """Pick the config file: --config, else $IDEOGRAM_SYNC_CONFIG, else ./ideogram-sync.toml."""
    if explicit:
        return _must_exist(Path(explicit), "--config")
    if env.get(ENV_CONFIG):
        return _must_exist(Path(env[ENV_CONFIG]), ENV_CONFIG)
    local = Path(DEFAULT_CONFIG_FILE)
    return local if local.is_file() else None


def _must_exist(path: Path, origin: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"config file {path} (from {origin}) does not exist or is not a file")
    return path


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file into a dict, turning every failure into a ConfigError."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _check_types(data: Mapping[str, Any], origin: str) -> None:
    for section, values in data.items():
        if section not in _SCHEMA:
            known = ", ".join(f"[{s}]" for s in _SCHEMA)
            raise ConfigError(f"{origin}: unknown section [{section}] (known: {known})")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{section}] must be a table")
        for key, value in values.items():
            accepted = _SCHEMA[section].get(key)
            if accepted is None:
                known = ", ".join(_SCHEMA[section])
                raise ConfigError(f"{origin}: unknown key {section}.{key} (known: {known})")
            # TOML booleans are Python ints too; a number key must not take `true`.
            if isinstance(value, bool) or not isinstance(value, accepted):
                wanted = " or ".join(t.__name__ for t in accepted)
                raise ConfigError(
                    f"{origin}: {section}.{key} must be {wanted}, not {type(value).__name__}"
                )


def _check_values(s: Settings, origin: str) -> None:
    api = s.api
    if not api.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{origin}: api.base_url must start with http:// or https://")
    if api.timeout_seconds <= 0:
        raise ConfigError(f"{origin}: api.timeout_seconds must be greater than 0")
    if api.max_retries < 0:
        raise ConfigError(f"{origin}: api.max_retries must be 0 or more")
    if api.backoff_factor < 0:
        raise ConfigError(f"{origin}: api.backoff_factor must be 0 or more")
    if api.max_response_bytes <= 0:
        raise ConfigError(f"{origin}: api.max_response_bytes must be greater than 0")
    if api.deadline_seconds <= 0:
        raise ConfigError(f"{origin}: api.deadline_seconds must be greater than 0")
    if s.sync.lock_ttl_seconds < 5:
        raise ConfigError(f"{origin}: sync.lock_ttl_seconds must be at least 5")
    fraction = s.sync.max_delete_fraction
    if fraction is not None and not 0 <= fraction <= 1:
        raise ConfigError(f"{origin}: sync.max_delete_fraction must be between 0 and 1")
    if not api.api_key_env:
        raise ConfigError(f"{origin}: api.api_key_env must not be empty")
    if s.sync.on_invalid_record not in INVALID_RECORD_POLICIES:
        raise ConfigError(
            f'{origin}: sync.on_invalid_record must be "skip" or "fail", '
            f"not {s.sync.on_invalid_record!r}"
        )
    if not s.database.url:
        raise ConfigError(f"{origin}: database.url must not be empty")
    if s.database.schema is not None and not _IDENTIFIER.fullmatch(s.database.schema):
        raise ConfigError(
            f"{origin}: database.schema must be a plain lowercase identifier (a-z, 0-9, _; "
            f"at most 63), not {s.database.schema!r}"
        )


def _warn_if_readable(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning(
            "config file %s holds api.api_key and other users can read it; "
            "chmod 600 it, or move the key to the environment or api_key_file",
            path,
        )


def load_settings(
    config_path: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    database_url: str | None = None,
) -> Settings:
    """Build Settings from defaults < the TOML file < the environment < the command line."""
    env = os.environ if env is None else env
    path = find_config_file(config_path, env)
    data = read_toml(path) if path else {}
    origin = str(path) if path else "defaults"
    _check_types(data, origin)

    db = dict(data.get("database", {}))
    api = dict(data.get("api", {}))
    sync_opts = dict(data.get("sync", {}))
    if "api_key" in api and path is not None:
        _warn_if_readable(path)

    if env.get(ENV_DATABASE_URL):
        db["url"] = env[ENV_DATABASE_URL]
    if env.get(ENV_BASE_URL):
        api["base_url"] = env[ENV_BASE_URL]
    if database_url:
        db["url"] = database_url

    key_env = api.get("api_key_env", ApiSettings.api_key_env)
    if env.get(key_env):
        api["api_key"] = env[key_env]
    if api.get("api_key_file"):
        api["api_key_file"] = Path(api["api_key_file"]).expanduser()
    if "base_url" in api:
        api["base_url"] = api["base_url"].rstrip("/")
    for section, name in (
        (api, "timeout_seconds"),
        (api, "backoff_factor"),
        (api, "deadline_seconds"),
        (sync_opts, "lock_ttl_seconds"),
        (sync_opts, "max_delete_fraction"),
    ):
        if name in section:
            section[name] = float(section[name])

    settings = Settings(
        database=DatabaseSettings(**db),
        api=ApiSettings(**api),
        sync=SyncOptions(**sync_opts),
        source=path,
    )
    _check_values(settings, origin)
    redact.register(settings.api.api_key)
    password = _url_password(settings.database.url)
    if password:
        # The URL may carry the password percent-encoded; mask both spellings.
        redact.register(password)
        redact.register(quote_plus(password))
        redact.register(quote(password, safe=""))
    return settings


def _url_password(url: str) -> str | None:
    # SQLAlchemy's own parser, so we see the password exactly as the engine will.
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).password
    except ArgumentError:
        # The URL itself is not echoed: it may hold a password we could not find.
        raise ConfigError(
            "database.url is not a valid SQLAlchemy URL; expected e.g. "
            "sqlite:///ideogram_sync.db or postgresql://user:password@host/dbname"
        ) from None
