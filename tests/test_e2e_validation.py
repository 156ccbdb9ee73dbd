"""Changing `data.validation` reruns the pipeline from `fetch` on (real DVC, smoke config)."""

from __future__ import annotations

import pytest

from tests.helpers import dvc, read_json, write_params

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_validation_scheme_is_a_fetch_param(smoke) -> None:
    repo, overrides = smoke.repo, smoke.overrides
    assert read_json(repo / "reports/data.json")["validation_scheme"] == "thread"
    raw = repo / "data/raw/documents.parquet"
    before = raw.read_bytes()

    # DVC sees the param change on fetch (the root of the graph), and only there.
    write_params(repo / "params.yaml", *overrides, "data.validation=latest")
    status = dvc(repo, "status")
    assert status.startswith("fetch:") and "modified:           data\n" in status, status
    assert status.count(":\n\tchanged") == 1, status
    assert "data.validation" in dvc(repo, "params", "diff")

    # On the tiny archive every train post is a thread of its own and both schemes walk
    # the class in the same seeded order, so `random` picks the very posts `thread` did:
    # fetch reruns, its output is byte-identical, and DVC stops there.
    assert smoke.exp_run("data.validation=random") == {"fetch"}
    assert raw.read_bytes() == before
    assert read_json(repo / "reports/data.json")["validation_scheme"] == "random"

    # `latest` moves other posts: every stage downstream of fetch (all of them) reruns.
    assert smoke.exp_run("data.validation=latest") == set(
        dvc(repo, "stage", "list", "--name-only").split()
    )
    assert raw.read_bytes() != before
    data = read_json(repo / "reports/data.json")
    assert data["validation_scheme"] == "latest"
    assert data["documents"] == {"train": 100, "validation": 20, "test": 60, "total": 180}
