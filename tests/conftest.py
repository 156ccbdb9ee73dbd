"""Fixtures: tiny archives built once per session, and a working folder for stage runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import build_archive


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
