"""The SQL in docs/schema.md runs, and answers right, on every backend it is written for;
docs/bi.md's read-only user recipes grant what they say."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from sync.db import make_engine, migrate
from tests.conftest import ALL_RESOURCES, ONLY_DATASETS, rows
from tests.fakeapi import FakeApi, Reply, dataset, file, model, training_run

SCHEMA_DOC = Path(__file__).resolve().parent.parent / "docs" / "schema.md"
DIALECTS = frozenset({"sqlite", "postgresql", "mysql"})

WEEKLY = "Datasets created per week"
PER_USER = "Current datasets per user"
PER_DAY = "Changes per day"
FRESHNESS = "Freshness of the last successful sync"
COVER = "Datasets whose cover changed"
MODELS_PER_DATASET = "Models per dataset and their status"
TRAINING_WEEKLY = "Training runs by status per week"
LARGEST = "Largest datasets by bytes"
UNUSED = "Datasets never used for a model"
EXAMPLES = (
    WEEKLY,
    PER_USER,
    PER_DAY,
    FRESHNESS,
    COVER,
    MODELS_PER_DATASET,
    TRAINING_WEEKLY,
    LARGEST,
    UNUSED,
)
RESOURCES = ("datasets", "dataset_details", "models", "model_details")
AS_OF = "State as of a moment"
EXTRA = "Reading a field of `extra`"

# Session zones other than UTC. Whatever the time of day, one of the two puts the
# moment on another calendar date, so a query that cuts days in the session's zone
# gives another answer in one of them.
OTHER_ZONES = {"postgresql": ("Etc/GMT+12", "Etc/GMT-13"), "mysql": ("-12:00", "+13:00")}

RunCli = Callable[..., Any]


@dataclass(frozen=True)
class Block:
    """One fenced SQL block of the document and the heading it sits under."""

    heading: str
    dialects: frozenset[str]
    sql: str
    line: int


def sql_blocks(text: str) -> list[Block]:
    """Every fenced block whose info string starts with `sql`, with its nearest heading."""
    blocks: list[Block] = []
    heading = ""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("```"):
            info = line[3:].strip()
            start = index + 1
            index += 1
            while index < len(lines) and lines[index].rstrip() != "```":
                index += 1
            assert index < len(lines), f"docs/schema.md:{start}: the code block is never closed"
            words = info.split()
            if words and words[0] == "sql":
                blocks.append(
                    Block(heading, frozenset(words[1:]), "\n".join(lines[start:index]), start)
                )
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
        index += 1
    return blocks


def doc_blocks() -> list[Block]:
    return sql_blocks(SCHEMA_DOC.read_text(encoding="utf-8"))


def backend_of(url: str) -> str:
    """The fixture's backend, as the document names dialects."""
    name = make_url(url).get_backend_name()
    return "mysql" if name == "mariadb" else name


def query(url: str, sql: str, zone: str | None = None) -> list[dict[str, Any]]:
    """Run `sql` through the tool's engine (a UTC session unless `zone` is given)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if zone is not None:
                if conn.dialect.name == "postgresql":
                    conn.exec_driver_sql(f"SET TIME ZONE '{zone}'")
                else:
                    conn.exec_driver_sql(f"SET time_zone = '{zone}'")
            return [dict(r._mapping) for r in conn.execute(sa.text(sql))]
    finally:
        engine.dispose()


def the_query(blocks: list[Block], heading: str, backend: str) -> str:
    (block,) = [b for b in blocks if b.heading == heading and backend in b.dialects]
    return block.sql


def utc(value: Any) -> datetime:
    """A timestamp as the driver returned it (aware, naive UTC or SQLite text), as aware UTC."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime), value
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def day_text(value: Any) -> str:
    """A DATE (PostgreSQL, MariaDB) or `YYYY-MM-DD` text (SQLite) as `YYYY-MM-DD`."""
    return str(value)[:10]


# Six datasets, then: a renamed, c gets a cover, g added (run 2); c's cover type
# changes, d renamed, f's unmodelled cover sub-field changes, b and e vanish (run 3);
# b comes back as it was (run 4); nothing changes (run 5); the API refuses the key (run 6).
_CREATED = {
    "a": "2025-01-06T03:00:00Z",  # Monday in UTC, still Sunday west of UTC
    "b": "2025-01-05T12:00:00Z",
    "c": "2025-01-12T23:30:00Z",  # Sunday in UTC, already Monday east of UTC
    "d": "2025-01-13T00:00:00Z",
    "e": "2025-01-13T10:00:00+02:00",
    "f": "2024-12-31T23:59:59.999999Z",
    "g": "2025-01-19T23:59:59Z",
}
_USER = {"a": "user-1", "b": "user-1", "f": "user-1", "c": "user-2", "d": "user-2"}


def _ds(dataset_id: str, name: str | None = None, **kwargs: Any) -> dict[str, Any]:
    return dataset(
        dataset_id,
        name,
        user_id=_USER.get(dataset_id, "user-3"),
        created=_CREATED[dataset_id],
        **kwargs,
    )


def listings() -> list[list[dict[str, Any]]]:
    a2 = _ds("a", "A2")
    c2 = _ds("c", cover={"asset_type": "RESPONSE", "asset_id": "cov-c"})
    c3 = _ds("c", cover={"asset_type": "IMAGE", "asset_id": "cov-c"})
    d1 = _ds("d", cover=None)
    d2 = _ds("d", "D2", cover=None)
    f1 = _ds("f", cover={"asset_type": "RESPONSE", "asset_id": "cov-f", "width": 1})
    f2 = _ds("f", cover={"asset_type": "RESPONSE", "asset_id": "cov-f", "width": 2})
    return [
        [_ds("a"), _ds("b"), _ds("c", cover=None), d1, _ds("e"), f1],
        [a2, _ds("b"), c2, d1, _ds("e"), f1, _ds("g")],
        [a2, c3, d2, f2, _ds("g")],
        [a2, _ds("b"), c3, d2, f2, _ds("g")],
        [a2, _ds("b"), c3, d2, f2, _ds("g")],
    ]


# Then two syncs of every resource over the last listing (a, b, c, d, f, g exist; e is gone),
# which leave the datasets as they were. Files: a three sized ones, b one sized and one not,
# c only unsized ones, d one, f none, g one (e's are never asked for: it is deleted).
_FILES = {
    "a": [file("a-1.png", 1000), file("a-2.png", 2000), file("a-3.png", 3000)],
    "b": [file("b-1.png", 500), file("b-2.png", None)],
    "c": [file("c-1.png", None), file(None, None)],
    "d": [file("d-1.png", 10_000)],
    "f": [],
    "g": [file("g-1.png", 250)],
    "e": [file("e-1.png", 99_999)],
}


def _run(run_id: str, status: str, created: str) -> dict[str, Any]:
    return training_run(run_id, status, created=created, updated=created)


def models_listings() -> list[list[dict[str, Any]]]:
    """The models of the two syncs of every resource: the second deletes m-c1 (its training
    run stays) and finishes m-b1, whose training runs then become one (tr-4 goes)."""
    shared = {"owned": False}
    first = [
        model("m-a1", dataset_id="a", status="COMPLETED"),
        model("m-a2", dataset_id="a", status="ERRORED"),
        model("m-a3", dataset_id="a", status="COMPLETED"),  # owned, no training run listed
        model("m-b1", dataset_id="b", status="TRAINING"),
        model("m-b2", dataset_id="b", status="COMPLETED", **shared),
        model("m-c1", dataset_id="c", status="COMPLETED"),
        model("m-d1", dataset_id="d", status=None, **shared),
        model("m-d2", dataset_id="d", status="TRAINING"),
        model("m-e1", dataset_id="e", status="COMPLETED"),  # from the deleted dataset
        model("m-x", dataset_id="ds-of-someone-else", status="COMPLETED", **shared),
        model("m-none", dataset_id=None, status="COMPLETED"),
    ]
    second = [
        model("m-b1", dataset_id="b", status="COMPLETED", updated="2025-02-06T09:00:00Z")
        if m["model_id"] == "m-b1"
        else m
        for m in first
        if m["model_id"] != "m-c1"
    ]
    return [first, second]


def training_runs() -> list[dict[str, list[dict[str, Any]]]]:
    """What GET /models/{id} lists, in each of the two syncs. Weeks (Monday, UTC): 2025-01-27
    and 2025-02-03. tr-1 is Sunday 23:30 UTC (Monday east of UTC), tr-2 Monday 00:00 UTC
    (Sunday west of it); m-b2 is shared, so its tr-9 is never asked for."""
    first = {
        "m-a1": [
            _run("tr-1", "COMPLETED", "2025-02-02T23:30:00Z"),
            _run("tr-2", "COMPLETED", "2025-02-03T00:00:00Z"),
        ],
        "m-a2": [_run("tr-3", "ERRORED", "2025-01-28T09:00:00Z")],
        "m-b1": [
            _run("tr-4", "ERRORED", "2025-02-04T08:00:00+02:00"),
            _run("tr-5", "TRAINING", "2025-02-05T10:00:00Z"),
        ],
        "m-b2": [_run("tr-9", "COMPLETED", "2025-02-03T12:00:00Z")],
        "m-c1": [_run("tr-6", "COMPLETED", "2025-01-30T12:00:00Z")],
        "m-d2": [_run("tr-8", "TRAINING", "2025-02-06T12:00:00Z")],
        "m-e1": [_run("tr-7", "COMPLETED", "2025-01-29T12:00:00Z")],
    }
    second = {**first, "m-b1": [_run("tr-5", "COMPLETED", "2025-02-05T10:00:00Z")]}
    return [first, second]


@pytest.fixture
def synced(cli: RunCli, fake_api: FakeApi, db_url: str) -> str:
    """`db_url`, filled by real syncs of the listings above and one failed run."""
    return _fill(cli, fake_api, db_url)


@pytest.fixture(params=["postgresql", "mysql"])
def synced_server(
    request: pytest.FixtureRequest, cli: RunCli, fake_api: FakeApi, tmp_path: Path
) -> Iterator[str]:
    """Like `synced`, on the servers only: SQLite has no session time zone to vary."""
    from tests.conftest import database_url_for

    for url in database_url_for(request.param, tmp_path):
        yield _fill(cli, fake_api, url)


def _fill(cli: RunCli, fake_api: FakeApi, db_url: str) -> str:
    """Five syncs of the datasets alone (runs 1 to 5), two of every resource (runs 6 to 13),
    and a failed one of the datasets (run 14)."""
    for listing in listings():
        fake_api.datasets = listing
        result = cli("--database-url", db_url, "run")
        assert result.code == 0, result.output
    fake_api.files = _FILES
    for models, runs in zip(models_listings(), training_runs(), strict=True):
        fake_api.models, fake_api.training_runs = models, runs
        result = cli("--database-url", db_url, "run", env=ALL_RESOURCES)
        assert result.code == 0, result.output
    fake_api.push(Reply(401))
    assert cli("--database-url", db_url, "run", env=ONLY_DATASETS).code == 3
    runs = [(r["resource"], r["status"]) for r in rows(db_url, "sync_runs", order="id")]
    assert runs == [
        *[("datasets", "success")] * 5,
        *[(resource, "success") for resource in RESOURCES] * 2,
        ("datasets", "failed"),
    ]
    # Every resource's run left what the examples below are about.
    assert fake_api.paths("/models/m-b2") == fake_api.paths("/datasets/e") == []
    return db_url


def test_document_has_every_example_for_every_dialect() -> None:
    text = SCHEMA_DOC.read_text(encoding="utf-8")
    blocks = sql_blocks(text)
    assert not re.search(r"^```sql\s*$", text, re.MULTILINE), "a sql block names no dialect"
    for block in blocks:
        where = f"docs/schema.md:{block.line}"
        assert block.dialects, f"{where}: the block names no dialect"
        assert block.dialects <= DIALECTS, f"{where}: unknown dialect(s) {block.dialects}"
        assert block.sql.strip(), f"{where}: the block is empty"
    headings = {b.heading for b in blocks}
    for heading in headings:
        under = [b.dialects for b in blocks if b.heading == heading]
        covered = [d for dialects in under for d in dialects]
        assert len(covered) == len(set(covered)), f"{heading}: a dialect has two queries"
    for heading in EXAMPLES:
        assert f"\n### {heading}\n" in text, f"no `### {heading}` heading"
    for heading in (*EXAMPLES, AS_OF, EXTRA):
        covered: set[str] = set().union(*[b.dialects for b in blocks if b.heading == heading])
        assert covered == DIALECTS, f"{heading}: no query for {sorted(DIALECTS - covered)}"


def test_every_query_runs_and_returns_rows(synced: str) -> None:
    backend = backend_of(synced)
    mine = [b for b in doc_blocks() if backend in b.dialects]
    assert {b.heading for b in mine} >= set(EXAMPLES)
    for block in mine:
        try:
            result = query(synced, block.sql)
        except sa.exc.DBAPIError as exc:
            pytest.fail(f"docs/schema.md:{block.line} ({block.heading}) fails on {backend}: {exc}")
        assert result, f"docs/schema.md:{block.line} ({block.heading}) returned no rows"


def test_query_results_are_right(synced: str) -> None:
    backend = backend_of(synced)
    blocks = doc_blocks()

    def run(heading: str) -> list[dict[str, Any]]:
        return query(synced, the_query(blocks, heading, backend))

    weekly = {day_text(r["week_start"]): int(r["n_datasets"]) for r in run(WEEKLY)}
    assert weekly == {"2024-12-30": 2, "2025-01-06": 2, "2025-01-13": 3}

    per_user = {r["user_id"]: int(r["n_datasets"]) for r in run(PER_USER)}
    current = Counter(r["user_id"] for r in query(synced, "SELECT * FROM datasets_current"))
    assert per_user == dict(current) == {"user-1": 3, "user-2": 2, "user-3": 1}

    history = rows(synced, "dataset_history", order="id")
    expected_days = Counter((v["valid_from"].date().isoformat(), v["change_type"]) for v in history)
    per_day = {
        (day_text(r["change_day"]), r["change_type"]): int(r["n_changes"]) for r in run(PER_DAY)
    }
    assert per_day == dict(expected_days)
    totals = Counter[str]()
    for (_day, change_type), n in per_day.items():
        totals[change_type] += n
    assert totals == {"insert": 7, "update": 5, "delete": 2, "restore": 1}
    current_versions = Counter(v["dataset_id"] for v in history if v["valid_to"] is None)
    assert current_versions == dict.fromkeys("abcdefg", 1)

    freshness = run(FRESHNESS)
    assert [(r["account"], r["resource"]) for r in freshness] == [
        ("default", resource) for resource in sorted(RESOURCES)
    ]
    runs = rows(synced, "sync_runs", order="id")
    for fresh in freshness:
        mine = [r for r in runs if r["resource"] == fresh["resource"]]
        last_success = max(r["finished_at"] for r in mine if r["status"] == "success")
        # The datasets' newest run is the failed one; the others' newest succeeded.
        status = "failed" if fresh["resource"] == "datasets" else "success"
        assert fresh["last_run_status"] == mine[-1]["status"] == status, fresh
        assert utc(fresh["last_run_finished_at"]) == mine[-1]["finished_at"]
        assert utc(fresh["last_success_at"]) == last_success
        assert 0 <= fresh["seconds_since_success"] < 600
        assert fresh["freshness"] == "fresh"

    covers = [
        (
            r["dataset_id"],
            r["change_type"],
            r["prev_cover_asset_type"],
            r["prev_cover_asset_id"],
            r["cover_asset_type"],
            r["cover_asset_id"],
        )
        for r in run(COVER)
    ]
    assert covers == [
        ("c", "update", None, None, "RESPONSE", "cov-c"),
        ("c", "update", "RESPONSE", "cov-c", "IMAGE", "cov-c"),
    ]

    as_of = {r["dataset_id"]: r["name"] for r in run(AS_OF)}
    assert as_of == {d["dataset_id"]: d["name"] for d in listings()[2]}
    assert as_of["a"] == "A2" and as_of["d"] == "D2" and "b" not in as_of

    assert [r["dataset_id"] for r in run(EXTRA)] == ["f"]


def test_model_and_detail_query_results_are_right(synced: str) -> None:
    """The examples about models, training runs and files, on the second sync of every
    resource (see models_listings, training_runs and _FILES)."""
    backend = backend_of(synced)
    blocks = doc_blocks()

    def run(heading: str) -> list[dict[str, Any]]:
        return query(synced, the_query(blocks, heading, backend))

    # Active datasets x active models: m-c1 is deleted (c has no row); m-e1's dataset is
    # deleted; m-x's dataset is not synced; m-none has none. m-b1 became COMPLETED.
    per_dataset = [
        (
            r["dataset_id"],
            r["dataset_name"],
            r["model_status"],
            int(r["n_models"]),
            int(r["n_owned"]),
            int(r["n_available"]),
        )
        for r in run(MODELS_PER_DATASET)
    ]
    assert sorted(per_dataset) == [
        ("a", "A2", "COMPLETED", 2, 2, 2),
        ("a", "A2", "ERRORED", 1, 1, 0),
        ("b", "Dataset b", "COMPLETED", 2, 1, 2),
        ("d", "D2", "(none)", 1, 0, 0),
        ("d", "D2", "TRAINING", 1, 1, 0),
    ]
    assert [r[0] for r in per_dataset] == ["a", "a", "b", "d", "d"]

    # Owned models' runs only (m-b2's tr-9 is not there), as the last details listed them
    # (m-b1's tr-4 is gone, tr-5 completed); m-c1's tr-6 and m-e1's tr-7 stay with their
    # deleted model or dataset. tr-1 (Sunday 23:30 UTC) and tr-2 (Monday 00:00 UTC) fall
    # in different weeks.
    weekly = [
        (day_text(r["week_start"]), r["run_status"], int(r["n_runs"])) for r in run(TRAINING_WEEKLY)
    ]
    assert weekly == [
        ("2025-01-27", "COMPLETED", 3),
        ("2025-01-27", "ERRORED", 1),
        ("2025-02-03", "COMPLETED", 2),
        ("2025-02-03", "TRAINING", 1),
    ]
    stored = {r["training_run_id"]: r["model_id"] for r in rows(synced, "model_training_runs")}
    assert stored == {
        "tr-1": "m-a1",
        "tr-2": "m-a1",
        "tr-3": "m-a2",
        "tr-5": "m-b1",
        "tr-6": "m-c1",
        "tr-7": "m-e1",
        "tr-8": "m-d2",
    }

    # c (only unsized files) and f (no files) have no known size; e is deleted.
    largest = [
        (
            r["dataset_id"],
            r["name"],
            r["file_count"],
            int(r["total_file_bytes"]),
            int(r["files_without_size"]),
        )
        for r in run(LARGEST)
    ]
    assert largest == [
        ("d", "D2", 1, 10_000, 0),
        ("a", "A2", 3, 6000, 0),
        ("b", "Dataset b", 2, 500, 1),
        ("g", "Dataset g", 1, 250, 0),
    ]
    current = {
        r["dataset_id"]: (r["file_count"], r["total_file_bytes"])
        for r in query(synced, "SELECT * FROM datasets_current")
    }
    assert current == {
        "a": (3, 6000),
        "b": (2, 500),
        "c": (2, None),
        "d": (1, 10_000),
        "f": (0, None),
        "g": (1, 250),
    }

    # c's only model is deleted, but it was used; e is deleted itself.
    unused = [
        (r["dataset_id"], r["user_id"], r["file_count"], r["total_file_bytes"]) for r in run(UNUSED)
    ]
    assert unused == [("f", "user-1", 0, None), ("g", "user-3", 1, 250)]
    assert [utc(r["creation_time"]) for r in run(UNUSED)] == [
        datetime(2024, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2025, 1, 19, 23, 59, 59, tzinfo=UTC),
    ]


def test_answers_do_not_depend_on_the_session_time_zone(synced_server: str) -> None:
    synced = synced_server
    backend = backend_of(synced)
    for block in (b for b in doc_blocks() if backend in b.dialects):
        in_utc = query(synced, block.sql)
        for zone in OTHER_ZONES[backend]:
            elsewhere = query(synced, block.sql, zone)
            where = f"docs/schema.md:{block.line} ({block.heading}) in zone {zone}"
            assert len(elsewhere) == len(in_utc), where
            for here, there in zip(in_utc, elsewhere, strict=True):
                # The clock moves between the two queries: ages may differ by a second or so.
                ages = {k for k in here if k.startswith("seconds_") or k.endswith("_seconds")}
                for key in ages:
                    assert abs(here[key] - there[key]) < 5, f"{where}: {key}"
                assert _without(there, ages) == _without(here, ages), where


def _without(row: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in keys}


BI_DOC = SCHEMA_DOC.with_name("bi.md")
# What docs/bi.md's "What to read" sends analysts to, and the tool's own bookkeeping.
# Those of migration 0011 exist only from then on.
OBJECTS_OF_0011 = {
    "dataset_files",
    "models",
    "model_history",
    "model_training_runs",
    "models_current",
    "dataset_models",
}
ANALYST_OBJECTS = {
    "datasets",
    "dataset_history",
    "sync_runs",
    "datasets_current",
    "sync_runs_latest",
    "sync_daily",
    *OBJECTS_OF_0011,
}
BOOKKEEPING = {"sync_locks", "alembic_version"}
BI_RECIPES = {"postgresql": "PostgreSQL", "mysql": "MariaDB / MySQL"}
BI_PASSWORD = "change-me"


def bi_recipe(backend: str, database: str, user: str) -> list[str]:
    """docs/bi.md's read-only user recipe for `backend`, one statement each, for `database`
    and `user` instead of `ideogram` and `ideogram_bi` (users and roles are server-wide)."""
    blocks = sql_blocks(BI_DOC.read_text(encoding="utf-8"))
    (block,) = [b for b in blocks if b.heading == BI_RECIPES[backend] and backend in b.dialects]
    sql = block.sql.replace("ideogram_bi", user)
    if backend == "mysql":
        sql = re.sub(r"\bideogram\.", f"`{database}`.", sql)
    else:
        sql = re.sub(r"\bDATABASE ideogram\b", f'DATABASE "{database}"', sql)
    assert "ideogram" not in sql.replace(user, ""), sql
    return [statement.strip() for statement in sql.split(";") if statement.strip()]


BI_METABASE_ALERT = "Metabase"
BI_GRAFANA_STAT = "Freshness: a stat panel"


def test_bi_freshness_queries(synced: str) -> None:
    """docs/bi.md's freshness queries, on a database whose every resource synced and whose
    datasets run then failed: nothing is stale, and the stat panel gets one number."""
    backend = backend_of(synced)
    # Blocks inside list items too (the Metabase one is indented): every line dedented.
    text = "\n".join(line.lstrip() for line in BI_DOC.read_text(encoding="utf-8").splitlines())
    # The dashboard queries are the ones written for SQLite too (the grants are not).
    dashboards = [b for b in sql_blocks(text) if "sqlite" in b.dialects]
    assert {b.heading for b in dashboards} == {BI_METABASE_ALERT, BI_GRAFANA_STAT}
    for block in dashboards:
        assert block.dialects == DIALECTS, f"docs/bi.md:{block.line}"

    assert query(synced, the_query(dashboards, BI_METABASE_ALERT, backend)) == []
    (stat,) = query(synced, the_query(dashboards, BI_GRAFANA_STAT, backend))
    assert list(stat) == ["seconds_since_success"]
    assert 0 <= stat["seconds_since_success"] < 600
    # With a threshold every resource is past, the question has a row for each, with the
    # newest run's outcome: the failed one of the datasets, with its error.
    everything_stale = the_query(dashboards, BI_METABASE_ALERT, backend).replace("93600", "-1")
    alerts = {r["resource"]: r for r in query(synced, everything_stale)}
    assert {resource: r["last_run_status"] for resource, r in alerts.items()} == {
        resource: "failed" if resource == "datasets" else "success" for resource in RESOURCES
    }
    assert "HTTP 401" in alerts["datasets"]["error"]
    assert alerts["models"]["error"] is None


def _names_0011_object(statement: str) -> bool:
    return any(re.search(rf"\b{name}\b", statement) for name in OBJECTS_OF_0011)


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_read_only_user_recipe(backend: str, tmp_path: Path) -> None:
    """The recipe, run for real: its user reads every analyst table and view, also after
    migrations that redefine views, and can neither read nor list the bookkeeping tables.
    The grants of migration 0011's objects are made after it, as for a user created before
    the upgrade (the document says those statements are all such a user needs)."""
    from tests.conftest import database_url_for

    for url in database_url_for(backend, tmp_path):
        database = make_url(url).database
        assert database
        user = f"bi_{database[-10:]}"
        engine = make_engine(url)
        try:
            # Granted before 0009 and 0011 redefine views: the grants must survive them.
            migrate(engine, "0008")
            recipe = bi_recipe(backend, database, user)
            later = [statement for statement in recipe if _names_0011_object(statement)]
            assert len(later) == (1 if backend == "postgresql" else len(OBJECTS_OF_0011))
            # Through the driver's own cursor, without parameters: sent as a client sends
            # it (no placeholder processing of the '%' host).
            run_as_client(engine, [statement for statement in recipe if statement not in later])
            migrate(engine)
            run_as_client(engine, later)
            _check_read_only_user(make_url(url).set(username=user, password=BI_PASSWORD))
        finally:
            if backend == "postgresql":
                # Revokes its grants here and on the database, so the role can go.
                run_as_client(engine, [f"DROP OWNED BY {user}", f"DROP ROLE IF EXISTS {user}"])
            else:
                run_as_client(engine, [f"DROP USER IF EXISTS '{user}'@'%'"])
            engine.dispose()


def run_as_client(engine: sa.Engine, statements: list[str]) -> None:
    """Run each statement on a raw driver cursor and commit."""
    with engine.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        cursor = dbapi.cursor()
        for statement in statements:
            cursor.execute(statement)
        cursor.close()
        dbapi.commit()


def _check_read_only_user(url: sa.URL) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                listed = conn.exec_driver_sql(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = current_schema()"
                )
            else:
                listed = conn.exec_driver_sql(
                    "SELECT TABLE_NAME FROM information_schema.TABLES "
                    "WHERE TABLE_SCHEMA = DATABASE()"
                )
                shown = {row[0] for row in conn.exec_driver_sql("SHOW TABLES")}
                assert shown == ANALYST_OBJECTS
            assert {row[0] for row in listed} == ANALYST_OBJECTS
            for name in sorted(ANALYST_OBJECTS):
                conn.exec_driver_sql(f"SELECT * FROM {name}").all()
            conn.rollback()
        for name in sorted(BOOKKEEPING):
            with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as refused:
                conn.exec_driver_sql(f"SELECT * FROM {name}")
            # PostgreSQL: insufficient_privilege; MariaDB/MySQL: SELECT command denied.
            assert getattr(refused.value.orig, "sqlstate", None) == "42501" or (
                refused.value.orig.args[0] == 1142
            ), refused.value
        with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError):
            conn.exec_driver_sql("DELETE FROM sync_runs")
    finally:
        engine.dispose()
