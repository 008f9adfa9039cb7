"""The image's HEALTHCHECK: is the daemon in this container healthy?

Docker runs it inside the container every --interval; exit 0 is healthy, 1 unhealthy. It
asks the daemon's own /healthz (200 while the scheduler runs and every account synced
within [schedule] max_age), and judges nothing it cannot ask:

- the container's main process (PID 1, or the child of an init such as `docker run
  --init`) is not ideogram-sync, or runs a command other than `daemon` (`run` is a
  one-shot: its exit code is its health): healthy, nothing to check;
- the daemon has no [metrics] port, so it serves no /healthz: healthy, nothing to check;
- otherwise /healthz decides: 200 is healthy; any other answer, a refused connection (the
  daemon opens its port only once the database is reachable and migrated) or no answer
  within TIMEOUT_SECONDS is unhealthy.

The daemon's settings are read as the daemon read them: its command line, its environment
and its working directory, from /proc. Only the standard library and the installed `sync`
package are used (the slim image has no curl).
"""

from __future__ import annotations

import http.client
import logging
import os
import sys
from pathlib import Path

# Below the HEALTHCHECK's --timeout, so that a hung answer is reported as such instead of
# the check being killed without a word.
TIMEOUT_SECONDS = 5
PROGRAM = "ideogram-sync"


def cmdline(pid: int) -> list[str]:
    """A process's argv, or [] when it is gone or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]]


def children(pid: int) -> list[int]:
    """The PIDs whose parent is pid (scanning /proc: .../task/N/children is not always there)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def tool_args(argv: list[str]) -> list[str] | None:
    """The arguments given to ideogram-sync, if argv is ideogram-sync itself, else None.

    The console script runs as `python /usr/local/bin/ideogram-sync ARGS` (its shebang),
    and `python -m sync ARGS` is the same program. An init that merely names it in its own
    arguments (`docker-init -- ideogram-sync daemon`) is not it.
    """
    if not argv:
        return None
    if os.path.basename(argv[0]) == PROGRAM:
        return argv[1:]
    if not os.path.basename(argv[0]).startswith("python"):
        return None
    rest = argv[1:]
    if rest and os.path.basename(rest[0]) == PROGRAM:
        return rest[1:]
    # Interpreter options may come before -m.
    while rest and rest[0].startswith("-") and rest[0] != "-m":
        rest = rest[1:]
    if rest[:2] == ["-m", "sync"]:
        return rest[2:]
    return None


def main_process() -> tuple[int, list[str]] | None:
    """The container's ideogram-sync process and its arguments: PID 1 or a child of it."""
    for pid in (1, *children(1)):
        args = tool_args(cmdline(pid))
        if args is not None:
            return pid, args
    return None


def process_environment(pid: int) -> dict[str, str]:
    """The environment the process started with (its config path and database URL)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}


def check() -> tuple[bool, str]:
    """(healthy, why)."""
    found = main_process()
    if found is None:
        return True, f"healthy: the container does not run {PROGRAM}; nothing to check"
    pid, args = found
    from sync.cli import build_parser

    try:
        parsed = build_parser().parse_args(args)
    except SystemExit:
        # A command line the tool refuses ends the process at once: not a daemon to probe.
        return True, f"healthy: `{' '.join(args)}` is not a daemon; nothing to check"
    if parsed.command != "daemon":
        return True, f"healthy: the container runs `{parsed.command}`, not the daemon"

    from sync.config import load_settings

    try:
        # A relative config path or SQLite URL is relative to the daemon's directory.
        os.chdir(f"/proc/{pid}/cwd")
        settings = load_settings(
            parsed.config, env=process_environment(pid), database_url=parsed.database_url
        )
    except Exception as exc:  # the daemon runs, but this check cannot tell its port
        return False, f"unhealthy: cannot read the daemon's settings: {exc}"
    port = settings.metrics.port
    if port is None:
        return True, "healthy: [metrics] port is not set, so there is no /healthz to ask"

    # The daemon listens on [metrics] host; from inside the container, loopback reaches
    # a server bound to all interfaces.
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(  # noqa: S104
        settings.metrics.host, settings.metrics.host
    )
    url = f"http://{host}:{port}/healthz" if ":" not in host else f"http://[{host}]:{port}/healthz"
    connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT_SECONDS)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        body = response.read(1000).decode(errors="replace").strip()
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, garbled
        return False, f"unhealthy: no answer from {url}: {exc}"
    finally:
        connection.close()
    if response.status == 200:
        return True, f"healthy: /healthz answered 200 {body}"
    return False, f"unhealthy: /healthz answered {response.status} {body}"


def main() -> int:
    """Print why, and exit 0 (healthy) or 1 (unhealthy), as Docker expects."""
    # Warnings of the settings loader would only clutter `docker inspect`; the answer
    # line says what matters.
    logging.disable(logging.WARNING)
    healthy, why = check()
    print(why)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
