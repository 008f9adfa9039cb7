"""The tool's exceptions; each carries the process exit code it maps to, and no secret."""

from __future__ import annotations

from sync.redact import redact

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_STALE = 4
EXIT_LOCKED = 5
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class SyncError(Exception):
    """Base for every failure the tool reports as one line; exit code 1 unless overridden."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str) -> None:
        # Messages quote servers and drivers, which may echo a secret back.
        super().__init__(redact(message))


class ConfigError(SyncError):
    """The configuration or the command line is wrong (exit 2)."""

    exit_code = EXIT_USAGE


class MigrationRequired(SyncError):
    """The database schema is behind and migrating was not allowed (exit 2)."""

    exit_code = EXIT_USAGE


class NoDatabase(SyncError):
    """A reading command found no synced database (exit 2); nothing was created."""

    exit_code = EXIT_USAGE


class ApiError(SyncError):
    """The API could not be reached or answered with an error (exit 1)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of the answer, if there was one


class AuthError(ApiError):
    """The API rejected the key with 401 or 403 (exit 3)."""

    exit_code = EXIT_AUTH


class ResponseError(SyncError):
    """The API answered 200 with a body we cannot use (exit 1)."""


class InvalidRecordsError(SyncError):
    """Records were invalid and `on_invalid_record = "fail"` (exit 1)."""


class DatabaseError(SyncError):
    """The database could not be reached or refused a statement (exit 1)."""


class LockHeld(SyncError):
    """Another live run holds this account's lease lock (exit 5)."""

    exit_code = EXIT_LOCKED


class LockLost(SyncError):
    """The lease expired and another run took it over before this one committed (exit 1)."""


class DeadlineExceeded(SyncError):
    """The run did not finish within sync.deadline_seconds; it was stopped (exit 1)."""


class MassDeleteRefused(SyncError):
    """The listing would soft-delete more than sync.max_delete_fraction (exit 1)."""


class Terminated(BaseException):
    """SIGTERM arrived; a BaseException so that no `except Exception` swallows it (exit 143)."""


class Cancelled(BaseException):
    """The run was asked to stop (daemon shutdown, or SIGTERM while accounts sync in threads)."""
