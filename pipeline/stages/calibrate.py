"""Stage `calibrate`: fit a post-hoc calibrator per model on its validation logits only.

DVC runs it once per model of ``calibrate.models`` (stages ``calibrate@<model>``, a
``foreach`` over that list, so adding a model adds its stage and deps):
``python -m pipeline.stages.calibrate <model>`` reads ``data/predictions/<model>/predictions
.parquet``, fits ``calibrate.method`` on the validation rows (the test rows are never
read here) and saves the calibrator as JSON. ``method: auto`` compares
``calibrate.auto_methods`` by stratified K-fold cross-validated NLL on the validation
split and refits the winner on all of it. Conformal thresholds at ``calibrate.set_levels``
are then fitted on the validation rows scored by that method cross-fitted over
``calibrate.folds`` (:mod:`pipeline.set_fitting`).

Outputs: ``data/models/calibrator/<model>.json`` (:meth:`Calibrator.to_dict`, plus the
thresholds under :data:`pipeline.served_sets.STATE_KEY`) and
``reports/calibrate/<model>.json`` (method, validation NLL/ECE before and after, CV table,
the thresholds and the classes whose Mondrian threshold falls back to the marginal one).
MLflow: one run per model, ``calibrate/<model>``.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from pipeline import paths
from pipeline.calibration import Calibrator, fit_calibrator, select_auto, softmax
from pipeline.calibration.options import CalibrateOptions
from pipeline.config import Section, load_section, load_seed
from pipeline.domain import GROUPS
from pipeline.errors import PipelineError, run_stage
from pipeline.io import atomic_outputs, write_json
from pipeline.metrics import ece, nll
from pipeline.predictions import (
    MODEL_NAME,
    load_predictions,
    read_documents,
    split_arrays,
)
from pipeline.served_sets import STATE_KEY
from pipeline.set_fitting import fit_sets, sets_summary
from pipeline.tracking import StageRun, split_report

Method = Literal[
    "temperature", "ets", "temperature_platt", "vector", "matrix", "histogram", "isotonic", "none"
]
MethodOrAuto = Literal[Method, "auto"]


class CalibrateParams(Section):
    """Section ``calibrate`` of params.yaml."""

    models: list[str] = Field(
        min_length=1,
        description="Models calibrated and evaluated, the one list of models: dvc.yaml runs a "
        "calibrate@<model> stage for each, and evaluate scores each (every model needs "
        "data/predictions/<model>/).",
    )
    method: MethodOrAuto = Field(
        description="temperature, ets, temperature_platt, vector, matrix, histogram, isotonic, "
        "none, or auto: the lowest cross-validated validation NLL of auto_methods."
    )
    auto_methods: list[Method] = Field(
        min_length=1, description="The methods method=auto chooses from."
    )
    folds: int = Field(
        ge=2,
        description="Stratified folds of the validation split, for method=auto and for the "
        "cross-fitted calibrator that scores the validation rows of the prediction sets.",
    )
    options: CalibrateOptions = Field(description="Per-method options")
    set_levels: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(
        min_length=1,
        description="Coverage levels of the conformal prediction sets, fitted on the "
        "validation split scored by the calibrator cross-fitted over `folds`: each in (0, 1), "
        "strictly increasing (docs/conformal.md).",
    )

    @field_validator("models")
    @classmethod
    def _names(cls, models: list[str]) -> list[str]:
        bad = [m for m in models if not MODEL_NAME.match(m)]
        if bad:
            raise ValueError(f"model names must match {MODEL_NAME.pattern}, got {bad}")
        if len(set(models)) != len(models):
            raise ValueError("model names must be unique")
        return models

    @field_validator("set_levels")
    @classmethod
    def _levels(cls, levels: list[float]) -> list[float]:
        if levels != sorted(set(levels)):
            raise ValueError(f"set_levels must be strictly increasing, got {levels}")
        return levels

    def opts(self, method: str) -> dict[str, Any]:
        """The options of ``method`` (none for a method without a section)."""
        section = getattr(self.options, method, None)
        return section.model_dump() if section is not None else {}


def calibrate_model(
    logits: np.ndarray, labels: np.ndarray, params: CalibrateParams, seed: int
) -> tuple[Calibrator, dict[str, Any]]:
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


def model_to_calibrate(argv: list[str], models: list[str]) -> str:
    """The one model named on the command line; it must be listed in ``calibrate.models``
    (dvc.yaml runs one ``calibrate@<model>`` stage per entry of that list)."""
    if len(argv) != 1:
        raise PipelineError(
            "usage: python -m pipeline.stages.calibrate <model> (one of calibrate.models: "
            f"{', '.join(models)})"
        )
    if argv[0] not in models:
        raise PipelineError(
            f"calibrate: model {argv[0]!r} is not in calibrate.models ({', '.join(models)})"
        )
    return argv[0]


def main() -> None:
    params = load_section("calibrate", CalibrateParams)
    model = model_to_calibrate(sys.argv[1:], params.models)
    seed = load_seed()
    tracking = StageRun("calibrate", models=[model])
    preds = load_predictions(model, read_documents())
    _, logits, labels = split_arrays(preds, "validation")
    calibrator, report = calibrate_model(logits, labels, params, seed)
    chosen = f"auto -> {report['method']}" if params.method == "auto" else report["method"]
    print(
        f"calibrate: {model}: {chosen}, validation NLL "
        f"{report['validation_nll_before']:.4f} -> {report['validation_nll_after']:.4f} "
        "(in-sample)"
    )
    method = report["method"]
    state = fit_sets(
        logits, labels, method, params.opts(method), params.set_levels, params.folds, seed
    )
    report["sets"] = sets_summary(state, GROUPS, method, params.folds)
    calibrator_file = paths.calibrator_file(model)
    report_file = paths.model_report("calibrate", model)
    with atomic_outputs() as out:
        write_json(out.file(calibrator_file), {**calibrator.to_dict(), STATE_KEY: state.to_dict()})
        write_json(out.file(report_file), report)
    print(f"calibrate: {model} -> {calibrator_file}, {report_file}")
    headline = {f"validation_{name}_after": f"val_{name}" for name in ("nll", "ece")}
    metrics, stats = split_report("calibrate", report, headline)
    tracking.finish(
        ["seed", "calibrate"],
        metrics=metrics,
        report=stats,
        artifacts=[report_file, calibrator_file],
        model=model,
    )


if __name__ == "__main__":
    run_stage(main)
