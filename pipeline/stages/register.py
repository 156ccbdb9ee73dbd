"""Stage `register`: log the calibrated blend as one MLflow pyfunc model and register it.

Reads ``data/tokenizer/tokenizer.json``, ``data/models/classifier/`` (the encoder),
``data/models/wide/`` (the linear bag model), ``data/models/blend/blend.json`` (their
weights) and ``data/models/calibrator/blend.json`` (the blend's calibrator) and packs
them, with ``serving.json``, into the pyfunc model of :mod:`pipeline.serving` (raw text in,
calibrated probabilities and the predicted newsgroup out). The model is logged as code
(:mod:`pipeline.served_model`, MLflow "models from code": no pickle), with an input
example, a signature and the requirements of what it imports, pinned to
``requirements.lock`` (:mod:`pipeline.served_requirements`), in a run tagged
``stage=register``, and registered under ``register.model_name`` (the production name)
when ``register.production`` is true, else under ``<model_name>-<tracking.config>``
(``newsgroups-classifier-smoke``): a smoke run never becomes a version of the production
model. The version says what it is: a description, tags (git commit, DVC experiment,
config, calibration, test accuracy/ECE/NLL of the calibrated blend from
``reports/metrics.json``), the same test metrics on the logged model, and the alias
``register.alias`` (``candidate``), which the README serves by.

Output: ``reports/register.json`` (model name, registry version, run id, model URI, and
the served model's size on disk, load time and documents per second on this machine's
CPU, measured on test posts; a non-cached, non-metrics DVC out, because the registry
numbers a new version on every registration). With ``tracking.enabled: false`` nothing is
logged and the file says so.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import Field

from pipeline import paths
from pipeline.config import ROOT, Section, load_section
from pipeline.domain import NAME_PATTERN
from pipeline.encoder.model import load_model_files
from pipeline.errors import PipelineError, run_stage
from pipeline.io import atomic_outputs, sha256_file, write_json
from pipeline.predictions import read_documents
from pipeline.served_requirements import pip_requirements
from pipeline.serving import ServedFiles
from pipeline.tracking import StageRun

FILES = ServedFiles(
    tokenizer=paths.TOKENIZER,
    classifier=paths.CLASSIFIER,
    wide=paths.WIDE,
    blend=paths.BLEND_FILE,
    calibrator=paths.calibrator_file("blend"),
)
SERVED = "blend"  # the model of reports/metrics.json this stage serves
ARTIFACT_NAME = "model"
MODEL_CODE = ROOT / "pipeline" / "served_model.py"
THROUGHPUT_DOCS = 256  # test posts scored to measure documents/second


class RegisterParams(Section):
    """Section ``register`` of params.yaml."""

    model_name: str = Field(
        pattern=NAME_PATTERN, description="The production name in the model registry."
    )
    production: bool = Field(
        description="false: register as <model_name>-<tracking.config> instead, so a toy run "
        "never becomes a version of the production model."
    )
    alias: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$", description="Alias moved to every new version."
    )
    batch_size: int = Field(
        ge=1,
        le=4096,
        description="Documents per forward pass when the served model scores a request or a file.",
    )


def registered_name(params: RegisterParams, config: str) -> str:
    """The registry name: the production name only for production registrations."""
    return params.model_name if params.production else f"{params.model_name}-{config}"


def served_metrics(path: Path = paths.METRICS) -> dict[str, float]:
    """The served model's test numbers: the calibrated blend of ``reports/metrics.json``."""
    import json

    try:
        calibrated = json.loads(path.read_text(encoding="utf-8"))[SERVED]["calibrated"]
        return {f"test_{k}": float(calibrated[k]) for k in ("accuracy", "ece", "nll")}
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found (run `dvc repro evaluate` first)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise PipelineError(
            f"{path}: no calibrated {SERVED} accuracy/ece/nll ({type(exc).__name__}: {exc})"
        ) from None


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
    docs = read_documents(columns=("id", "split", "text"))
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
    """Log the pyfunc model in the stage's run (``stage=register``), register it with a
    description, tags, metrics and an alias; the report."""
    import json

    import mlflow
    from mlflow import MlflowClient
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
        read_blend,
        serving_config,
    )

    config = serving_config(check_inputs(files), params.batch_size)
    test_metrics = served_metrics()
    texts = sample_texts()
    example = input_example()
    scorer = Scorer.load(files, config)
    output = predictions_frame(scorer.probabilities(example["text"].tolist()), scorer.groups)
    with quiet_model_logging():
        signature = ModelSignature(input_signature(), infer_signature(example, output).outputs)
    inputs = {
        "tokenizer": sha256_file(files.tokenizer),
        "classifier": sha256_file(files.classifier / "model.safetensors"),
        "wide": sha256_file(files.wide / "wide.safetensors"),
        "blend": sha256_file(files.blend),
        "calibrator": sha256_file(files.calibrator),
    }
    name = registered_name(params, tracking.params.config)
    stage_tags = tracking.tags()
    calibration = json.loads(files.calibrator.read_text(encoding="utf-8"))["method"]
    version_tags = {
        "git_commit": stage_tags["mlflow.source.git.commit"],
        "config": stage_tags["config"],
        "dvc_exp_name": stage_tags.get("dvc_exp_name", ""),
        "pipeline_run": stage_tags["pipeline_run"],
        "calibration": calibration,
        **{k: f"{v:.4f}" for k, v in test_metrics.items()},
    }
    description = version_description(name, test_metrics, version_tags, read_blend(files.blend))
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
        with quiet_model_logging(), mlflow.start_run(run_id=tracking.run_id) as run:
            info = mlflow.pyfunc.log_model(
                name=ARTIFACT_NAME,
                python_model=str(MODEL_CODE),
                artifacts=artifacts,
                code_paths=[str(ROOT / "pipeline")],
                pip_requirements=pip_requirements(artifacts),
                signature=signature,
                input_example=example,
                registered_model_name=name,
                tags={"config": version_tags["config"], "calibration": calibration},
            )
            # On the logged model (its page shows them) and on this run.
            mlflow.log_metrics(test_metrics, model_id=info.model_id)
            served = measure(info.model_uri, texts)
            timings = {k: v for k, v in served.items() if k != "throughput_documents"}
            mlflow.log_metrics({f"register/served_{k}": v for k, v in timings.items()})
    version = str(info.registered_model_version)
    client = MlflowClient(tracking_uri=tracking.uri)
    client.update_model_version(name, version, description=description)
    for key, value in version_tags.items():
        if value:
            client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, params.alias, version)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=MODEL_DESCRIPTION)
    return {
        "model_name": name,
        "version": int(version),
        "alias": params.alias,
        "model_uri": f"models:/{name}/{version}",
        "alias_uri": f"models:/{name}@{params.alias}",
        "run_id": run.info.run_id,
        "logged_model_uri": info.model_uri,
        "tracking_uri": tracking.uri,
        "test": test_metrics,
        "served": served,
        "inputs": inputs,
    }


MODEL_DESCRIPTION = (
    "20 Newsgroups classifier: the pipeline's calibrated blend of a small transformer encoder "
    "and a linear bag-of-tokens model (newsgroups-pipeline). Input: a table with a `text` "
    "column of raw posts; output: predicted_label, predicted_id, confidence and 20 calibrated "
    "prob_<group> columns. Each version's description and tags give its commit, config and "
    "test metrics; the alias `candidate` is the latest registration."
)


@contextlib.contextmanager
def quiet_model_logging() -> Iterator[None]:
    """Without MLflow's hint that integer columns cannot hold missing values (the served
    output's ``predicted_id`` never misses) and its per-file download progress bars."""
    import warnings

    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
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
            del os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"]
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous


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
        inputs = {}
    else:
        report = {"registered": True, **log_and_register(tracking, params)}
        inputs = report.pop("inputs")  # digests: tags of the run, not part of the report
    with atomic_outputs() as out:
        write_json(out.file(paths.stage_report("register")), report)
    if report["registered"]:
        tracking.finish(
            ["register"],
            report={
                **{k: report[k] for k in ("model_name", "version", "alias")},
                "throughput_documents": report["served"]["throughput_documents"],
            },
            artifacts=[paths.stage_report("register")],
            inputs=inputs,
        )
        served = report["served"]
        print(
            f"register: {report['model_uri']} = {report['alias_uri']} (run {report['run_id']}) "
            f"in {report['tracking_uri']}; {served['size_mb']} MB, loads in "
            f"{served['load_seconds']} s, {served['documents_per_second']} documents/s; serve "
            f"with: mlflow models serve -m {report['alias_uri']} --env-manager local"
        )
    else:
        print(
            "register: tracking disabled, nothing registered; wrote "
            f"{paths.stage_report('register')}"
        )


if __name__ == "__main__":
    run_stage(main)
