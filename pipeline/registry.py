"""Logging the served model to MLflow and registering it as a described, aliased version.

The model is logged as code (:mod:`pipeline.served_model`, MLflow "models from code": no
pickle) with the pipeline's files as artifacts (:class:`pipeline.serving.ServedFiles` plus
``serving.json``), an input example, a signature and the pip requirements of what it
imports (:mod:`pipeline.served_requirements`). The registry version then gets a
description, tags (commit, config, DVC experiment, calibration, test metrics) and an alias.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import ModelSignature, infer_signature
from mlflow.models.model import ModelInfo
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

from pipeline import paths
from pipeline.config import ROOT
from pipeline.encoder.model import load_model_files
from pipeline.errors import PipelineError
from pipeline.io import sha256_file, write_json
from pipeline.predictions import read_documents
from pipeline.served_requirements import pip_requirements
from pipeline.served_sets import LEVEL_PARAM, SERVING_KEYS, SET_COLUMN
from pipeline.serving import (
    ARTIFACT_BLEND,
    ARTIFACT_CALIBRATOR,
    ARTIFACT_CLASSIFIER,
    ARTIFACT_SERVING,
    ARTIFACT_TOKENIZER,
    ARTIFACT_WIDE,
    SERVING_FILE,
    Scorer,
    ServedFiles,
    input_example,
    input_signature,
    predictions_frame,
    read_blend,
)

SERVED = "blend"  # the model of reports/metrics.json that is served
ARTIFACT_NAME = "model"
MODEL_CODE = ROOT / "pipeline" / "served_model.py"
THROUGHPUT_DOCS = 256  # test posts scored to measure documents/second
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
MODEL_DESCRIPTION = (
    "20 Newsgroups classifier: the pipeline's calibrated blend of a small transformer encoder "
    "and a linear bag-of-tokens model (newsgroups-pipeline). Input: a table with a `text` "
    "column of raw posts; output: predicted_label, predicted_id, confidence and 20 calibrated "
    "prob_<group> columns, plus prediction_set (a conformal set of groups) when the request "
    "sets the param set_level. Each version's description and tags give its commit, config and "
    "test metrics; the alias `candidate` is the latest registration."
)


@dataclass(frozen=True)
class Version:
    """What a new registry version says about itself.

    Attributes:
        name: The registered model's name.
        tags: Version tags; empty values are not set.
        description: The version's description.
        metrics: Test metrics, logged on the logged model.
    """

    name: str
    tags: dict[str, str]
    description: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class LoggedModel:
    """A pyfunc model logged in a run and registered.

    Attributes:
        info: MLflow's description of the logged model.
        run_id: The run it was logged in.
        served: Its size on disk, load time and throughput (:func:`measure`).
    """

    info: ModelInfo
    run_id: str
    served: dict[str, float]


def registered_name(model_name: str, production: bool, config: str) -> str:
    """The registry name: ``model_name`` for production, else ``<model_name>-<config>``."""
    return model_name if production else f"{model_name}-{config}"


def served_metrics(path: Path = paths.METRICS) -> dict[str, float]:
    """The served model's test numbers: the calibrated blend of ``reports/metrics.json``.

    Returns:
        ``test_accuracy``, ``test_ece`` and ``test_nll``.

    Raises:
        PipelineError: The file is missing or has no such numbers.
    """
    try:
        calibrated = json.loads(path.read_text(encoding="utf-8"))[SERVED]["calibrated"]
        return {f"test_{k}": float(calibrated[k]) for k in ("accuracy", "ece", "nll")}
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found (run `dvc repro evaluate` first)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise PipelineError(
            f"{path}: no calibrated {SERVED} accuracy/ece/nll ({type(exc).__name__}: {exc})"
        ) from None


def check_inputs(files: ServedFiles) -> dict[str, Any]:
    """The classifier's config, after checking that every served file exists.

    Raises:
        PipelineError: A file is missing or unreadable; the message names its stage.
    """
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
    docs = read_documents(columns=("id", "split", "text"))
    return docs[docs["split"] == "test"].sort_values("id")["text"].head(n).tolist()


def input_digests(files: ServedFiles) -> dict[str, str]:
    """SHA-256 of each served file (of the weights file for model folders)."""
    return {
        "tokenizer": sha256_file(files.tokenizer),
        "classifier": sha256_file(files.classifier / "model.safetensors"),
        "wide": sha256_file(files.wide / "wide.safetensors"),
        "blend": sha256_file(files.blend),
        "calibrator": sha256_file(files.calibrator),
    }


def calibration_method(files: ServedFiles) -> str:
    """The method of the served calibrator."""
    return json.loads(files.calibrator.read_text(encoding="utf-8"))["method"]


@contextlib.contextmanager
def quiet_model_logging() -> Iterator[None]:
    """Without MLflow's hint that integer columns cannot hold missing values (the served
    output's ``predicted_id`` never misses) and its per-file download progress bars."""
    previous = os.environ.get(PROGRESS_BAR_ENV)
    os.environ[PROGRESS_BAR_ENV] = "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message=r"Hint: Inferred schema contains integer column",
                category=UserWarning,
            )
            yield
    finally:
        if previous is None:
            del os.environ[PROGRESS_BAR_ENV]
        else:
            os.environ[PROGRESS_BAR_ENV] = previous


def served_signature(scorer: Scorer) -> ModelSignature:
    """The declared input schema, the outputs inferred from scoring the input example plus
    the optional :data:`SET_COLUMN` (class names), and the inference param
    :data:`LEVEL_PARAM` (a double; its default, null, means no sets)."""
    example = input_example()
    output = predictions_frame(scorer.probabilities(example["text"].tolist()), scorer.groups)
    with quiet_model_logging():
        inferred = infer_signature(example, output).outputs
    outputs = Schema(
        [*inferred.inputs, ColSpec(Array(DataType.string), SET_COLUMN, required=False)]
    )
    params = ParamSchema([ParamSpec(LEVEL_PARAM, DataType.double, None)])
    return ModelSignature(input_signature(), outputs, params)


def version_tags(
    stage_tags: dict[str, str],
    calibration: str,
    metrics: dict[str, float],
    config: dict[str, Any] | None = None,
) -> dict[str, str]:
    """A version's tags, from the stage run's tags, the calibration method, test metrics and
    the served sets' method and variant of ``serving.json`` (``config``)."""
    return {
        "git_commit": stage_tags["mlflow.source.git.commit"],
        "config": stage_tags["config"],
        "dvc_exp_name": stage_tags.get("dvc_exp_name", ""),
        "pipeline_run": stage_tags["pipeline_run"],
        "calibration": calibration,
        **{k: f"{v:.4f}" for k, v in metrics.items()},
        **{k: str(config[k]) for k in SERVING_KEYS if config and k in config},
    }


def version_description(
    name: str, metrics: dict[str, float], tags: dict[str, str], weights: dict[str, float]
) -> str:
    """What a registry version is, in two lines a reader of the registry page can trust."""
    blend = " + ".join(f"{w:.3g} x {m}" for m, w in weights.items())
    exp = f", DVC experiment {tags['dvc_exp_name']}" if tags.get("dvc_exp_name") else ""
    return (
        f"{name}: the calibrated blend of the newsgroups pipeline ({blend}; calibration "
        f"{tags['calibration']}). Test split: accuracy {metrics['test_accuracy']:.4f}, ECE "
        f"{metrics['test_ece']:.4f}, NLL {metrics['test_nll']:.4f} (fractions, nats).\n"
        f"Commit {tags['git_commit'][:12]}, config {tags['config']}{exp}. Raw text in "
        "(column `text`), calibrated probabilities of the 20 groups out."
    )


def folder_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def measure(model_uri: str, texts: list[str]) -> dict[str, float]:
    """Size on disk, load time and documents/second of the logged model, on this CPU."""
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


def artifact_paths(files: ServedFiles, serving_file: Path) -> dict[str, str]:
    """The artifacts dict of ``log_model``: every served file by its artifact key."""
    return {
        ARTIFACT_TOKENIZER: str(files.tokenizer),
        ARTIFACT_CLASSIFIER: str(files.classifier),
        ARTIFACT_WIDE: str(files.wide),
        ARTIFACT_BLEND: str(files.blend),
        ARTIFACT_CALIBRATOR: str(files.calibrator),
        ARTIFACT_SERVING: str(serving_file),
    }


def log_served_model(
    uri: str,
    run_id: str | None,
    files: ServedFiles,
    config: dict[str, Any],
    signature: ModelSignature,
    version: Version,
    texts: list[str],
) -> LoggedModel:
    """Log the pyfunc model in run ``run_id`` and register it under ``version.name``.

    Args:
        uri: The tracking URI.
        run_id: The stage's run.
        files: The served files, logged as artifacts.
        config: The content of ``serving.json``.
        signature: The model's signature (:func:`served_signature`).
        version: Name, tags and test metrics of the new version.
        texts: Posts to measure the logged model on (:func:`measure`).

    Returns:
        The logged model; its measured size, load time and throughput are also logged as
        ``register/served_*`` metrics of the run, its test metrics on the logged model.
    """
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        serving_file = Path(tmp) / SERVING_FILE
        write_json(serving_file, config)
        artifacts = artifact_paths(files, serving_file)
        with quiet_model_logging(), mlflow.start_run(run_id=run_id) as run:
            info = mlflow.pyfunc.log_model(
                name=ARTIFACT_NAME,
                python_model=str(MODEL_CODE),
                artifacts=artifacts,
                code_paths=[str(ROOT / "pipeline")],
                pip_requirements=pip_requirements(artifacts),
                signature=signature,
                input_example=input_example(),
                registered_model_name=version.name,
                tags={"config": version.tags["config"], "calibration": version.tags["calibration"]},
            )
            mlflow.log_metrics(version.metrics, model_id=info.model_id)
            served = measure(info.model_uri, texts)
            timings = {k: v for k, v in served.items() if k != "throughput_documents"}
            mlflow.log_metrics({f"register/served_{k}": v for k, v in timings.items()})
    return LoggedModel(info, run.info.run_id, served)


def describe_version(uri: str, version: Version, logged: LoggedModel, alias: str) -> int:
    """Set the new version's description and tags, move ``alias`` to it, and describe the
    registered model if it has no description yet; returns the version number."""
    number = str(logged.info.registered_model_version)
    client = MlflowClient(tracking_uri=uri)
    client.update_model_version(version.name, number, description=version.description)
    for key, value in version.tags.items():
        if value:
            client.set_model_version_tag(version.name, number, key, value)
    client.set_registered_model_alias(version.name, alias, number)
    if not client.get_registered_model(version.name).description:
        client.update_registered_model(version.name, description=MODEL_DESCRIPTION)
    return int(number)
