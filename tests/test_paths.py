"""pipeline/paths.py and dvc.yaml name the same artifacts (YAML cannot import Python)."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline import paths
from tests.helpers import ROOT, dvc_stages


def dvc_outs() -> set[str]:
    found = set()
    for stage in dvc_stages().values():
        for entry in stage.get("outs", []) + stage.get("metrics", []):
            found.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    return found


def module_paths() -> set[str]:
    """Every artifact path pipeline.paths defines, constants and per-stage builders."""
    found = {v.as_posix() for v in vars(paths).values() if isinstance(v, Path)}
    for name in dvc_stages():
        found.add(paths.stage_report(name).as_posix())
        found.add(paths.curves_dir(name).as_posix())
        found.add(paths.predictions_dir(name).as_posix())
        found.add(paths.model_report(name, "${item}").as_posix())
    found.add(paths.calibrator_file("${item}").as_posix())
    found.add(paths.stage_report("data").as_posix())
    found.add(paths.predictions_dir("transformer").as_posix())
    return found


def test_every_dvc_output_is_a_path_of_the_paths_module() -> None:
    missing = dvc_outs() - module_paths()
    assert not missing, f"dvc.yaml outs not defined in pipeline/paths.py: {sorted(missing)}"


def test_every_artifact_constant_is_a_dvc_output_or_inside_one() -> None:
    outs = [Path(o) for o in dvc_outs()]
    parents = {
        paths.DATA,
        paths.MODELS,
        paths.PREDICTIONS,
        paths.CALIBRATORS,
        paths.REPORTS,
        paths.CHECKPOINTS,
    }
    constants = [v for v in vars(paths).values() if isinstance(v, Path) and v not in parents]
    orphans = [c for c in constants if not any(c == o or o in c.parents for o in outs)]
    assert not orphans, f"paths no dvc.yaml stage writes: {orphans}"


def test_dvc_plots_follow_the_model_list() -> None:
    """dvc.yaml's plots name the per-kind folders of evaluate (one file per model inside),
    never a model's own file, so a model added to calibrate.models brings its plots."""
    from pipeline.evaluation import VIEWS

    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["plots"]
    ids = {next(iter(p)) if isinstance(p, dict) else p for p in plots}
    folders = {paths.model_plot(kind, "m").parent.as_posix() for kind in VIEWS}
    assert folders <= ids
    named = " ".join(str(p) for p in plots)
    models = yaml.safe_load((ROOT / "conf/calibrate/default.yaml").read_text())["models"]
    assert not [m for m in models if f"/{m}/" in named or f"/{m}." in named]
