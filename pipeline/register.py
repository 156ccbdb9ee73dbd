"""Stage `register`: log the calibrated classifier as one MLflow pyfunc model and register it.

Reads ``data/tokenizer/tokenizer.json``, ``data/models/classifier/`` and
``data/models/calibrator/transformer.json`` and packs them, with ``serving.json``, into
the pyfunc model of :mod:`pipeline.serving` (raw text in, calibrated probabilities and
the predicted newsgroup out), logged with an input example and a signature in a run
tagged ``stage=register`` and registered under ``register.model_name``.

Output: ``reports/register.json`` (model name, registry version, run id, model URI; a
non-cached, non-metrics DVC out, because the registry numbers a new version on every
registration). With ``tracking.enabled: false`` nothing is logged and the file says so.
"""

from __future__ import annotations

import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline.config import ROOT, Section, load_section, read_params
from pipeline.errors import PipelineError, run_stage
from pipeline.io import atomic_outputs, sha256_file, write_json
from pipeline.model import load_model_files
from pipeline.tracking import StageRun, flatten, mlflow_key

TOKENIZER = Path("data/tokenizer/tokenizer.json")
CLASSIFIER = Path("data/models/classifier")
CALIBRATOR = Path("data/models/calibrator/transformer.json")
REPORT = Path("reports/register.json")
ARTIFACT_NAME = "model"
# What the served model imports; pinned to this venv's versions when logged.
REQUIREMENTS = (
    "mlflow",
    "torch",
    "tokenizers",
    "safetensors",
    "numpy",
    "pandas",
    "pyarrow",
    "pydantic",
    "pyyaml",
    "scikit-learn",
    "lightning",
    "pandera",
)


class RegisterParams(Section):
    """Section ``register`` of params.yaml."""

    model_name: str = Field(default="newsgroups-classifier", pattern=r"^[A-Za-z0-9_.-]+$")
    batch_size: int = Field(default=32, ge=1, le=4096)  # documents per forward pass


def pip_requirements() -> list[str]:
    """Exact versions of this environment (no inference: it would load the model again)."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def check_inputs(tokenizer: Path, classifier: Path, calibrator: Path) -> dict[str, Any]:
    """The classifier's config, after checking every input exists (before any logging)."""
    for path, stage in ((tokenizer, "tokenize"), (calibrator, "calibrate")):
        if not path.is_file():
            raise PipelineError(f"{path}: not found (run the {stage} stage)")
    config, _ = load_model_files(classifier)
    return config


def log_and_register(
    tracking: StageRun,
    params: RegisterParams,
    *,
    tokenizer: Path = TOKENIZER,
    classifier: Path = CLASSIFIER,
    calibrator: Path = CALIBRATOR,
) -> dict[str, Any]:
    """Log the pyfunc model in a ``stage=register`` run and register it; the report."""
    import mlflow
    from mlflow.models import infer_signature

    from pipeline.serving import (
        ARTIFACT_CALIBRATOR,
        ARTIFACT_CLASSIFIER,
        ARTIFACT_SERVING,
        ARTIFACT_TOKENIZER,
        SERVING_FILE,
        NewsgroupsClassifier,
        Scorer,
        input_example,
        predictions_frame,
        serving_config,
    )

    config = serving_config(check_inputs(tokenizer, classifier, calibrator), params.batch_size)
    example = input_example()
    scorer = Scorer.load(tokenizer, classifier, calibrator, config)
    output = predictions_frame(scorer.probabilities(example["text"].tolist()), scorer.groups)
    signature = infer_signature(example, output)
    inputs = {
        "tokenizer": sha256_file(tokenizer),
        "classifier": sha256_file(classifier / "model.safetensors"),
        "calibrator": sha256_file(calibrator),
    }
    section = read_params(tracking.params_path).get("register", {})
    mlflow.set_tracking_uri(tracking.uri)
    with tempfile.TemporaryDirectory() as tmp:
        serving_file = Path(tmp) / SERVING_FILE
        write_json(serving_file, config)
        artifacts = {
            ARTIFACT_TOKENIZER: str(tokenizer),
            ARTIFACT_CLASSIFIER: str(classifier),
            ARTIFACT_CALIBRATOR: str(calibrator),
            ARTIFACT_SERVING: str(serving_file),
        }
        with mlflow.start_run(
            experiment_id=tracking.experiment_id,
            run_name="register",
            tags=tracking.tags(inputs),
        ) as run:
            mlflow.log_params({mlflow_key(k): v for k, v in flatten({"register": section}).items()})
            info = mlflow.pyfunc.log_model(
                name=ARTIFACT_NAME,
                python_model=NewsgroupsClassifier(),
                artifacts=artifacts,
                code_paths=[str(ROOT / "pipeline")],
                pip_requirements=pip_requirements(),
                signature=signature,
                input_example=example,
                registered_model_name=params.model_name,
            )
    registered = info.registered_model_version
    return {
        "model_name": params.model_name,
        "version": int(registered),
        "model_uri": f"models:/{params.model_name}/{registered}",
        "run_id": run.info.run_id,
        "logged_model_uri": info.model_uri,
        "tracking_uri": tracking.uri,
    }


def main() -> None:
    params = load_section("register", RegisterParams)
    tracking = StageRun("register")  # fails here, before any work, when unreachable
    if not tracking.enabled:
        check_inputs(TOKENIZER, CLASSIFIER, CALIBRATOR)
        report: dict[str, Any] = {
            "model_name": params.model_name,
            "registered": False,
            "reason": "tracking.enabled is false",
        }
    else:
        report = {"registered": True, **log_and_register(tracking, params)}
    with atomic_outputs() as out:
        write_json(out.file(REPORT), report)
    if report["registered"]:
        print(
            f"register: {report['model_uri']} (run {report['run_id']}) in {report['tracking_uri']}"
            f"; serve with: mlflow models serve -m {report['model_uri']} --env-manager local"
        )
    else:
        print(f"register: tracking disabled, nothing registered; wrote {REPORT}")


if __name__ == "__main__":
    run_stage(main)
