"""Fixtures: tiny archives built once per session, and a working folder for stage runs."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from filelock import FileLock

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core: one torch/BLAS thread each, here and in the stages it starts.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.helpers import (  # after the thread count: before anything loads torch
    archive_overrides,
    build_archive,
    copy_project,
    dvc,
    git_commit,
    ran,
    run,
    stage_env,
    write_params,
)

# Modules whose module-scoped fixtures (a trained project, a registry, a model server) are
# worth building once: xdist runs each of them on one worker. (`--dist loadgroup` would say
# it with marks, but it ignores them with pytest 9.2: pytest-xdist issue 1386.)
ONE_WORKER_MODULES = frozenset({"tests/test_serving.py", "tests/test_stage_errors_eval.py"})


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown without it
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's scope scheduler with one unit per test, except the modules above."""
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER_MODULES else nodeid

    return Scheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order for two or more xdist workers: the first test that works on the shared smoke
    run goes first, so one worker builds that run while the others take the rest; then
    the modules that stay on one worker (long set-up), the other tests, and last the other
    users of the smoke run, when it is ready."""
    smoke = [item for item in items if "smoke" in getattr(item, "fixturenames", ())]
    grouped = [item for item in items if item.nodeid.split("::")[0] in ONE_WORKER_MODULES]
    rest = [item for item in items if item not in smoke and item not in grouped]
    items[:] = [*smoke[:1], *grouped, *rest, *smoke[1:]]


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
    store: Path  # the SQLite MLflow store the smoke stages logged to

    def exp_run(self, *changes: str, stage: str | None = None) -> set[str]:
        """`dvc exp run` of this run's config with ``changes`` (``key=value``), of
        everything or of ``stage`` and what it needs: the stages it ran."""
        sets = (f"-S={o}" for o in [*self.overrides, *changes])
        return ran(dvc(self.repo, "exp", "run", *([stage] if stage else []), *sets))

    def data_files(self) -> dict[Path, bytes]:
        """Every file under the project's ``data/`` with its bytes."""
        return {p: p.read_bytes() for p in (self.repo / "data").rglob("*") if p.is_file()}


def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one temporary folder of this pytest run, the same for every xdist worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    """The whole smoke pipeline, reproduced once per test run (the first xdist worker to
    ask builds it under a file lock, the others wait and read it): each end-to-end test
    works on its own copy (:func:`smoke`), so the suite pays for one full run."""
    root = shared_root(tmp_path_factory) / "smoke"
    repo, store, done = root / "project", root / "mlflow.db", root / "smoke-run.json"
    with FileLock(str(root) + ".lock"):
        if not done.is_file():
            if root.exists():  # a build that failed half-way
                shutil.rmtree(root)
            root.mkdir()
            archive = root / "tiny-bydate.tar.gz"
            copy_project(repo)
            dvc(repo, "config", "--local", "core.site_cache_dir", str(root / "site-cache"))
            overrides = ["experiment=smoke", *archive_overrides(archive, build_archive(archive))]
            write_params(repo / "params.yaml", *overrides)
            git_commit(repo)
            commit = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
            env = stage_env(MLFLOW_TRACKING_URI=f"sqlite:///{store}")
            output = run([sys.executable, "-m", "dvc", "repro"], repo, env).stdout
            git_commit(repo, "smoke run")
            record = {"overrides": overrides, "output": output, "commit": commit}
            done.write_text(json.dumps(record), encoding="utf-8")
    record = json.loads(done.read_text(encoding="utf-8"))
    return SmokeRun(repo, record["overrides"], record["output"], record["commit"], store)


@pytest.fixture
def smoke(smoke_run: SmokeRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SmokeRun:
    """A private copy of the reproduced smoke project (git history and DVC cache too) and
    of its MLflow store, which the test's stages and MLflow clients use."""
    repo = tmp_path / "project"
    shutil.copytree(
        smoke_run.repo, repo, symlinks=True, ignore=shutil.ignore_patterns("mlartifacts")
    )
    dvc(repo, "config", "--local", "core.site_cache_dir", str(tmp_path / "site-cache"))
    store = tmp_path / "mlflow.db"
    shutil.copy2(smoke_run.store, store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    return replace(smoke_run, repo=repo, store=store)


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
