"""The served model's pip requirements, derived from what serving really imports.

A clean interpreter loads the served model the way MLflow does
(:mod:`pipeline.served_model`, ``load_context`` on the artifacts, one prediction), every
third-party module it imported is mapped to the distribution that installed it, and each
distribution is pinned to its version in ``requirements.lock``. Deriving the list keeps it
from drifting away from what serving needs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from functools import cache
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

from pipeline.config import ROOT
from pipeline.errors import PipelineError

LOCK_FILE = ROOT / "requirements.lock"
PACKAGE = "pipeline"  # shipped with the model as code (code_paths), not installed

# Run in a fresh interpreter: prints {module name: file} of every module that loading the
# served model (and one prediction, which may import lazily) added to sys.modules.
_PROBE = """
import json, sys, types
before = set(sys.modules)
import pipeline.served_model  # what MLflow runs to load the model
artifacts = json.loads(sys.argv[1])
if artifacts:
    from pipeline.serving import NewsgroupsClassifier, input_example
    model = NewsgroupsClassifier()
    model.load_context(types.SimpleNamespace(artifacts=artifacts))
    model.predict(None, input_example())
added = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items()) if n not in before}
print(json.dumps(added))
"""


def normalise(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): ``PyYAML`` -> ``pyyaml``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def served_modules(artifacts: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """``{module: file}`` of what loading the served model imports, in a clean interpreter.

    With ``artifacts`` (the dict given to ``log_model``) the model is also loaded from them
    and predicts the input example, so imports made only then count too.
    """
    paths = {k: str(Path(v).resolve()) for k, v in (artifacts or {}).items()}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(paths)],
        capture_output=True,
        text=True,
        env=_env(),
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PipelineError(f"could not load the served model to list its imports: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env() -> dict[str, str]:
    """This environment, with the project first on the path (the probe imports ``pipeline``
    from this checkout, as the served model's code_paths will)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@cache
def _files_of(dist: str) -> frozenset[str]:
    """The files a distribution installed, as recorded in its metadata."""
    return frozenset(str(f) for f in distribution(dist).files or ())


def _relative(file: str, entries: Sequence[Path]) -> str | None:
    """``file`` relative to the first of ``entries`` (resolved sys.path entries, longest
    first) it lies under: the one it was imported from."""
    path = Path(file).resolve()
    for entry in entries:
        if path.is_relative_to(entry):
            return path.relative_to(entry).as_posix()
    return None


def distributions_of(modules: Mapping[str, str | None]) -> set[str]:
    """The installed distributions (normalised names) that provide ``modules``.

    Left out: the standard library, the ``pipeline`` package itself, and modules no
    distribution installed (compiled-in or runtime-made modules without a file). A
    top-level name several distributions share (namespace packages such as ``google``) is
    resolved by which of them owns the module's file.
    """
    owners = packages_distributions()
    entries = sorted({Path(p).resolve() for p in sys.path if p}, key=lambda p: -len(p.parts))
    found = set()
    for name, file in modules.items():
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top == PACKAGE or file is None:
            continue
        relative = _relative(file, entries)
        if relative is None:
            continue
        root = relative.split("/")[0].removesuffix(".py").split(".")[0]
        if root in sys.stdlib_module_names or root == PACKAGE:
            continue
        candidates = owners.get(root, [])
        if len(candidates) > 1:
            candidates = [d for d in candidates if relative in _files_of(d)]
        found |= {normalise(d) for d in candidates}
    return found


def locked_versions(lock: Path = LOCK_FILE) -> dict[str, str]:
    """``name -> version`` from requirements.lock (names normalised as pip does)."""
    if not lock.is_file():
        raise PipelineError(f"{lock}: not found (run `make lock`)")
    versions = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            versions[normalise(name.split("[", 1)[0].strip())] = ver.split(";", 1)[0].strip()
    return versions


def pin(dists: set[str], lock: Path = LOCK_FILE) -> list[str]:
    """``name==version`` for each distribution, at requirements.lock's version, sorted."""
    locked = locked_versions(lock)
    unpinned = sorted(d for d in dists if d not in locked)
    if unpinned:
        raise PipelineError(
            f"the served model imports {', '.join(unpinned)}, which {lock.name} does not pin "
            "(add it to pyproject.toml and run `make lock`)"
        )
    return [f"{d}=={locked[d]}" for d in sorted(dists)]


def pip_requirements(
    artifacts: Mapping[str, str] | None = None, lock: Path = LOCK_FILE
) -> list[str]:
    """The served model's pip requirements: what it imports, pinned to the lock file."""
    return pin(distributions_of(served_modules(artifacts)), lock)
