"""pipeline/paths.py and dvc.yaml name the same artifacts (YAML cannot import Python)."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline import paths
from tests.helpers import ROOT


def dvc_outs() -> set[str]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    found = set()
    for stage in stages.values():
        for entry in stage.get("outs", []) + stage.get("metrics", []):
            found.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    return found


def module_paths() -> set[str]:
    """Every artifact path pipeline.paths defines, constants and per-stage builders."""
    found = {v.as_posix() for v in vars(paths).values() if isinstance(v, Path)}
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for name in stages:
        found.add(paths.stage_report(name).as_posix())
        found.add(paths.curves_dir(name).as_posix())
        found.add(paths.predictions_dir(name).as_posix())
    found.add(paths.stage_report("data").as_posix())
    found.add(paths.predictions_dir("transformer").as_posix())
    return found


def test_every_dvc_output_is_a_path_of_the_paths_module() -> None:
    missing = dvc_outs() - module_paths()
    assert not missing, f"dvc.yaml outs not defined in pipeline/paths.py: {sorted(missing)}"


def test_every_artifact_constant_is_a_dvc_output_or_inside_one() -> None:
    outs = [Path(o) for o in dvc_outs()]
    parents = {paths.DATA, paths.MODELS, paths.PREDICTIONS, paths.REPORTS, paths.CHECKPOINTS}
    constants = [v for v in vars(paths).values() if isinstance(v, Path) and v not in parents]
    orphans = [c for c in constants if not any(c == o or o in c.parents for o in outs)]
    assert not orphans, f"paths no dvc.yaml stage writes: {orphans}"
