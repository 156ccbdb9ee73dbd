"""Fixtures: tiny archives built once per session, and a working folder for stage runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import build_archive, copy_project, dvc


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
