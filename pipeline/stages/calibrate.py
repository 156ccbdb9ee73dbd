"""Stage `calibrate`: fit a post-hoc calibrator per model on its validation logits only.

For every model in ``calibrate.models`` it reads ``data/predictions/<model>/predictions
.parquet``, fits ``calibrate.method`` on the validation rows (the test rows are never
read here) and saves the calibrator as JSON. ``method: auto`` compares
``calibrate.auto_methods`` by stratified K-fold cross-validated NLL on the validation
split and refits the winner on all of it.

Outputs: ``data/models/calibrator/<model>.json`` (:meth:`Calibrator.to_dict`) and
``reports/calibrate.json`` (method, validation NLL/ECE before and after, CV table).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from pipeline import paths
from pipeline.calibration import fit_calibrator, select_auto, softmax
from pipeline.config import Section, load_section, load_seed
from pipeline.errors import run_stage
from pipeline.io import atomic_outputs, write_json
from pipeline.metrics import ece, nll
from pipeline.predictions import (
    MODEL_NAME,
    check_listed_in_dvc_yaml,
    load_predictions,
    read_documents,
    split_arrays,
)
from pipeline.tracking import StageRun, split_report

Method = Literal[
    "temperature", "ets", "temperature_platt", "vector", "matrix", "histogram", "isotonic", "none"
]
MethodOrAuto = Literal[Method, "auto"]


class ScalingOptions(Section):
    """Options of vector and matrix scaling."""

    reg: float = Field(ge=0.0, description="L2 penalty toward no change.")
    max_iter: int = Field(ge=1, description="L-BFGS iterations.")


class TemperatureOptions(Section):
    """Options of temperature scaling."""

    max_iter: int = Field(ge=1, description="L-BFGS iterations.")


class IterOptions(Section):
    """Options of a method fitted by L-BFGS."""

    max_iter: int = Field(ge=1, description="L-BFGS iterations.")


class HistogramOptions(Section):
    """Options of histogram binning."""

    n_bins: int = Field(ge=1, le=1000, description="Equal-width confidence bins.")


class CalibrateOptions(Section):
    """Per-method options, passed to :func:`pipeline.calibration.fit_calibrator`."""

    temperature: TemperatureOptions = Field(description="temperature scaling")
    ets: IterOptions = Field(description="ensemble temperature scaling")
    temperature_platt: IterOptions = Field(description="temperature, then a Platt map")
    vector: ScalingOptions = Field(description="vector scaling")
    matrix: ScalingOptions = Field(description="matrix scaling")
    histogram: HistogramOptions = Field(description="histogram binning")


class CalibrateParams(Section):
    """Section ``calibrate`` of params.yaml."""

    models: list[str] = Field(
        min_length=1,
        description="Models calibrated and evaluated (each needs data/predictions/<model>/, a "
        "dep of calibrate and evaluate).",
    )
    method: MethodOrAuto = Field(
        description="temperature, ets, temperature_platt, vector, matrix, histogram, isotonic, "
        "none, or auto: the lowest cross-validated validation NLL of auto_methods."
    )
    auto_methods: list[Method] = Field(
        min_length=1, description="The methods method=auto chooses from."
    )
    folds: int = Field(
        ge=2, description="Stratified folds of the validation split for method=auto."
    )
    options: CalibrateOptions = Field(description="Per-method options")

    @field_validator("models")
    @classmethod
    def _names(cls, models: list[str]) -> list[str]:
        bad = [m for m in models if not MODEL_NAME.match(m)]
        if bad:
            raise ValueError(f"model names must match {MODEL_NAME.pattern}, got {bad}")
        if len(set(models)) != len(models):
            raise ValueError("model names must be unique")
        return models

    def opts(self, method: str) -> dict[str, Any]:
        section = getattr(self.options, method, None)
        return section.model_dump() if section is not None else {}


def calibrate_model(
    logits, labels, params: CalibrateParams, seed: int
) -> tuple[Any, dict[str, Any]]:
    """Fit the configured calibrator on validation logits; returns (calibrator, report)."""
    report: dict[str, Any] = {"method": params.method}
    method = params.method
    if method == "auto":
        opts = {m: params.opts(m) for m in params.auto_methods}
        method, table = select_auto(logits, labels, params.auto_methods, params.folds, seed, opts)
        report.update(method=method, selected_by="auto", folds=params.folds, cv=table)
    calibrator = fit_calibrator(method, logits, labels, seed, **params.opts(method))
    before, after = softmax(logits), calibrator.predict_proba(logits)
    report.update(
        validation_documents=len(labels),
        validation_nll_before=nll(before, labels),
        validation_nll_after=nll(after, labels),
        validation_ece_before=ece(before, labels),
        validation_ece_after=ece(after, labels),
    )
    if method in ("temperature", "ets", "temperature_platt"):  # a few numbers: show them
        state = calibrator.to_dict()
        report.update({k: state[k] for k in state if k not in ("method", "num_classes")})
    return calibrator, report


def main() -> None:
    params = load_section("calibrate", CalibrateParams)
    check_listed_in_dvc_yaml("calibrate", params.models, "calibrate.models")
    seed = load_seed()
    tracking = StageRun("calibrate")
    docs = read_documents()
    calibrators, reports = {}, {}
    for model in params.models:
        preds = load_predictions(model, docs)
        _, logits, labels = split_arrays(preds, "validation")
        calibrator, report = calibrate_model(logits, labels, params, seed)
        calibrators[model], reports[model] = calibrator, report
        chosen = f"auto -> {report['method']}" if params.method == "auto" else report["method"]
        print(
            f"calibrate: {model}: {chosen}, validation NLL "
            f"{report['validation_nll_before']:.4f} -> {report['validation_nll_after']:.4f} "
            "(in-sample)"
        )
    with atomic_outputs() as out:
        folder = out.dir(paths.CALIBRATORS)
        for model, calibrator in calibrators.items():
            write_json(folder / f"{model}.json", calibrator.to_dict())
        write_json(out.file(paths.stage_report("calibrate")), reports)
    print(
        f"calibrate: {len(calibrators)} calibrator(s) -> {paths.CALIBRATORS}/, "
        f"{paths.stage_report('calibrate')}"
    )
    headline = {
        f"{model}.validation_{name}_after": f"{model}/val_{name}"
        for model in reports
        for name in ("nll", "ece")
    }
    metrics, stats = split_report("calibrate", reports, headline)
    tracking.finish(
        ["seed", "calibrate"],
        metrics=metrics,
        report=stats,
        artifacts=[paths.stage_report("calibrate"), paths.CALIBRATORS],
    )


if __name__ == "__main__":
    run_stage(main)
