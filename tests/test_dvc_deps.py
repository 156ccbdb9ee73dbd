"""Each stage's code deps in dvc.yaml are exactly the pipeline modules it imports.

DVC reruns a stage when one of its listed deps changes, so a module a stage imports but
does not list is a change that silently leaves stale outputs. Whole-package deps would
retrain the models on any edit, so the deps are per module, and this test keeps them true.

Left out on purpose (a stage may list them, none has to): modules that cannot change a
stage's outputs.
- ``pipeline/errors.py``: the error type and the one-line error printer;
- ``pipeline/tracking.py`` and ``pipeline/run_keys.py``: MLflow logging (and the names,
  tags and keys of its runs), which runs after the outputs are written and is not a DVC
  param either (except for ``register``, whose output *is* a registration, so it lists
  both).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import ROOT, dvc_stages

PACKAGE = "pipeline"
NEVER_CHANGE_OUTPUTS = {
    "pipeline/errors.py",
    "pipeline/tracking.py",
    "pipeline/run_keys.py",
    "pipeline/run_artifacts.py",
    "pipeline/parent_run.py",
    "pipeline/output_digests.py",
    "pipeline/mlflow_datasets.py",
    "pipeline/system_metrics.py",
}
# Code a stage loads as a file rather than importing (MLflow "models from code").
LOADED_AS_FILES = {"register": {"pipeline/served_model.py"}}


def imported_modules(path: Path) -> set[str]:
    """Project modules a file imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] == PACKAGE}
    return found


def module_file(name: str) -> Path | None:
    """``pipeline.x`` -> pipeline/x.py (or a package's __init__.py); None if not a module."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_closure(module: str) -> set[str]:
    """Repo-relative files of ``module`` and of every project module it reaches."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += sorted(imported_modules(path))
    return {p.relative_to(ROOT).as_posix() for p in seen if p.name != "__init__.py"}


def stages() -> dict[str, dict]:
    return dvc_stages()


def test_import_closure_follows_function_level_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "import os\nfrom pipeline.io import x\n"
        "def f():\n    from pipeline import metrics\n    import pipeline.plots\n"
    )
    assert imported_modules(source) >= {"pipeline.io", "pipeline.metrics", "pipeline.plots"}
    assert "pipeline/metrics.py" in import_closure("pipeline.stages.calibrate")


def test_every_stage_lists_exactly_the_code_it_imports() -> None:
    problems = []
    for name, stage in stages().items():
        match = re.fullmatch(r"python -m (pipeline\.stages\.\w+)( \$\{item\})?", stage["cmd"])
        assert match, f"{name}: cmd {stage['cmd']!r} is not `python -m pipeline.stages.<stage>`"
        closure = import_closure(match.group(1))
        for loaded in LOADED_AS_FILES.get(name, ()):
            closure |= import_closure(loaded.removesuffix(".py").replace("/", "."))
        listed = {d for d in stage["deps"] if d.startswith(f"{PACKAGE}/")}
        missing = closure - listed - NEVER_CHANGE_OUTPUTS
        stale = listed - closure
        if missing:
            problems.append(f"{name}: imports but does not list {sorted(missing)}")
        if stale:
            problems.append(f"{name}: lists but never imports {sorted(stale)}")
    assert not problems, "\n".join(problems)


def test_display_only_trainer_keys_are_no_dvc_params() -> None:
    """Toggling the progress bar must not retrain the models: the training stages list
    every other ``trainer`` key, one by one."""
    from pipeline.encoder.params import DISPLAY_ONLY, TrainerParams

    expected = {f"trainer.{k}" for k in TrainerParams.model_fields} - {
        f"trainer.{k}" for k in DISPLAY_ONLY
    }
    for name in ("pretrain", "finetune"):
        listed = {p for p in stages()[name]["params"] if str(p).startswith("trainer")}
        assert listed == expected, (name, sorted(listed ^ expected))


def test_only_headline_numbers_are_dvc_metrics() -> None:
    """`dvc metrics show` / `dvc exp show` read only reports/metrics.json; every other
    report is a plain output, committed (cache: false) and kept by a failed run."""
    metrics, reports = [], []
    for stage in stages().values():
        for entry in stage.get("metrics", []):
            metrics += list(entry)
        for out in stage.get("outs", []):
            if isinstance(out, dict):
                (path, options), *_ = out.items()
                if path.startswith("reports/"):
                    reports.append(path)
                    assert options == {"cache": False, "persist": True}, path
    assert metrics == ["reports/metrics.json"]
    assert {"reports/data.json", "reports/metrics_detail.json", "reports/figures"} <= set(reports)
