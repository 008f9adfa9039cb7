"""A byte-identical listing is recognised by its digest and not diffed again, only when safe."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from tests.conftest import rows
from tests.fakeapi import FakeApi, dataset, synthetic


@pytest.fixture
def statements() -> Iterator[list[str]]:
    """Every statement that writes to datasets or dataset_history while the test runs."""
    seen: list[str] = []

    def listener(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        text = " ".join(statement.split()).upper()
        tables = ("DATASETS", "DATASET_HISTORY")
        verbs = ("INSERT INTO ", "UPDATE ", "DELETE FROM ")
        if any(text.startswith(f"{verb}{table} ") for verb in verbs for table in tables):
            seen.append(text)

    event.listen(sa.Engine, "before_cursor_execute", listener)
    yield seen
    event.remove(sa.Engine, "before_cursor_execute", listener)


def runs(url: str) -> list[dict[str, Any]]:
    return rows(url, "sync_runs", order="id")


def test_identical_listing_is_not_diffed_again(
    cli, fake_api: FakeApi, db_url: str, statements: list[str]
) -> None:
    fake_api.datasets = [*synthetic(40), {"dataset_id": "bad", "name": 7}]
    assert cli("--database-url", db_url, "run").code == 0
    before = rows(db_url)
    statements.clear()

    result = cli("--database-url", db_url, "run")
    assert result.code == 0
    assert "unchanged since run 1" in result.err
    assert statements == []  # not one write to the data tables
    assert rows(db_url) == before
    first, second = runs(db_url)
    assert first["listing_digest"] == second["listing_digest"] is not None
    # The counts a full diff would give: every valid dataset unchanged, the reject again.
    assert (second["datasets_seen"], second["inserted"], second["updated"]) == (41, 0, 0)
    assert (second["unchanged"], second["deleted"], second["rejected"]) == (40, 0, 1)


def test_a_different_listing_is_diffed(cli, fake_api: FakeApi, db_url: str) -> None:
    fake_api.datasets = [dataset("a"), dataset("b")]
    assert cli("--database-url", db_url, "run").code == 0
    fake_api.datasets = [dataset("a")]
    result = cli("--database-url", db_url, "run")
    assert result.code == 0 and "unchanged since" not in result.err
    assert runs(db_url)[-1]["deleted"] == 1


def test_a_listing_seen_before_but_not_last_is_diffed(cli, fake_api: FakeApi, db_url: str) -> None:
    """A, then B, then A again: the tables hold B, so the third run must diff."""
    fake_api.datasets = [dataset("a", "one")]
    assert cli("--database-url", db_url, "run").code == 0
    fake_api.datasets = [dataset("a", "two")]
    assert cli("--database-url", db_url, "run").code == 0
    fake_api.datasets = [dataset("a", "one")]
    result = cli("--database-url", db_url, "run")
    assert result.code == 0 and "unchanged since" not in result.err
    assert rows(db_url)[0]["name"] == "one"


def test_another_policy_rereads_the_listing(
    cli, fake_api: FakeApi, db_url: str, tmp_path: Path
) -> None:
    """The digest covers sync.on_invalid_record: `fail` must still fail on the same rejects."""
    fake_api.datasets = [dataset("a"), {"dataset_id": "b", "name": 7}]
    assert cli("--database-url", db_url, "run").code == 0
    (tmp_path / "strict.toml").write_text('[sync]\non_invalid_record = "fail"\n')
    result = cli("--config", "strict.toml", "--database-url", db_url, "run")
    assert result.code == 1 and "invalid record" in result.err


def test_a_write_by_another_run_since_forces_a_diff(cli, fake_api: FakeApi, db_url: str) -> None:
    """Any run that changed rows after the last identical one voids the shortcut."""
    fake_api.datasets = [dataset("a"), dataset("b")]
    assert cli("--database-url", db_url, "run").code == 0
    # Another run (here: a saved listing for the same account) soft-deletes b.
    saved = Path("other.json")
    saved.write_text('{"datasets": [' + __import__("json").dumps(dataset("a")) + "]}")
    assert cli("--database-url", db_url, "run", "--input", str(saved)).code == 0
    assert rows(db_url, order="dataset_id")[1]["deleted_at"] is not None
    # The API's listing is byte-identical to run 1's, but the tables no longer match it.
    result = cli("--database-url", db_url, "run")
    assert result.code == 0 and "unchanged since" not in result.err
    restored = rows(db_url, order="dataset_id")[1]
    assert restored["dataset_id"] == "b" and restored["deleted_at"] is None
