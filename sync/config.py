"""Settings from a TOML file, the environment and the command line, as frozen dataclasses."""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
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
ENV_RESOURCES = "IDEOGRAM_SYNC_RESOURCES"
INVALID_RECORD_POLICIES = ("skip", "fail")
# What a run of an account syncs, in this order: each a run of its own (sync_runs.resource).
RESOURCES = ("datasets", "dataset_details", "models", "model_details")


def resource_suffix(resource: str) -> str:
    """What follows an account's name in messages about a resource's run: nothing for the
    datasets (whose lines keep the words they always had, for log searches and alerts),
    " (models)" for the others."""
    return "" if resource == "datasets" else f" ({resource})"


# An unquoted PostgreSQL identifier: safe to put in search_path and CREATE SCHEMA.
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True)
class DatabaseSettings:
    """Where the tables live."""

    url: str = "sqlite:///ideogram_sync.db"
    # PostgreSQL only: the schema that holds every table, view and alembic_version.
    schema: str | None = None
    # Nothing waits on the database without bound: connecting, a lock another session
    # holds (a BI tool's open transaction, another run's write), one statement.
    connect_timeout_seconds: float = 15.0
    lock_timeout_seconds: float = 60.0
    statement_timeout_seconds: float = 600.0


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
    # Accounts synced at once by `run` and by each daemon slot.
    max_workers: int = 4
    # A run, from its lease to its commit (fetch and database work), ends by then.
    deadline_seconds: float = 900.0
    # What each account's run syncs (a subset of RESOURCES, run in RESOURCES' order).
    resources: tuple[str, ...] = RESOURCES
    # A dataset's or owned model's details are fetched again once older than this.
    details_max_age_seconds: float = 86400.0
    # Detail requests in flight at once, per account.
    details_concurrency: int = 4


@dataclass(frozen=True)
class Account:
    """One Ideogram account (API key) to sync, with its own API settings."""

    name: str = DEFAULT_ACCOUNT
    api: ApiSettings = field(default_factory=ApiSettings)


@dataclass(frozen=True)
class ScheduleSettings:
    """When the daemon syncs: a cron expression or an interval aligned to the epoch."""

    cron: str | None = None
    interval_seconds: float | None = None
    timezone: str = "UTC"
    jitter_seconds: float = 0.0
    run_on_start: bool = True
    # /healthz and `status --max-age` call an account stale past this.
    max_age_seconds: float | None = None
    shutdown_grace_seconds: float = 30.0


@dataclass(frozen=True)
class MetricsSettings:
    """Where the daemon serves /metrics and /healthz (port None: off)."""

    port: int | None = None
    # All interfaces by default: Kubernetes probes and Prometheus come from outside the pod.
    host: str = "0.0.0.0"  # noqa: S104


NOTICE_EVENTS = ("failure", "recovery", "stale")
NOTICE_FORMATS = ("json", "slack")


@dataclass(frozen=True)
class NotifySettings:
    """Where failure, recovery and stale notices go (a webhook), and which ones."""

    # The webhook's address: here, in the variable named by webhook_url_env, or in a file.
    # Such an address usually holds a token: it is masked like the API key.
    webhook_url: str | None = field(default=None, repr=False)
    webhook_url_env: str = "IDEOGRAM_SYNC_WEBHOOK_URL"
    webhook_url_file: Path | None = None
    format: str = "json"
    on: tuple[str, ...] = NOTICE_EVENTS
    # The daemon's stale notice: an account's resource without a success for this long.
    stale_after_seconds: float | None = None
    timeout_seconds: float = 5.0
    max_retries: int = 2

    def url(self) -> str | None:
        """The webhook's address, or None when notices are off."""
        if self.webhook_url:
            return self.webhook_url
        if self.webhook_url_file is None:
            return None
        try:
            value = self.webhook_url_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the webhook file {self.webhook_url_file}: {exc.strerror}; "
                "fix [notify] webhook_url_file or its permissions"
            ) from None
        redact.register(value)
        return value or None


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to know, resolved once."""

    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    sync: SyncOptions = field(default_factory=SyncOptions)
    accounts: tuple[Account, ...] = (Account(),)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    notify: NotifySettings = field(default_factory=NotifySettings)
    source: Path | None = None

    def account(self, name: str) -> Account:
        """The configured account called `name`; ConfigError if there is none."""
        for account in self.accounts:
            if account.name == name:
                return account
        known = ", ".join(a.name for a in self.accounts)
        raise ConfigError(f"no account named {name!r} is configured (known: {known})")


# Kinds of value a key takes; "duration" is seconds as a number or a string such as "30m".
_SCHEMA: dict[str, dict[str, str]] = {
    "database": {
        "url": "str",
        "schema": "str",
        "connect_timeout_seconds": "duration",
        "lock_timeout_seconds": "duration",
        "statement_timeout_seconds": "duration",
    },
    "api": {
        "base_url": "str",
        "api_key_env": "str",
        "api_key_file": "str",
        "api_key": "str",
        "timeout_seconds": "duration",
        "max_retries": "int",
        "backoff_factor": "number",
        "max_response_bytes": "int",
        "deadline_seconds": "duration",
    },
    "sync": {
        "on_invalid_record": "str",
        "lock_ttl_seconds": "duration",
        "max_delete_fraction": "number",
        "max_workers": "int",
        "deadline_seconds": "duration",
        "resources": "list",
        "details_max_age": "duration",
        "details_concurrency": "int",
    },
    "schedule": {
        "cron": "str",
        "interval": "duration",
        "timezone": "str",
        "jitter_seconds": "duration",
        "run_on_start": "bool",
        "max_age": "duration",
        "shutdown_grace_seconds": "duration",
    },
    "metrics": {"port": "int", "host": "str"},
    "notify": {
        "webhook_url": "str",
        "webhook_url_env": "str",
        "webhook_url_file": "str",
        "format": "str",
        "on": "list",
        "stale_after": "duration",
        "timeout_seconds": "duration",
        "max_retries": "int",
    },
}
_ACCOUNT_KEYS = {"name": "str", "api_key_env": "str", "api_key_file": "str", "base_url": "str"}
_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any, label: str = "duration") -> float:
    """Seconds from a number or a string such as "90s", "30m", "2h", "1d" or "1h30m"."""
    if isinstance(value, bool):
        raise ConfigError(f"{label} must be a duration like 30s, 10m, 2h or 1d, not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        elif text and _DURATION_PART.sub("", text) == "":
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
        else:
            raise ConfigError(f"{label} must be a duration like 30s, 10m, 2h or 1d, not {value!r}")
    else:
        raise ConfigError(f"{label} must be a duration like 30s, 10m, 2h or 1d")
    if seconds < 0:
        raise ConfigError(f"{label} must not be negative")
    return seconds


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
    import tomllib  # only where there is a file: most commands under cron have none

    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _check_types(data: Mapping[str, Any], origin: str) -> None:
    for section, values in data.items():
        if section == "accounts":
            _check_accounts(values, origin)
            continue
        if section not in _SCHEMA:
            known = ", ".join([*(f"[{s}]" for s in _SCHEMA), "[[accounts]]"])
            raise ConfigError(f"{origin}: unknown section [{section}] (known: {known})")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{section}] must be a table")
        for key, value in values.items():
            kind = _SCHEMA[section].get(key)
            if kind is None:
                known = ", ".join(_SCHEMA[section])
                raise ConfigError(f"{origin}: unknown key {section}.{key} (known: {known})")
            _check_kind(value, kind, f"{origin}: {section}.{key}")


def _check_kind(value: Any, kind: str, label: str) -> None:
    if kind == "duration":
        parse_duration(value, label)
        return
    if kind == "list":
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{label} must be a list of strings")
        return
    accepted: tuple[type, ...] = {
        "str": (str,),
        "int": (int,),
        "number": (int, float),
        "bool": (bool,),
    }[kind]
    # TOML booleans are Python ints too; a number key must not take `true`.
    if (isinstance(value, bool) and kind != "bool") or not isinstance(value, accepted):
        wanted = " or ".join(t.__name__ for t in accepted)
        raise ConfigError(f"{label} must be {wanted}, not {type(value).__name__}")


def _check_accounts(values: Any, origin: str) -> None:
    if not isinstance(values, list) or not all(isinstance(v, dict) for v in values):
        raise ConfigError(f"{origin}: accounts must be written as [[accounts]] tables")
    seen: set[str] = set()
    for index, account in enumerate(values, 1):
        where = f"{origin}: [[accounts]] #{index}"
        for key, value in account.items():
            kind = _ACCOUNT_KEYS.get(key)
            if kind is None:
                known = ", ".join(_ACCOUNT_KEYS)
                raise ConfigError(f"{where}: unknown key accounts.{key} (known: {known})")
            _check_kind(value, kind, f"{where}: accounts.{key}")
        name = account.get("name")
        if not isinstance(name, str) or not _ACCOUNT_NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: accounts.name is required: 1-64 letters, digits, '.', '_' or '-'"
            )
        if name in seen:
            raise ConfigError(f"{where}: account name {name!r} is used twice")
        seen.add(name)
        if not account.get("api_key_env") and not account.get("api_key_file"):
            raise ConfigError(f"{where}: account {name!r} needs api_key_env or api_key_file")


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
    if s.sync.deadline_seconds <= 0:
        raise ConfigError(f"{origin}: sync.deadline_seconds must be greater than 0")
    for name in ("connect_timeout_seconds", "lock_timeout_seconds", "statement_timeout_seconds"):
        if getattr(s.database, name) < 1:
            raise ConfigError(f"{origin}: database.{name} must be at least 1 second")
    if s.database.lock_timeout_seconds > s.database.statement_timeout_seconds:
        raise ConfigError(
            f"{origin}: database.lock_timeout_seconds must not exceed "
            "database.statement_timeout_seconds (a lock wait is part of a statement)"
        )
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
    if s.sync.max_workers < 1:
        raise ConfigError(f"{origin}: sync.max_workers must be 1 or more")
    unknown = [name for name in s.sync.resources if name not in RESOURCES]
    if not s.sync.resources:
        raise ConfigError(f"{origin}: sync.resources must name at least one of {RESOURCES}")
    if unknown:
        raise ConfigError(
            f"{origin}: sync.resources: unknown {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(RESOURCES)})"
        )
    if not 1 <= s.sync.details_concurrency <= 64:
        raise ConfigError(f"{origin}: sync.details_concurrency must be between 1 and 64")
    _check_schedule(s.schedule, origin)
    _check_notify(s.notify, origin)
    if s.metrics.port is not None and not 0 < s.metrics.port < 65536:
        raise ConfigError(f"{origin}: metrics.port must be between 1 and 65535")
    if s.database.schema is not None and not _IDENTIFIER.fullmatch(s.database.schema):
        raise ConfigError(
            f"{origin}: database.schema must be a plain lowercase identifier (a-z, 0-9, _; "
            f"at most 63), not {s.database.schema!r}"
        )


def _check_notify(notify: NotifySettings, origin: str) -> None:
    if notify.webhook_url and notify.webhook_url_file:
        raise ConfigError(f"{origin}: set notify.webhook_url or notify.webhook_url_file, not both")
    if notify.webhook_url and not notify.webhook_url.startswith(("http://", "https://")):
        raise ConfigError(f"{origin}: notify.webhook_url must start with http:// or https://")
    if notify.format not in NOTICE_FORMATS:
        raise ConfigError(
            f'{origin}: notify.format must be "json" or "slack", not {notify.format!r}'
        )
    unknown = [event for event in notify.on if event not in NOTICE_EVENTS]
    if unknown:
        raise ConfigError(
            f"{origin}: notify.on: unknown {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(NOTICE_EVENTS)})"
        )
    if notify.timeout_seconds <= 0 or notify.timeout_seconds > 60:
        raise ConfigError(f"{origin}: notify.timeout_seconds must be more than 0 and at most 60")
    if not 0 <= notify.max_retries <= 5:
        raise ConfigError(f"{origin}: notify.max_retries must be between 0 and 5")


def _check_schedule(schedule: ScheduleSettings, origin: str) -> None:
    if schedule.cron and schedule.interval_seconds is not None:
        raise ConfigError(f"{origin}: set schedule.cron or schedule.interval, not both")
    if schedule.interval_seconds is not None and schedule.interval_seconds < 1:
        raise ConfigError(f"{origin}: schedule.interval must be at least 1s")
    try:
        from zoneinfo import ZoneInfo

        ZoneInfo(schedule.timezone)
    except (ValueError, LookupError):
        raise ConfigError(
            f"{origin}: schedule.timezone {schedule.timezone!r} is not a known time zone"
        ) from None


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
    schedule = dict(data.get("schedule", {}))
    metrics = dict(data.get("metrics", {}))
    notify = dict(data.get("notify", {}))
    if "api_key" in api and "api_key_file" in api:
        raise ConfigError(f"{origin}: set api.api_key or api.api_key_file, not both")
    if "api_key" in api and path is not None:
        _warn_if_readable(path)

    if env.get(ENV_DATABASE_URL):
        db["url"] = env[ENV_DATABASE_URL]
    if env.get(ENV_BASE_URL):
        api["base_url"] = env[ENV_BASE_URL]
    if env.get(ENV_RESOURCES):
        sync_opts["resources"] = [n.strip() for n in env[ENV_RESOURCES].split(",") if n.strip()]
        unknown = [name for name in sync_opts["resources"] if name not in RESOURCES]
        if unknown:  # named here: the file did not say it
            raise ConfigError(
                f"{ENV_RESOURCES}: unknown {', '.join(map(repr, unknown))} "
                f"(known: {', '.join(RESOURCES)})"
            )
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
        (api, "deadline_seconds"),
        (sync_opts, "lock_ttl_seconds"),
        (sync_opts, "deadline_seconds"),
        (db, "connect_timeout_seconds"),
        (db, "lock_timeout_seconds"),
        (db, "statement_timeout_seconds"),
    ):
        if name in section:
            section[name] = parse_duration(section[name])
    if "details_max_age" in sync_opts:
        sync_opts["details_max_age_seconds"] = parse_duration(sync_opts.pop("details_max_age"))
    if "resources" in sync_opts:
        # Run in the one order that works (details after their listing), whatever the file's.
        chosen = set(sync_opts["resources"])
        sync_opts["resources"] = tuple(name for name in RESOURCES if name in chosen) + tuple(
            name for name in sync_opts["resources"] if name not in RESOURCES
        )
    for section, name in ((api, "backoff_factor"), (sync_opts, "max_delete_fraction")):
        if name in section:
            section[name] = float(section[name])
    if "interval" in schedule:
        schedule["interval_seconds"] = parse_duration(schedule.pop("interval"))
    if "max_age" in schedule:
        schedule["max_age_seconds"] = parse_duration(schedule.pop("max_age"))
    for name in ("jitter_seconds", "shutdown_grace_seconds"):
        if name in schedule:
            schedule[name] = parse_duration(schedule[name])

    url_env = notify.get("webhook_url_env", NotifySettings.webhook_url_env)
    if env.get(url_env):
        notify["webhook_url"] = env[url_env]
    if notify.get("webhook_url_file"):
        notify["webhook_url_file"] = Path(notify["webhook_url_file"]).expanduser()
    if "stale_after" in notify:
        notify["stale_after_seconds"] = parse_duration(notify.pop("stale_after"))
    if "timeout_seconds" in notify:
        notify["timeout_seconds"] = parse_duration(notify["timeout_seconds"])
    if "on" in notify:
        notify["on"] = tuple(notify["on"])
    base_api = ApiSettings(**api)
    settings = Settings(
        database=DatabaseSettings(**db),
        api=base_api,
        sync=SyncOptions(**sync_opts),
        accounts=_accounts(data.get("accounts"), base_api, env),
        schedule=ScheduleSettings(**schedule),
        metrics=MetricsSettings(**metrics),
        notify=NotifySettings(**notify),
        source=path,
    )
    _check_values(settings, origin)
    for account in settings.accounts:
        redact.register(account.api.api_key)
    redact.register(settings.notify.webhook_url)
    password = _url_password(settings.database.url)
    if password:
        # The URL may carry the password percent-encoded; mask both spellings.
        redact.register(password)
        redact.register(quote_plus(password))
        redact.register(quote(password, safe=""))
    return settings


def _accounts(
    tables: list[dict[str, Any]] | None, base: ApiSettings, env: Mapping[str, str]
) -> tuple[Account, ...]:
    if not tables:
        return (Account(DEFAULT_ACCOUNT, base),)
    accounts = []
    for table in tables:
        key_env = table.get("api_key_env", "")
        key_file = table.get("api_key_file")
        base_url = table.get("base_url", base.base_url).rstrip("/")
        if env.get(ENV_BASE_URL):
            # The environment points every account at one server (a local fake, a proxy).
            base_url = env[ENV_BASE_URL].rstrip("/")
        api = replace(
            base,
            base_url=base_url,
            api_key_env=key_env or base.api_key_env,
            api_key_file=Path(key_file).expanduser() if key_file else None,
            api_key=env.get(key_env) if key_env else None,
        )
        accounts.append(Account(table["name"], api))
    return tuple(accounts)


# A URL whose user part (if any) has no `:password`, as SQLAlchemy's URL pattern reads it.
_NO_PASSWORD = re.compile(r"[\w+]+://(?:[^:/@]*@)?[^@]*$")


def _url_password(url: str) -> str | None:
    if _NO_PASSWORD.match(url):
        # Nothing to mask, and no need to import SQLAlchemy yet: `run` starts its download
        # before the database code loads (a malformed URL still fails in make_engine).
        return None
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
