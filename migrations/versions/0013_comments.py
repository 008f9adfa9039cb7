"""Table and column comments: what each table, view and column holds, in the database itself

PostgreSQL gets a comment on every table, view and column (COMMENT ON); MariaDB/MySQL on
every table and table column (views cannot carry comments there). SQLite has no comments:
nothing changes there. BI catalogs (Metabase, Superset, DBeaver, ...) show them.

The descriptions are frozen in this file (COMMENTS): a migration must do the same thing
whenever it runs, so it reads nothing from the package that a later version could change.
integrations/dbt/sources.yml carries the same texts, and tests/test_dbt.py checks that the two
agree and that they name every table, view and column the migrations make. A later migration
that adds a column or rewords a description carries its own complete COMMENTS, which the
test then reads instead.

MariaDB/MySQL can set a column's comment only by restating the whole column
(ALTER TABLE ... MODIFY COLUMN). Each column is restated as information_schema has it (type,
character set and collation, nullability, default, AUTO_INCREMENT, MariaDB's JSON check), so
nothing but the comment changes; all of a table's columns go in one ALTER TABLE, which
MariaDB 10.6+/MySQL 8 apply whole or not at all. A table with a JSON column is copied on
MariaDB (its CHECK is validated again): that takes as long as copying the table.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

import logging
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")

# --- The descriptions -------------------------------------------------------------------
# Plain ASCII text, without backslashes, that dbt's Jinja leaves alone (no "{{", "{%", "{#");
# at most 1024 characters a column and 2048 a table (MariaDB's limits).

_DATASET_CONTENT = {
    "account": "The account whose listing last wrote the row (`default` unless configured otherwise).",
    "name": "The dataset's name (may be the empty string).",
    "user_id": "Id of the Ideogram user who owns the dataset.",
    "creation_time": "When the dataset was created in Ideogram, in UTC.",
    "cover_asset_type": "`asset_type` of the dataset's cover (for example `RESPONSE`, `UPLOAD`); NULL when it has no cover.",
    "cover_asset_id": "`asset_id` of the dataset's cover; NULL when it has no cover.",
    "extra": "Fields of the API's dataset object that the tool does not model, as a JSON object; NULL when there are none.",
}

_DATASETS = {
    "dataset_id": "Ideogram's id of the dataset; primary key; case-sensitive.",
    **_DATASET_CONTENT,
    "first_seen_at": "When a sync first stored the dataset (a restore keeps it).",
    "updated_at": "When a sync last changed the row: its content or account, a soft delete, a restore.",
    "deleted_at": "When a sync found the dataset gone from the listing (soft delete); NULL while it exists.",
    "last_sync_run_id": "`sync_runs.id` of the run that last changed the row (not the last run that saw the dataset).",
    "content_hash": "Internal: the version of the parse rules and a digest of the record as last read, so that a re-run skips an unchanged record. Not for dashboards.",
    "details_synced_at": "When a `dataset_details` run last fetched the dataset's details (GET /datasets/{id}) and stored them or found them unchanged; NULL until they were first fetched.",
    "details_hash": "Internal: as `content_hash`, for the details body last stored. Not for dashboards.",
    "details_extra": "Fields of the details body other than `dataset`, `file_count`, `files` and `custom_model_ids`, as a JSON object; NULL when there are none, and until the details were fetched.",
    "file_count": "The number of files, as the details give it; 0 for a dataset without files; NULL until the details were fetched.",
    "total_file_bytes": "The sum of the sizes of the dataset's files whose size is known (`dataset_files.file_size_bytes`); NULL when no file size is known (no files, only files without a size, or details not fetched yet), never 0 for unknown.",
    "custom_model_ids": "The ids of the custom models made from the dataset, as its details list them: a JSON array of strings ([] for none); NULL until the details were fetched. It may name models that `models` does not have.",
}

_MODEL_CONTENT = {
    "account": "The account whose listing last wrote the row.",
    "name": "The model's name.",
    "status": "The model's status as the API gives it, for example `TRAINING`, `COMPLETED`, `ERRORED`; NULL when the API gives none.",
    "dataset_id": "The dataset the model was trained on; NULL when the API gives none. Not a foreign key: it may name a dataset that `datasets` does not have.",
    "custom_model_uri": "The model's URI for generation requests; NULL when the API gives none.",
    "is_owned": "True for the account's own models, false for models shared with it.",
    "is_available_for_generation": "Whether the model can be used to generate now.",
    "creation_time": "When the model was created in Ideogram, in UTC.",
    "last_update_time": "When the model last changed in Ideogram, in UTC; NULL when the API gives none.",
    "extra": "Fields of the API's model object that the tool does not model (`training_runs` aside), as a JSON object; NULL when there are none.",
}

_MODELS = {
    "model_id": "Ideogram's id of the model; primary key; case-sensitive.",
    **_MODEL_CONTENT,
    "first_seen_at": "When a sync first stored the model (a restore keeps it).",
    "updated_at": "When a `models` run last changed the row: its content or account, a soft delete, a restore.",
    "deleted_at": "When a `models` run found the model gone from the listing (soft delete); NULL while it exists.",
    "last_sync_run_id": "`sync_runs.id` of the `models` run that last changed the row.",
    "content_hash": "Internal, as in `datasets`. Not for dashboards.",
    "details_synced_at": "When a `model_details` run last fetched the model's details (GET /models/{id}); NULL until then. The details of a model that is not owned are never fetched.",
    "details_hash": "Internal, as in `datasets`. Not for dashboards.",
    "details_extra": "Fields of the details body other than `model`, as a JSON object; NULL when there are none.",
}

_VERSION = {
    "valid_from": "When this version became current.",
    "valid_to": "When the next version replaced this one; NULL while it is current. A version is current for valid_from <= t < valid_to.",
    "change_type": "What made this version: `insert`, `update`, `delete` or `restore`.",
    "sync_run_id": "`sync_runs.id` of the run that wrote this version.",
}

_RUN = {
    "started_at": "When the run started.",
    "finished_at": "When the run ended; NULL while it is `running`.",
    "status": "`running`, `success`, `failed` or `abandoned` (the process died before recording an outcome).",
    "datasets_seen": "Records in the listing, rejected ones included (a details run: details requested).",
    "inserted": "Datasets (models) stored for the first time (a details run: rows whose details were stored for the first time).",
    "updated": "Datasets (models) changed, restores included (a details run: rows whose stored details changed).",
    "unchanged": "Datasets (models) found exactly as stored (a details run: details bodies as last stored).",
    "deleted": "Datasets (models) soft-deleted (a details run: always 0).",
    "rejected": "Records that failed validation and were skipped (a details run: details bodies that could not be stored).",
    "error": "Why the run failed, at most 2000 characters, secrets masked; NULL on success.",
}

_RESOURCE = "What the run synced: `datasets`, `dataset_details`, `models` or `model_details`."


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]


_DAILY_SUM = "Sum of `sync_runs.{}` over those runs (its meaning depends on the resource)."

# The columns of the two views of what exists now, in their order.
_DATASETS_CURRENT = (
    "dataset_id", "account", "name", "user_id", "creation_time", "cover_asset_type",
    "cover_asset_id", "extra", "first_seen_at", "updated_at", "last_sync_run_id", "file_count",
    "total_file_bytes", "details_synced_at",
)  # fmt: skip
_MODELS_CURRENT = (
    "model_id", "account", "name", "status", "dataset_id", "custom_model_uri", "is_owned",
    "is_available_for_generation", "creation_time", "last_update_time", "extra",
    "first_seen_at", "updated_at", "last_sync_run_id", "details_synced_at",
)  # fmt: skip

# Each table and view: (its comment, {column: comment}), the columns in their order.
COMMENTS: dict[str, tuple[str, dict[str, str]]] = {
    "datasets": (
        "Every dataset ever seen, one row each, soft-deleted ones included (deleted_at set); "
        "with its file count and size once its details were fetched. Written by ideogram-sync.",
        _DATASETS,
    ),
    "dataset_history": (
        "Every version of every dataset (a type-2 history): the dataset's columns as they "
        "were from valid_from until valid_to. Written by ideogram-sync.",
        {
            "id": "Row id; increases in the order versions were written.",
            "dataset_id": "The dataset (`datasets.dataset_id`).",
            **{c: f"In this version, {_lower(text)}" for c, text in _DATASET_CONTENT.items()},
            "account": "The account whose listing wrote this version.",
            **_VERSION,
        },
    ),
    "dataset_files": (
        "The files of each dataset, as the last details fetched for it (GET /datasets/{id}) "
        "listed them. Written by ideogram-sync.",
        {
            "dataset_id": "The dataset (`datasets.dataset_id`); with `position` the primary key.",
            "position": "The file's place in the details' list of files, from 0; with `dataset_id` the primary key.",
            "account": "The account whose details run wrote the row.",
            "file_name": "The file's name; NULL when the API gives none.",
            "file_size_bytes": "The file's size in bytes; NULL when the API gives none (unknown, not empty).",
            "extra": "The file object's other fields, as a JSON object; NULL when there are none.",
            "sync_run_id": "`sync_runs.id` of the `dataset_details` run that wrote the row.",
        },
    ),
    "models": (
        "Every custom model ever seen (GET /models: the account's own and those shared with "
        "it), one row each, soft-deleted ones included (deleted_at set). Written by "
        "ideogram-sync.",
        _MODELS,
    ),
    "model_history": (
        "Every version of every model (a type-2 history): the model's columns as they were "
        "from valid_from until valid_to. Written by ideogram-sync.",
        {
            "id": "Row id; increases in the order versions were written.",
            "model_id": "The model (`models.model_id`).",
            **{c: f"In this version, {_lower(text)}" for c, text in _MODEL_CONTENT.items()},
            "account": "The account whose listing wrote this version.",
            **_VERSION,
        },
    ),
    "model_training_runs": (
        "The training runs of each owned model, as the last details fetched for it "
        "(GET /models/{id}) listed them. Written by ideogram-sync.",
        {
            "training_run_id": "Ideogram's id of the training run; primary key.",
            "model_id": "The model (`models.model_id`).",
            "account": "The account whose details run wrote the row.",
            "status": "The training run's status as the API gives it (`TRAINING`, `COMPLETED`, `ERRORED`, ...); NULL when it gives none.",
            "training_steps": "Training parameter, as the API gives it; NULL when it gives none.",
            "lora_rank": "Training parameter, as the API gives it; NULL when it gives none.",
            "num_chips": "Training parameter, as the API gives it; NULL when it gives none.",
            "ema": "Training parameter, as the API gives it; NULL when it gives none.",
            "learning_rate": "Training parameter, as the API gives it; NULL when it gives none.",
            "creation_time": "When the training run was created, in UTC.",
            "last_update_time": "When the training run last changed, in UTC; NULL when the API gives none.",
            "extra": "The training run object's other fields, as a JSON object; NULL when there are none.",
            "sync_run_id": "`sync_runs.id` of the `model_details` run that wrote the row.",
        },
    ),
    "sync_runs": (
        "One row per run of one resource of one account: when, outcome, counts, error. "
        "Written by ideogram-sync.",
        {
            "id": "Run id; increases with every run.",
            "account": "The account the run synced.",
            **_RUN,
            "scheduled_for": "The schedule slot a scheduled (daemon) run was started for; NULL for runs started otherwise.",
            "listing_digest": "Internal: on `success` of a `datasets` or `models` run, a digest (hex) of the listing body it read, so that the next run can skip an unchanged listing; NULL otherwise.",
            "resource": f"{_RESOURCE} Runs recorded before migration 0011 are `datasets`.",
        },
    ),
    "sync_notices": (
        "Internal: one row per notice to the [notify] webhook, its key recorded before it is "
        "sent, so that processes sharing the database send each notice once. Not for "
        "reporting.",
        {
            "key": "The notice's key: failure:ID or recovery:ID (ID the run's id), or stale:ACCOUNT:RESOURCE:ID (ID the last successful run's id); primary key.",
            "event": "`failure`, `recovery` or `stale`.",
            "account": "The account the notice is about.",
            "resource": "The resource the notice is about.",
            "run_id": "`sync_runs.id` of the run the notice is about (for `stale`, the last successful run).",
            "created_at": "When the notice was recorded, just before it was sent.",
            "delivered": "Whether the webhook accepted the notice.",
        },
    ),
    "sync_locks": (
        "Internal: the lease that keeps two runs of one account from overlapping. "
        "Not for reporting.",
        {
            "account": "The account whose run holds the lease; primary key.",
            "owner": "Who holds it, as host:pid:token.",
            "acquired_at": "When the lease was taken.",
            "expires_at": "When the lease expires unless renewed; an expired lease may be taken over.",
        },
    ),
    "datasets_current": (
        "The datasets that exist now: the rows of datasets with deleted_at NULL.",
        {c: _DATASETS[c] for c in _DATASETS_CURRENT},
    ),
    "models_current": (
        "The models that exist now: the rows of models with deleted_at NULL.",
        {c: _MODELS[c] for c in _MODELS_CURRENT},
    ),
    "dataset_models": (
        "Each dataset that exists now with each model that exists now and was trained on "
        "it (matched by dataset_id), and that model's latest training run.",
        {
            "dataset_id": "The dataset.",
            "account": "The dataset's `account`.",
            "dataset_name": "The dataset's `name`.",
            "model_id": "The model.",
            "model_name": "The model's `name`.",
            "model_status": "The model's `status` (may be NULL).",
            "is_owned": "The model's `is_owned`.",
            "is_available_for_generation": "The model's `is_available_for_generation`.",
            "model_creation_time": "The model's `creation_time`.",
            "model_last_update_time": "The model's `last_update_time` (may be NULL).",
            "latest_training_run_id": "The model's training run with the latest `creation_time` (of two created at the same moment, the greater id); NULL when the model has none: not owned, details not fetched yet, or no training run listed.",
            "latest_training_status": "That training run's `status`; NULL when there is no such run, or the API gave none.",
            "latest_training_created_at": "That training run's `creation_time`; NULL when there is no such run.",
            "latest_training_updated_at": "That training run's `last_update_time`; NULL when there is no such run or the API gave none.",
        },
    ),
    "sync_runs_latest": (
        "The newest run of each account and resource, whatever its status, with how long "
        "ago it ended and when that resource of the account last succeeded.",
        {
            "account": "The account.",
            "run_id": "`sync_runs.id` of the newest run of the account and resource.",
            **{c: f"That run's `{c}`: {_lower(text)}" for c, text in _RUN.items()},
            "age_seconds": "Whole seconds from that run's `finished_at` (its `started_at` while it is running) to now.",
            "last_success_at": "`finished_at` of the most recent successful run of the account and resource; NULL if none.",
            "seconds_since_success": "Whole seconds from `last_success_at` to now; NULL if the resource of the account never succeeded. The number to alert on.",
            "resource": _RESOURCE,
        },
    ),
    "sync_daily": (
        "Runs and changes per UTC day (of started_at), account and resource; days without "
        "runs have no row.",
        {
            "day": "The UTC day the runs started.",
            "account": "The account.",
            "runs": "Runs started that day (a run still `running` counts here only).",
            "successes": "Runs with status `success`.",
            "failures": "Runs with status `failed` or `abandoned`.",
            **{c: _DAILY_SUM.format(c) for c in ("inserted", "updated", "deleted", "rejected")},
            "resource": "The resource of the runs: `datasets`, `dataset_details`, `models` or `model_details`.",
        },
    ),
}

VIEWS = frozenset(
    {"datasets_current", "models_current", "dataset_models", "sync_runs_latest", "sync_daily"}
)


# --- Applying them ----------------------------------------------------------------------


def upgrade() -> None:
    _apply(dict(COMMENTS))


def downgrade() -> None:
    # The same objects and columns, each comment removed.
    _apply({name: ("", dict.fromkeys(columns, "")) for name, (_, columns) in COMMENTS.items()})


def _apply(wanted: dict[str, tuple[str, dict[str, str]]]) -> None:
    """Give each object and column the comment in `wanted` ("": none), skipping those that
    have it already (see migrations/resumable.py: a stopped migration runs again)."""
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        for name, (comment, columns) in wanted.items():
            _postgresql(name, comment, columns)
    elif dialect in ("mysql", "mariadb"):
        for name, (comment, columns) in wanted.items():
            if name not in VIEWS:  # MariaDB/MySQL views have no comments
                _mysql(name, comment, columns)
    # SQLite has no comments.


def _literal(text: str) -> str:
    """`text` as an SQL string literal of this connection's dialect."""
    processor = sa.String().literal_processor(op.get_bind().dialect)
    assert processor is not None
    return str(processor(text))


def _execute(statement: str) -> None:
    # As the driver gets it: op.execute would read ":pid" in a comment as a bind parameter.
    op.get_bind().exec_driver_sql(statement)


def _quote(name: str) -> str:
    return op.get_bind().dialect.identifier_preparer.quote(name)


def _postgresql(name: str, comment: str, columns: dict[str, str]) -> None:
    bind = op.get_bind()
    # to_regclass resolves the name through search_path, as the statements below do.
    found = bind.execute(
        sa.text(
            "SELECT c.relkind, obj_description(c.oid, 'pg_class') FROM pg_class c "
            "WHERE c.oid = to_regclass(:name)"
        ),
        {"name": _quote(name)},
    ).one_or_none()
    if found is None:
        log.warning("0013: no table or view %s; its comments are skipped", name)
        return
    kind = "VIEW" if found[0] in ("v", "m") else "TABLE"
    if (found[1] or "") != comment:
        value = _literal(comment) if comment else "NULL"
        _execute(f"COMMENT ON {kind} {_quote(name)} IS {value}")
    existing = dict(
        bind.execute(
            sa.text(
                "SELECT a.attname, col_description(a.attrelid, a.attnum) FROM pg_attribute a "
                "WHERE a.attrelid = to_regclass(:name) AND a.attnum > 0 AND NOT a.attisdropped"
            ),
            {"name": _quote(name)},
        ).all()
    )
    for column, text in columns.items():
        if column not in existing:
            log.warning("0013: no column %s.%s; its comment is skipped", name, column)
            continue
        if (existing[column] or "") != text:
            value = _literal(text) if text else "NULL"
            _execute(f"COMMENT ON COLUMN {_quote(name)}.{_quote(column)} IS {value}")


def _mysql(table: str, comment: str, columns: dict[str, str]) -> None:
    """One ALTER TABLE for the table's comment and every column whose comment differs."""
    bind = op.get_bind()
    where = {"table": table}
    current = bind.execute(
        sa.text(
            "SELECT TABLE_COMMENT FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :table"
        ),
        where,
    ).one_or_none()
    if current is None:
        log.warning("0013: no table %s; its comments are skipped", table)
        return
    live = {
        row.COLUMN_NAME: row
        for row in bind.execute(
            sa.text(
                "SELECT COLUMN_NAME, COLUMN_TYPE, CHARACTER_SET_NAME, COLLATION_NAME, "
                "IS_NULLABLE, COLUMN_DEFAULT, EXTRA, COLUMN_COMMENT "
                "FROM information_schema.COLUMNS "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :table "
                "ORDER BY ORDINAL_POSITION"
            ),
            where,
        )
    }
    checks: dict[str, str] = {}
    mariadb = bool(getattr(bind.dialect, "is_mariadb", False))
    if mariadb:
        # A column's own CHECK (MariaDB's JSON is LONGTEXT with CHECK (json_valid(...))) is
        # part of its definition: a MODIFY COLUMN without it would drop it.
        checks = dict(
            bind.execute(
                sa.text(
                    "SELECT CONSTRAINT_NAME, CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS "
                    "WHERE CONSTRAINT_SCHEMA = DATABASE() AND TABLE_NAME = :table "
                    "AND LEVEL = 'Column'"
                ),
                where,
            ).all()
        )
    changes = []
    for column, text in columns.items():
        row = live.get(column)
        if row is None:
            log.warning("0013: no column %s.%s; its comment is skipped", table, column)
            continue
        if (row.COLUMN_COMMENT or "") == text:
            continue
        definition = _mysql_column(row, checks.get(column), mariadb, text)
        if definition is None:
            log.warning("0013: column %s.%s is not restated; its comment is skipped", table, column)
            continue
        changes.append(f"MODIFY COLUMN {definition}")
    if (current[0] or "") != comment:
        changes.append(f"COMMENT = {_literal(comment)}")
    if changes:
        _execute(f"ALTER TABLE {_quote(table)} " + ", ".join(changes))


def _mysql_column(row: Any, check: str | None, mariadb: bool, comment: str) -> str | None:
    """The column's definition as information_schema gives it, with `comment`; None for a
    column this migration does not know how to restate exactly (generated, invisible, ON
    UPDATE, ...)."""
    extra = (row.EXTRA or "").strip().lower()
    if extra not in ("", "auto_increment"):
        return None
    parts = [_quote(row.COLUMN_NAME), row.COLUMN_TYPE]
    if row.CHARACTER_SET_NAME:
        parts.append(f"CHARACTER SET {row.CHARACTER_SET_NAME} COLLATE {row.COLLATION_NAME}")
    parts.append("NULL" if row.IS_NULLABLE == "YES" else "NOT NULL")
    default = row.COLUMN_DEFAULT
    if default is not None:
        # MariaDB gives the default as an SQL expression ('datasets' quoted, NULL as the
        # word NULL); MySQL gives a literal's value.
        parts.append(f"DEFAULT {default if mariadb else _literal(default)}")
    if extra == "auto_increment":
        parts.append("AUTO_INCREMENT")
    parts.append(f"COMMENT {_literal(comment)}")
    if check is not None:
        parts.append(f"CHECK ({check})")
    return " ".join(parts)
