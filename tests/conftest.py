"""Fixtures: tiny archives built once per session, and a working folder for stage runs."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.helpers import (
    archive_overrides,
    build_archive,
    copy_project,
    dvc,
    git_commit,
    run,
    write_params,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every end-to-end test is slow too, so `-m "not slow"` leaves them out."""
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny bydate archive with every group: 6 train and 3 test posts each."""
    path = tmp_path_factory.mktemp("archives") / "tiny-bydate.tar.gz"
    return path, build_archive(path)


@pytest.fixture(autouse=True)
def _clear_hydra():
    """Hydra keeps global state between compose calls; start every test clean."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session", autouse=True)
def _tracking_store(tmp_path_factory: pytest.TempPathFactory):
    """Stages run by the tests log to one throwaway SQLite store, not to the project's.

    Tests about tracking itself pass their own MLFLOW_TRACKING_URI.
    """
    import os

    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    yield
    if previous is None:
        del os.environ["MLFLOW_TRACKING_URI"]
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of the project in a fresh git repo, with its own DVC site cache."""
    repo = copy_project(tmp_path / "project")
    dvc(repo, "config", "--local", "core.site_cache_dir", str(tmp_path / "site-cache"))
    return repo


@dataclass(frozen=True)
class SmokeRun:
    """A project copy where real DVC reproduced the smoke pipeline, then committed."""

    repo: Path
    overrides: list[str]  # the -S values that give this run's params.yaml
    output: str  # what the first `dvc repro` printed
    commit: str  # the git commit the stages ran on (their MLflow `git_commit` tag)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, tiny_archive) -> SmokeRun:
    """The whole smoke pipeline, reproduced once per session: each end-to-end test works
    on its own copy (:func:`smoke`), so the suite pays for one full run, not one per test."""
    root = tmp_path_factory.mktemp("smoke")
    repo = copy_project(root / "project")
    dvc(repo, "config", "--local", "core.site_cache_dir", str(root / "site-cache"))
    overrides = ["experiment=smoke", *archive_overrides(*tiny_archive)]
    write_params(repo / "params.yaml", *overrides)
    git_commit(repo)
    commit = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    output = dvc(repo, "repro")
    git_commit(repo, "smoke run")
    return SmokeRun(repo, overrides, output, commit)


@pytest.fixture
def smoke(smoke_run: SmokeRun, tmp_path: Path) -> SmokeRun:
    """A private copy of the reproduced smoke project (git history and DVC cache too)."""
    repo = tmp_path / "project"
    shutil.copytree(smoke_run.repo, repo, symlinks=True)
    dvc(repo, "config", "--local", "core.site_cache_dir", str(tmp_path / "site-cache"))
    return replace(smoke_run, repo=repo)


# ---------------------------------------------------- the tiny corpus of the model tests


@pytest.fixture
def one_thread():
    import torch

    """Tiny models are slower with two threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    from tests.tiny import build_tiny_corpus

    build_tiny_corpus(root)
    return root


@pytest.fixture
def project(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder whose data/ points at the shared tiny corpus."""
    (tmp_path / "data").mkdir()
    for name in ("tokenizer", "tokenized"):
        (tmp_path / "data" / name).symlink_to(corpus / "data" / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path
