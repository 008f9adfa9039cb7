"""The tool's exceptions; each carries the process exit code it maps to."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3


class SyncError(Exception):
    """Base for every failure the tool reports as one line; exit code 1 unless overridden."""

    exit_code = EXIT_FAILED


class ConfigError(SyncError):
    """The configuration or the command line is wrong (exit 2)."""

    exit_code = EXIT_USAGE


class MigrationRequired(SyncError):
    """The database schema is behind and migrating was not allowed (exit 2)."""

    exit_code = EXIT_USAGE


class ApiError(SyncError):
    """The API could not be reached or answered with an error (exit 1)."""


class AuthError(ApiError):
    """The API rejected the key with 401 or 403 (exit 3)."""

    exit_code = EXIT_AUTH


class ResponseError(SyncError):
    """The API answered 200 with a body we cannot use (exit 1)."""


class InvalidRecordsError(SyncError):
    """Records were invalid and `on_invalid_record = "fail"` (exit 1)."""


class DatabaseError(SyncError):
    """The database could not be reached or refused a statement (exit 1)."""
