"""Benchmark: the smoke pipeline as a user runs it, and where its time goes.

In a throwaway copy of the project (a fresh git repo, like the end-to-end tests), on the
tiny archive of the tests:

1. ``dvc exp run -S experiment=smoke``: the wall time of the whole pipeline, DVC included;
2. a no-op ``dvc repro`` right after it, beside ``dvc version`` (DVC's own start-up);
3. each stage's command run alone, in pipeline order, beside the seconds a process takes
   only to start and import that stage's module.

    python tests/bench/bench_smoke.py

Prints a table; writes nothing in the project. Time it on an idle machine: the figures
move with whatever else runs.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers import (  # after the project root is on sys.path
    archive_overrides,
    build_archive,
    copy_project,
    dvc_stages,
    git_commit,
    run,
    stage_env,
)


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    run(cmd, cwd, env)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        archive = root / "tiny.tar.gz"
        repo = copy_project(root / "project")
        overrides = ["experiment=smoke", *archive_overrides(archive, build_archive(archive))]
        git_commit(repo)
        env = stage_env(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
        dvc = [sys.executable, "-m", "dvc"]
        total = timed([*dvc, "exp", "run", *(f"-S={o}" for o in overrides)], repo, env)
        noop = timed([*dvc, "repro"], repo, env)
        version = timed([*dvc, "version"], repo, env)
        print(f"smoke `dvc exp run -S experiment=smoke`: {total:6.1f} s wall")
        print(
            f"no-op `dvc repro` afterwards:          {noop:6.1f} s (`dvc version`: {version:.1f} s)"
        )
        print(f"\n{'stage':24} {'alone s':>8} {'import s':>9}")
        listed = run([*dvc, "stage", "list", "--name-only"], repo).stdout.split()
        commands = {name: stage["cmd"] for name, stage in dvc_stages(repo).items()}
        summed = 0.0
        for name in listed:
            base, _, item = name.partition("@")
            cmd = commands[base].replace("${item}", item).split()
            cmd[0] = sys.executable
            alone = timed(cmd, repo, env)
            module = cmd[2]
            imports = timed([sys.executable, "-c", f"import {module}"], repo, env)
            summed += alone
            print(f"{name:24} {alone:8.1f} {imports:9.1f}")
        print(f"{'sum of stages':24} {summed:8.1f}")


if __name__ == "__main__":
    main()
