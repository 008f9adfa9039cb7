"""Alembic migrations; shipped inside the wheel as `sync.migrations`."""
