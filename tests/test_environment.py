"""The environment is declared and locked: what the code imports is a declared dependency,
and requirements.lock pins every package (torch by version only, so GPU machines keep
their CUDA build)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions

from tests.helpers import ROOT


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, str]:
    """Declared runtime dependencies: normalised name -> requirement string."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    deps = {}
    for req in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
        deps[normalise(name)] = req
    return deps


def third_party_imports() -> set[str]:
    """Top-level names of the non-stdlib, non-project modules ``pipeline/`` imports."""
    names = set()
    for path in (ROOT / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "pipeline"}


def test_every_imported_package_is_declared_and_every_declared_one_is_used() -> None:
    dists = packages_distributions()
    deps = set(declared())
    # an import name can come from several distributions (mlflow, mlflow-skinny): any counts
    provides = {n: {normalise(d) for d in dists.get(n, [n])} for n in third_party_imports()}
    undeclared = sorted(n for n, names in provides.items() if not names & deps)
    unused = sorted(d for d in deps if not any(d in names for names in provides.values()))
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    assert not unused, f"declared in pyproject.toml but never imported: {unused}"


def test_lock_pins_every_declared_package_and_torch_by_version_only() -> None:
    lines = (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines()
    pins = dict(
        (normalise(name), version)
        for name, version in (line.split("==") for line in lines if line and line[0] != "#")
    )
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.!+]*", v) for v in pins.values()), pins
    assert not set(declared()) - set(pins), "declared but not locked (run `make lock`)"
    assert pins["torch"] == "2.13.0"  # no +cpu: the same lock serves CUDA machines
    assert not [p for p in pins if p.startswith("nvidia-") or p == "triton"]
    constraints = (ROOT / "constraints.txt").read_text(encoding="utf-8")
    assert "torch==2.13.0" in constraints.splitlines()


def test_a_stage_started_without_the_dependencies_stops_with_one_line() -> None:
    """`python -m pipeline.stages.<name>` by an interpreter without site-packages (what DVC
    runs when the venv is not activated): one `error:` line naming it and the fix."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-S", "-m", "pipeline.stages.fetch"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr == (
        f"error: {sys.executable} lacks the project's dependencies (no module 'pandas'): "
        "activate the virtual environment (source .venv/bin/activate) or run through make "
        "(make repro)\n"
    )
