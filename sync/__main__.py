"""`python -m sync` runs the CLI."""

from sync.cli import entry

raise SystemExit(entry())
