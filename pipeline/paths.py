"""Where every artifact of the pipeline lives: the one definition of the paths.

Paths are relative to the project root, the working directory of every stage (DVC runs
each ``cmd`` there). dvc.yaml names the same paths as deps and outs (YAML cannot import
Python); ``tests/test_paths.py`` checks that the two agree.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
RAW = DATA / "raw"
DOCUMENTS = RAW / "documents.parquet"
TOKENIZER_DIR = DATA / "tokenizer"
TOKENIZER = TOKENIZER_DIR / "tokenizer.json"
TOKENIZED = DATA / "tokenized"
MODELS = DATA / "models"
PRETRAINED = MODELS / "pretrained"
CLASSIFIER = MODELS / "classifier"
WIDE = MODELS / "wide"
BLEND = MODELS / "blend"
BLEND_FILE = BLEND / "blend.json"
CALIBRATORS = MODELS / "calibrator"
PREDICTIONS = DATA / "predictions"
PREDICTIONS_FILE = "predictions.parquet"

REPORTS = Path("reports")
METRICS = REPORTS / "metrics.json"
METRICS_DETAIL = REPORTS / "metrics_detail.json"
PLOTS = REPORTS / "plots"
FIGURES = REPORTS / "figures"
REPORT_MD = REPORTS / "report.md"
RISK_COVERAGE = PLOTS / "risk_coverage.json"

CHECKPOINTS = Path(".checkpoints")  # resumable training state, git- and DVC-ignored


def predictions_dir(model: str) -> Path:
    """The folder a model stage writes its predictions table into (a DVC out)."""
    return PREDICTIONS / model


def calibrator_file(model: str) -> Path:
    """The fitted calibrator of one model, written by ``calibrate``."""
    return CALIBRATORS / f"{model}.json"


def stage_report(stage: str) -> Path:
    """A stage's committed JSON report, ``reports/<stage>.json``."""
    return REPORTS / f"{stage}.json"


def model_report(stage: str, model: str) -> Path:
    """The report of one model's run of a per-model stage, ``reports/<stage>/<model>.json``."""
    return REPORTS / stage / f"{model}.json"


def model_plot(kind: str, model: str) -> Path:
    """One model's DVC plot data of one kind, ``reports/plots/<kind>/<model>.json``: one
    folder per kind, so dvc.yaml's plots section follows the model list by itself."""
    return PLOTS / kind / f"{model}.json"


def curves_dir(stage: str) -> Path:
    """A training stage's loss curves (CSV for DVC plots), ``reports/<stage>/``."""
    return REPORTS / stage
