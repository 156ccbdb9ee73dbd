"""Stage `register`: log the calibrated blend as one MLflow pyfunc model and register it.

Reads ``data/tokenizer/tokenizer.json``, ``data/models/classifier/`` (the encoder),
``data/models/wide/`` (the linear bag model), ``data/models/blend/blend.json`` (their
weights), ``data/models/calibrator/blend.json`` (the blend's calibrator) and the blend's
test metrics in ``reports/metrics.json``, and logs them as the pyfunc model of
:mod:`pipeline.serving` (raw text in, calibrated probabilities and the predicted newsgroup
out; see :mod:`pipeline.registry`) in a run tagged ``stage=register``. The model is
registered under ``register.model_name`` when ``register.production`` is true, else under
``<model_name>-<tracking.config>``, with a description, tags, the test metrics and the
alias ``register.alias``.

Output: ``reports/register.json`` (model name, registry version, run id, model URI, and
the served model's size on disk, load time and documents per second on this machine's
CPU, measured on test posts; a non-cached, non-metrics DVC out, because the registry
numbers a new version on every registration). With ``tracking.enabled: false`` nothing is
logged and the file says so.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pipeline import paths
from pipeline.config import load_section
from pipeline.domain import NAME_PATTERN
from pipeline.errors import run_stage
from pipeline.io import atomic_outputs, write_json
from pipeline.registry import (
    Version,
    calibration_method,
    check_inputs,
    describe_version,
    input_digests,
    log_served_model,
    registered_name,
    sample_texts,
    served_metrics,
    served_signature,
    version_description,
    version_tags,
)
from pipeline.serving import Scorer, ServedFiles, read_blend, serving_config
from pipeline.set_params import SetChoice
from pipeline.tracking import StageRun

FILES = ServedFiles(
    tokenizer=paths.TOKENIZER,
    classifier=paths.CLASSIFIER,
    wide=paths.WIDE,
    blend=paths.BLEND_FILE,
    calibrator=paths.calibrator_file("blend"),
)
REPORT = paths.stage_report("register")


class RegisterParams(SetChoice):
    """Section ``register`` of params.yaml (with the served sets of :class:`SetChoice`)."""

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


def write_report(report: dict[str, Any]) -> None:
    with atomic_outputs() as out:
        write_json(out.file(REPORT), report)


def main() -> None:
    params = load_section("register", RegisterParams)
    tracking = StageRun("register")  # fails here, before any work, when unreachable
    classifier_config = check_inputs(FILES)
    if not tracking.enabled:
        reason = "tracking.enabled is false"
        write_report({"model_name": params.model_name, "registered": False, "reason": reason})
        print(f"register: tracking disabled, nothing registered; wrote {REPORT}")
        return
    config = serving_config(
        classifier_config, params.batch_size, params.set_method, params.set_variant
    )
    test_metrics = served_metrics()
    texts = sample_texts()
    signature = served_signature(Scorer.load(FILES, config))
    inputs = input_digests(FILES)  # tags of the run, not part of the report
    name = registered_name(params.model_name, params.production, tracking.params.config)
    tags = version_tags(tracking.tags(), calibration_method(FILES), test_metrics, config)
    description = version_description(name, test_metrics, tags, read_blend(FILES.blend))
    version = Version(name, tags, description, test_metrics)
    logged = log_served_model(
        tracking.uri, tracking.run_id, FILES, config, signature, version, texts
    )
    number = describe_version(tracking.uri, version, logged, params.alias)
    report = {
        "registered": True,
        "model_name": name,
        "version": number,
        "alias": params.alias,
        "model_uri": f"models:/{name}/{number}",
        "alias_uri": f"models:/{name}@{params.alias}",
        "run_id": logged.run_id,
        "logged_model_uri": logged.info.model_uri,
        "tracking_uri": tracking.uri,
        "test": test_metrics,
        "served": logged.served,
    }
    write_report(report)
    served = logged.served
    tracking.finish(
        ["register"],
        report={
            **{k: report[k] for k in ("model_name", "version", "alias")},
            "throughput_documents": served["throughput_documents"],
        },
        artifacts=[REPORT],
        inputs=inputs,
    )
    print(
        f"register: {report['model_uri']} = {report['alias_uri']} (run {logged.run_id}) "
        f"in {tracking.uri}; {served['size_mb']} MB, loads in {served['load_seconds']} s, "
        f"{served['documents_per_second']} documents/s; serve with: "
        f"mlflow models serve -m {report['alias_uri']} --env-manager local"
    )


if __name__ == "__main__":
    run_stage(main)
