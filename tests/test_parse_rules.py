"""When the parse rules change, the next run re-derives every row by itself (issue 16, point 4).

A stored hash is of a record's text under a version of the parse rules (records.HASH_VERSION).
A record whose text and rules are unchanged is not parsed again; any other is parsed, and
its row compared column by column with the stored one: updated (with a history version) only
when its columns differ, otherwise only its hash is brought up to date. A release that changes
what parse_record makes of a record bumps the version; the last test here makes sure it does.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import pytest

from sync import job, records
from tests.conftest import rows
from tests.fakeapi import FakeApi, dataset


def state(url: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return rows(url, "datasets", order="dataset_id"), rows(url, "dataset_history", order="id")


def last_run(url: str) -> dict[str, Any]:
    return rows(url, "sync_runs", order="id")[-1]


def test_new_rules_that_map_records_the_same_way_change_no_row(
    cli: Any, fake_api: FakeApi, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_api.datasets = [dataset("a"), dataset("b", extra_field={"k": [1, True]}), dataset("c")]
    assert cli("--database-url", db_url, "run").code == 0
    table, history = state(db_url)

    monkeypatch.setattr(records, "HASH_VERSION", "9")
    assert cli("--database-url", db_url, "run").code == 0

    run = last_run(db_url)
    assert (run["inserted"], run["updated"], run["unchanged"]) == (0, 0, 3)
    after, after_history = state(db_url)
    assert after_history == history
    for old, new in zip(table, after, strict=True):
        assert new["content_hash"].startswith("9:")
        assert {**new, "content_hash": None} == {**old, "content_hash": None}
    # From then on the hashes are of the new rules: an unchanged run compares hashes only.
    fake_api.datasets = [*fake_api.datasets, dataset("d")]
    assert cli("--database-url", db_url, "run").code == 0
    assert (last_run(db_url)["inserted"], last_run(db_url)["unchanged"]) == (1, 3)


def test_a_fixed_parse_reaches_exactly_the_rows_it_changes(
    cli: Any, fake_api: FakeApi, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_api.datasets = [dataset("a", "Cats  "), dataset("b", "Dogs"), dataset("c", "  Owls")]
    assert cli("--database-url", db_url, "run").code == 0
    table, history = state(db_url)

    # A release that trims names (and so bumps the rules' version).
    def trimmed(record: Any) -> records.DatasetRow:
        row = records.parse_record(record)
        return row._replace(name=row.name.strip())

    monkeypatch.setattr(records, "HASH_VERSION", "9")
    monkeypatch.setitem(
        job.LISTINGS, "datasets", dataclasses.replace(records.DATASETS, parse=trimmed)
    )
    assert cli("--database-url", db_url, "run").code == 0

    run = last_run(db_url)
    assert (run["updated"], run["unchanged"]) == (2, 1)
    after = {r["dataset_id"]: r for r in state(db_url)[0]}
    assert [after[i]["name"] for i in "abc"] == ["Cats", "Dogs", "Owls"]
    assert after["b"]["last_sync_run_id"] == table[1]["last_sync_run_id"]  # untouched
    new_versions = state(db_url)[1][len(history) :]
    assert sorted((v["dataset_id"], v["name"], v["change_type"]) for v in new_versions) == [
        ("a", "Cats", "update"),
        ("c", "Owls", "update"),
    ]


# What parse_record makes of CORPUS, by rules version (see test below).
RULES = {"2": "3e2ff91b940d1f5370768df09960c7f0"}
CORPUS = [
    dataset("a"),
    dataset("b", "  spaced  ", cover=None),
    dataset(
        "c", note={"k": [1, 1.5, True, None, "ü"]}, created="2024-12-15 19:32:00.1234567+02:00"
    ),
    dataset("d", created="2024-12-15T17:32Z"),
    {
        **dataset("e"),
        "cover_asset_identifier": {"asset_type": "UPLOAD", "asset_id": "x", "more": 1},
    },
    {**dataset("f"), "creation_time": "2024-12-15T17:32:00"},
]


def test_the_rules_version_names_these_rules() -> None:
    """A record whose text is unchanged is not parsed again: a change to what parse_record
    makes of a record must come with a new HASH_VERSION, or stored rows keep the old mapping."""
    rows = [records.canonical(records.parse_record(record)) for record in CORPUS]
    made = hashlib.blake2b(repr(rows).encode(), digest_size=16).hexdigest()
    assert RULES.get(records.HASH_VERSION) == made, (
        f"parse_record now makes other rows of the corpus (digest {made}): bump "
        "records.HASH_VERSION, so that every stored row is re-derived on the next run, "
        "and add the new version's digest to RULES"
    )
