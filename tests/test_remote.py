"""DVC remote round trip with a local directory remote: what CI's push/pull relies on."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import archive_overrides, dvc, write_params

pytestmark = pytest.mark.e2e  # one cheap stage: in the fast set too


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_push_then_pull_restores_outputs(repo: Path, tmp_path: Path, tiny_archive) -> None:
    remote = tmp_path / "remote"
    dvc(repo, "remote", "add", "-d", "-f", "local", str(remote))
    write_params(repo / "params.yaml", "experiment=smoke", *archive_overrides(*tiny_archive))

    dvc(repo, "repro", "fetch")  # one cheap stage is enough to move real outputs around
    raw = repo / "data/raw"
    before = snapshot(raw)
    assert "documents.parquet" in before

    dvc(repo, "push")
    assert any(p.is_file() for p in remote.rglob("*")), "nothing reached the remote"
    assert "in sync" in dvc(repo, "status", "--cloud", "fetch")

    shutil.rmtree(repo / ".dvc/cache")
    shutil.rmtree(raw)
    assert re.search(r"not in cache:\s+data/raw", dvc(repo, "status", "fetch"))

    dvc(repo, "pull", "fetch")
    assert snapshot(raw) == before
    assert "up to date" in dvc(repo, "status", "fetch")
