"""`python -m sync` runs the CLI."""

from sync.cli import main

raise SystemExit(main())
