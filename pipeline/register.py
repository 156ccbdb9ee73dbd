"""Stage `register`: log the calibrated blend as one MLflow pyfunc model and register it.

Reads ``data/tokenizer/tokenizer.json``, ``data/models/classifier/`` (the encoder),
``data/models/wide/`` (the linear bag model), ``data/models/blend/blend.json`` (their
weights) and ``data/models/calibrator/blend.json`` (the blend's calibrator) and packs
them, with ``serving.json``, into the pyfunc model of :mod:`pipeline.serving` (raw text in,
calibrated probabilities and the predicted newsgroup out). The model is logged as code
(:mod:`pipeline.served_model`, MLflow "models from code": no pickle), with an input
example, a signature and requirements pinned to ``requirements.lock``, in a run tagged
``stage=register``, and registered under ``register.model_name``.

Output: ``reports/register.json`` (model name, registry version, run id, model URI, and
the served model's size on disk, load time and documents per second on this machine's
CPU, measured on test posts; a non-cached, non-metrics DVC out, because the registry
numbers a new version on every registration). With ``tracking.enabled: false`` nothing is
logged and the file says so.
"""

from __future__ import annotations

import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import Field

from pipeline.config import ROOT, Section, load_section, read_params
from pipeline.errors import PipelineError, run_stage
from pipeline.io import atomic_outputs, sha256_file, write_json
from pipeline.model import load_model_files
from pipeline.predictions import DOCUMENTS
from pipeline.serving import ServedFiles
from pipeline.tracking import StageRun, flatten, mlflow_key

FILES = ServedFiles(
    tokenizer=Path("data/tokenizer/tokenizer.json"),
    classifier=Path("data/models/classifier"),
    wide=Path("data/models/wide"),
    blend=Path("data/models/blend/blend.json"),
    calibrator=Path("data/models/calibrator/blend.json"),
)
REPORT = Path("reports/register.json")
LOCK_FILE = ROOT / "requirements.lock"
ARTIFACT_NAME = "model"
MODEL_CODE = ROOT / "pipeline" / "served_model.py"
# What the served model imports; pinned to requirements.lock's versions when logged.
REQUIREMENTS = (
    "mlflow",
    "torch",
    "tokenizers",
    "safetensors",
    "numpy",
    "scipy",
    "pandas",
    "pyarrow",
    "pydantic",
    "pyyaml",
    "scikit-learn",
    "lightning",
    "torchmetrics",
    "pandera",
)
THROUGHPUT_DOCS = 256  # test posts scored to measure documents/second


class RegisterParams(Section):
    """Section ``register`` of params.yaml."""

    model_name: str = Field(default="newsgroups-classifier", pattern=r"^[A-Za-z0-9_.-]+$")
    batch_size: int = Field(default=32, ge=1, le=4096)  # documents per forward pass


def locked_versions(lock: Path = LOCK_FILE) -> dict[str, str]:
    """``name -> version`` from requirements.lock (names normalised as pip does)."""
    versions = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#") and "==" in line:
            name, ver = line.split("==", 1)
            versions[name.strip().lower().replace("_", "-")] = ver.strip()
    return versions


def pip_requirements(lock: Path = LOCK_FILE) -> list[str]:
    """The served model's requirements at the lock file's versions (this environment's
    version for a package the lock does not list, e.g. in a development install)."""
    locked = locked_versions(lock) if lock.is_file() else {}
    pins = []
    for name in REQUIREMENTS:
        pinned = locked.get(name)
        if pinned is None:
            try:
                pinned = version(name).split("+")[0]
            except PackageNotFoundError:
                pins.append(name)
                continue
        pins.append(f"{name}=={pinned}")
    return pins


def check_inputs(files: ServedFiles) -> dict[str, Any]:
    """The classifier's config, after checking every input exists (before any logging)."""
    from pipeline.serving import read_blend

    for path, stage in (
        (files.tokenizer, "tokenize"),
        (files.calibrator, "calibrate"),
        (files.blend, "blend"),
    ):
        if not path.is_file():
            raise PipelineError(f"{path}: not found (run the {stage} stage)")
    read_blend(files.blend)
    config, _ = load_model_files(files.classifier)
    return config


def sample_texts(n: int = THROUGHPUT_DOCS) -> list[str]:
    """The first ``n`` test posts by id, to time the served model on real input."""
    if not DOCUMENTS.is_file():
        raise PipelineError(f"{DOCUMENTS}: not found (run `dvc repro fetch` first)")
    docs = pd.read_parquet(DOCUMENTS, columns=["id", "split", "text"])
    return docs[docs["split"] == "test"].sort_values("id")["text"].head(n).tolist()


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def measure(model_uri: str, texts: list[str]) -> dict[str, float]:
    """Size on disk, load time and documents/second of the logged model, on this CPU."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    start = time.perf_counter()
    model = mlflow.pyfunc.load_model(str(local))
    load_seconds = time.perf_counter() - start
    frame = pd.DataFrame({"text": pd.Series(texts, dtype=object)})
    start = time.perf_counter()
    model.predict(frame)
    seconds = time.perf_counter() - start
    return {
        "size_mb": round(folder_bytes(local) / 2**20, 1),
        "load_seconds": round(load_seconds, 2),
        "documents_per_second": round(len(texts) / seconds, 1),
        "throughput_documents": len(texts),
    }


def log_and_register(
    tracking: StageRun, params: RegisterParams, files: ServedFiles = FILES
) -> dict[str, Any]:
    """Log the pyfunc model in a ``stage=register`` run and register it; the report."""
    import mlflow
    from mlflow.models import ModelSignature, infer_signature

    from pipeline.serving import (
        ARTIFACT_BLEND,
        ARTIFACT_CALIBRATOR,
        ARTIFACT_CLASSIFIER,
        ARTIFACT_SERVING,
        ARTIFACT_TOKENIZER,
        ARTIFACT_WIDE,
        SERVING_FILE,
        Scorer,
        input_example,
        input_signature,
        predictions_frame,
        serving_config,
    )

    config = serving_config(check_inputs(files), params.batch_size)
    texts = sample_texts()
    example = input_example()
    scorer = Scorer.load(files, config)
    output = predictions_frame(scorer.probabilities(example["text"].tolist()), scorer.groups)
    signature = ModelSignature(input_signature(), infer_signature(example, output).outputs)
    inputs = {
        "tokenizer": sha256_file(files.tokenizer),
        "classifier": sha256_file(files.classifier / "model.safetensors"),
        "wide": sha256_file(files.wide / "wide.safetensors"),
        "blend": sha256_file(files.blend),
        "calibrator": sha256_file(files.calibrator),
    }
    section = read_params(tracking.params_path).get("register", {})
    mlflow.set_tracking_uri(tracking.uri)
    with tempfile.TemporaryDirectory() as tmp:
        serving_file = Path(tmp) / SERVING_FILE
        write_json(serving_file, config)
        artifacts = {
            ARTIFACT_TOKENIZER: str(files.tokenizer),
            ARTIFACT_CLASSIFIER: str(files.classifier),
            ARTIFACT_WIDE: str(files.wide),
            ARTIFACT_BLEND: str(files.blend),
            ARTIFACT_CALIBRATOR: str(files.calibrator),
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
                python_model=str(MODEL_CODE),
                artifacts=artifacts,
                code_paths=[str(ROOT / "pipeline")],
                pip_requirements=pip_requirements(),
                signature=signature,
                input_example=example,
                registered_model_name=params.model_name,
            )
            served = measure(info.model_uri, texts)
            mlflow.log_metrics({f"serving_{k}": v for k, v in served.items()})
    registered = info.registered_model_version
    return {
        "model_name": params.model_name,
        "version": int(registered),
        "model_uri": f"models:/{params.model_name}/{registered}",
        "run_id": run.info.run_id,
        "logged_model_uri": info.model_uri,
        "tracking_uri": tracking.uri,
        "served": served,
    }


def main() -> None:
    params = load_section("register", RegisterParams)
    tracking = StageRun("register")  # fails here, before any work, when unreachable
    if not tracking.enabled:
        check_inputs(FILES)
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
        served = report["served"]
        print(
            f"register: {report['model_uri']} (run {report['run_id']}) in {report['tracking_uri']}"
            f"; {served['size_mb']} MB, loads in {served['load_seconds']} s, "
            f"{served['documents_per_second']} documents/s; serve with: mlflow models serve -m "
            f"{report['model_uri']} --env-manager local"
        )
    else:
        print(f"register: tracking disabled, nothing registered; wrote {REPORT}")


if __name__ == "__main__":
    run_stage(main)
