"""One source of truth: the domain constants, what serving imports, and the requirements
derived from it."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import domain
from pipeline.errors import PipelineError
from pipeline.served_requirements import distributions_of, locked_versions, pin
from tests.helpers import ROOT

TRAINING_ONLY = ("lightning", "pandera", "torchmetrics")

IMPORTED = """
import json, sys
before = set(sys.modules)
for name in sys.argv[1:]:
    __import__(name)
print(json.dumps(sorted({m.split(".")[0] for m in set(sys.modules) - before})))
"""


def fresh_imports(*modules: str) -> set[str]:
    """Top-level names of every module a clean interpreter loads to import ``modules``."""
    proc = subprocess.run(
        [sys.executable, "-c", IMPORTED, *modules],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_domain_is_plain_python() -> None:
    loaded = fresh_imports("pipeline.domain") - {"pipeline"}
    assert loaded <= set(sys.stdlib_module_names), loaded - set(sys.stdlib_module_names)


def test_serving_imports_no_training_or_validation_library() -> None:
    """Everything the served model can load: the pyfunc file, the scorer's lazy imports."""
    loaded = fresh_imports(
        "pipeline.served_model",
        "pipeline.serving",
        "pipeline.bag",
        "pipeline.wide_model",
        "pipeline.calibration",
        "pipeline.encoder.collate",
        "pipeline.encoder.inference",
        "pipeline.encoder.model",
    )
    assert {"mlflow", "torch", "sklearn"} <= loaded  # the probe does see third-party imports
    assert not loaded & set(TRAINING_ONLY)


def test_the_training_side_still_imports_them() -> None:
    """The probe above can fail: the datamodule does load Lightning."""
    assert "lightning" in fresh_imports("pipeline.encoder.data")


def test_constants_are_defined_once() -> None:
    """No module but domain.py assigns a domain constant at module level."""
    names = {
        "GROUPS",
        "SPLITS",
        "PREDICTION_SPLITS",
        "SPECIAL_TOKENS",
        "N_SPECIAL",
        "PROB_ATOL",
        "PAD_ID",
        "NUM_CLASSES",
        "N_CLASSES",
        "LOGIT_COLUMNS",
        "PROB_COLUMNS",
    }
    found = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if path.name == "domain.py":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Name) and leaf.id in names:
                        found.append(f"{path.relative_to(ROOT)}: {leaf.id}")
    assert not found


def test_name_patterns_of_params_are_the_domain_pattern() -> None:
    """Params fields keep their literal pattern (their classes are edited elsewhere); they
    must stay the domain's."""
    from pipeline.predictions import MODEL_NAME
    from pipeline.stages.register import RegisterParams
    from pipeline.tracking import TrackingParams

    def pattern(model, field: str) -> str:
        (found,) = [m.pattern for m in model.model_fields[field].metadata if hasattr(m, "pattern")]
        return found

    assert pattern(RegisterParams, "model_name") == domain.NAME_PATTERN
    assert pattern(TrackingParams, "config") == domain.NAME_PATTERN
    assert MODEL_NAME.pattern == domain.NAME_PATTERN


class FakeTokenizer:
    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)


def test_special_token_mismatch_names_the_token() -> None:
    good = {t: i for i, t in enumerate(domain.SPECIAL_TOKENS)}
    assert domain.special_token_mismatch(FakeTokenizer(good)) is None
    swapped = good | {"[CLS]": 3, "[SEP]": 2}
    assert domain.special_token_mismatch(FakeTokenizer(swapped)) == (
        "special token [CLS] has id 3, expected 2"
    )
    missing = {t: i for t, i in good.items() if t != "[MASK]"}
    assert "[MASK] has id None" in domain.special_token_mismatch(FakeTokenizer(missing))


# ------------------------------------------------------------ requirements from imports


def module_file(name: str) -> str:
    return __import__(name, fromlist=["_"]).__file__


def test_modules_map_to_the_distributions_that_installed_them() -> None:
    modules = {
        "yaml": module_file("yaml"),
        "google.protobuf": module_file("google.protobuf"),  # a namespace shared by dists
        "sklearn.svm": module_file("sklearn.svm"),
        "json": module_file("json"),  # standard library
        "pipeline.serving": module_file("pipeline.serving"),  # shipped as code
        "_cython_3_0": None,  # runtime-made, no file
    }
    assert distributions_of(modules) == {"pyyaml", "protobuf", "scikit-learn"}


def test_pins_come_from_the_lock_file(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text(
        "# comment\nPyYAML==1.2.3\ntyping_extensions==9.9\nnumpy==0.1 ; python_version>'3'\n"
    )
    assert locked_versions(lock) == {"pyyaml": "1.2.3", "typing-extensions": "9.9", "numpy": "0.1"}
    assert pin({"typing-extensions", "pyyaml"}, lock) == ["pyyaml==1.2.3", "typing-extensions==9.9"]
    with pytest.raises(
        PipelineError, match="imports pandera, which requirements.lock does not pin"
    ):
        pin({"pyyaml", "pandera"}, lock)
