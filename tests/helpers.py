"""Builders shared by the tests: params sections, tiny bydate archives and throwaway
project copies."""

from __future__ import annotations

import copy
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import compose, section_class
from pipeline.domain import GROUPS
from pipeline.io import sha256_file

ROOT = Path(__file__).resolve().parent.parent
GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}
# The smoke config with tracking off, for stage runs whose MLflow logging is not what the
# test is about (test_tracking.py tests that): no MLflow start-up in every stage process.
SMOKE_UNTRACKED = ("experiment=smoke", "tracking.enabled=false")
# Words that make each group's posts distinguishable, so tiny models can learn something.
TOPIC_WORDS = [g.replace(".", " ").replace("-", " ") for g in GROUPS]


@functools.cache
def _default_params() -> dict[str, Any]:
    return yaml.safe_load(compose())


def default_params() -> dict[str, Any]:
    """The default composition of conf/ (what params.yaml holds), a fresh copy each call."""
    return copy.deepcopy(_default_params())


def default_section(name: str, **overrides: Any) -> Any:
    """Section ``name`` of the default config, validated, with ``overrides`` applied.

    Section classes have no Python defaults (conf/ holds every value), so a test states
    only the values it is about and takes the rest from conf/.
    """
    values = default_params()[name] | overrides
    return section_class(name).model_validate(values)


def params_with(**changes: Any) -> dict[str, Any]:
    """The default config with some keys of some sections changed, for a params.yaml a
    stage reads: ``params_with(seed=0, tracking={"enabled": False})``."""
    params = default_params()
    for name, value in changes.items():
        if isinstance(value, dict):
            params[name].update(value)
        else:
            params[name] = value
    return params


def make_post(group_index: int, k: int) -> str:
    """A small post with headers, a quoted reply, a latin-1 character and a signature."""
    topic = TOPIC_WORDS[group_index]
    return (
        f"From: user{k}@example.edu (User {k})\n"
        f"Subject: Re: question {k} about {topic}\n"
        f"Organization: Université {group_index}\n"
        f"Lines: 7\n"
        "\n"
        f"In article <{k}@example.edu> someone writes:\n"
        f"> an earlier opinion on {topic}\n"
        f"I think {topic} is interesting, post number {k}. Café {topic} {topic}.\n"
        f"More about {topic} and number {k * 7 % 13}.\n"
        "\n"
        "-- \n"
        f"User {k}, signature line\n"
    )


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 738892800
    tar.addfile(info, io.BytesIO(data))


def build_archive(
    path: Path,
    n_train: int = 6,
    n_test: int = 3,
    top: str | None = "20news-bydate",
    extra: list[tarfile.TarInfo] | None = None,
) -> str:
    """Write a tiny bydate archive (all 20 groups) and return its sha256."""
    prefix = f"{top}/" if top else ""
    with tarfile.open(path, "w:gz") as tar:
        for gi, group in enumerate(GROUPS):
            for origin, n, offset in (("train", n_train, 0), ("test", n_test, 500)):
                for k in range(n):
                    number = 10000 + 1000 * gi + offset + k
                    post = make_post(gi, k).encode("latin-1")
                    add_bytes(tar, f"{prefix}20news-bydate-{origin}/{group}/{number}", post)
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return sha256_file(path)


def write_params(dest: Path, *overrides: str) -> None:
    """Compose conf/ with overrides into ``dest``, the way `dvc exp run -S` does."""
    dest.write_text(compose(list(overrides)), encoding="utf-8")


def archive_overrides(archive: Path, sha256: str) -> list[str]:
    return [f"data.archive={archive}", f"data.archive_sha256={sha256}"]


def stage_env(**extra: str) -> dict[str, str]:
    """Environment for stage/DVC subprocesses: this venv first, no analytics, git identity."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSGROUPS_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_ENV, DVC_NO_ANALYTICS="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True):
    """Run a command, returning the CompletedProcess; on failure show its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env or stage_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def run_stage(stage: str, cwd: Path, *args: str, **env: str):
    """Run one stage module as DVC would (``args``: a foreach stage's item), in ``cwd``;
    never raises on failure."""
    return run(
        [sys.executable, "-m", f"pipeline.stages.{stage}", *args],
        cwd,
        stage_env(**env),
        check=False,
    )


def copy_project(dest: Path) -> Path:
    """Copy the project's tracked and unignored files into a fresh git repo at ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for generated in ("dvc.lock", "data", "reports"):
        target = dest / generated
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    run(["git", "init", "-q"], dest)
    return dest


def git_commit(repo: Path, message: str = "snapshot") -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", message, "--allow-empty"], repo)


def dvc(repo: Path, *args: str) -> str:
    """Run DVC in ``repo`` (failing the test with its output if it fails)."""
    return run([sys.executable, "-m", "dvc", *args], repo).stdout


def dvc_stages(root: Path = ROOT) -> dict[str, dict[str, Any]]:
    """The stage definitions of ``root/dvc.yaml``; a ``foreach`` stage stands as its ``do``
    body, ``${item}`` left in place (so ``paths.calibrator_file("${item}")`` matches it)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def ran(output: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def stage_files(workdir: Path) -> set[Path]:
    """Files a stage run left in ``workdir`` (its params.yaml aside)."""
    return {p for p in workdir.rglob("*") if p.is_file() and p.name != "params.yaml"}


def assert_failed_cleanly(
    proc, workdir: Path, *fragments: str, before: frozenset[Path] | set[Path] = frozenset()
) -> None:
    """Exit 1, one `error:` line naming the problem, no traceback, no new files."""
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    assert "Traceback" not in proc.stderr
    after = stage_files(workdir)
    assert after == set(before), sorted(after ^ set(before))


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, deadline_s: float = 180.0) -> None:
    """Poll ``url`` until it answers 200, retrying *any* request error (refused, reset, read
    timeout of a slow first answer) until the deadline; fail early if ``proc`` exits.

    Busy CI machines make a fresh server's first answer slow: a fixed sleep or a loop that
    catches only connection errors fails there.
    """
    import requests

    deadline = time.monotonic() + deadline_s
    last = "no answer yet"
    while True:
        if proc.poll() is not None:
            raise AssertionError(
                f"{proc.args[:4]} exited {proc.returncode}: {log.read_text()[-3000:]}"
            )
        try:
            response = requests.get(url, timeout=10)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{url} did not answer within {deadline_s:.0f} s ({last}): "
                f"{log.read_text()[-3000:]}"
            )
        time.sleep(0.5)
