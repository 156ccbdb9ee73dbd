"""Stage `evaluate`: score every calibrated model on the test split, before and after.

For each model of ``calibrate.models`` (the one list of models) it takes the calibrator
``data/models/calibrator/<model>.json`` (written by ``calibrate@<model>``), reads the
model's test rows from ``data/predictions/<model>/predictions.parquet`` and computes,
for the plain softmax ("uncalibrated") and the calibrated probabilities, every metric of
:func:`pipeline.metrics.summarize`: accuracy, macro-F1, NLL, Brier, ECE with 15 equal-width
bins over top-label confidence (Guo et al. 2017), its debiased estimate (Kumar et al.
2019), adaptive (equal-mass) ECE, MCE, classwise ECE, AURC, and bootstrap
95% intervals for accuracy and ECE; then the conformal prediction sets of each model's
calibrator (:mod:`pipeline.set_evaluation`): coverage with a bootstrap interval, set sizes
and per-class coverage, per method, variant and level. Only test rows are read here;
nothing is fitted.

Outputs, every number a fraction (not a percentage) on every surface:

- ``reports/metrics.json`` (the DVC metrics file): model -> ``uncalibrated`` /
  ``calibrated`` -> the headline numbers (:data:`pipeline.evaluation.HEADLINE`), all
  ``dvc exp show`` needs, plus ``sets`` -> ``coverage_95``, ``mean_size_95`` of the
  served sets (``register.set_method`` and ``register.set_variant``);
- ``reports/metrics_detail.json`` (a plain report): test size, intervals, adaptive and
  classwise ECE, MCE, AURC, per-class precision/recall/F1 and every set score per model;
- ``reports/plots/`` (JSON for ``dvc plots show``, DVC-cached), ``reports/figures/``
  (the PNGs the report links, committed) and ``reports/report.md`` (tables, figures and
  an error analysis: the most confident mistakes, the documents the models disagree on).

MLflow: one run per model, ``evaluate/<model>``, opened when the stage starts, with the
calibrated ``test_accuracy``, ``test_ece``, ``test_nll`` (and ``test_ece_debiased``,
``test_macro_f1``, ``test_brier``, ``test_set_coverage_95``, ``test_set_mean_size_95``).
Artifacts: the report with that model's figures at the paths it links (``report.md``,
``figures/``), the same report as one self-contained ``report.html`` (MLflow's viewer
shows no images in Markdown), and both metrics files.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from pydantic import Field

from pipeline import paths
from pipeline.config import Section, load_section, load_seed
from pipeline.domain import GROUPS
from pipeline.error_analysis import analyse_errors, error_model
from pipeline.errors import run_stage
from pipeline.evaluation import (
    RISK_COVERAGE_PNG,
    Results,
    load_calibrators,
    score_model,
    write_risk_coverage,
    write_views,
)
from pipeline.io import atomic_outputs, write_json
from pipeline.predictions import read_documents
from pipeline.report import render_report, report_html
from pipeline.run_artifacts import report_bundle
from pipeline.schemas import MetricsRow, validate
from pipeline.set_evaluation import read_set_states, score_sets, validate_set_rows, write_set_views
from pipeline.set_params import load_set_choice
from pipeline.stages.calibrate import CalibrateParams
from pipeline.tracking import StageRun

MLFLOW_METRICS = {  # calibrated summary key -> metric of the evaluate/<model> run
    "accuracy": "test_accuracy",
    "ece": "test_ece",
    "nll": "test_nll",
    "ece_debiased": "test_ece_debiased",
    "macro_f1": "test_macro_f1",
    "brier": "test_brier",
}


class EvaluateParams(Section):
    """Section ``evaluate`` of params.yaml."""

    bootstrap: int = Field(
        ge=10,
        description="Bootstrap resamples of the test documents for the 95% intervals of "
        "accuracy and ECE.",
    )
    histogram_bins: int = Field(
        ge=2,
        le=200,
        description="Bins of the confidence histogram plot (ECE always uses 15 equal-width bins).",
    )
    curve_points: int = Field(
        ge=2, description="Points kept on each risk-coverage curve of reports/plots/."
    )


def main() -> None:
    params = load_section("evaluate", EvaluateParams)
    seed = load_seed()
    models = load_section("calibrate", CalibrateParams).models
    calibrators = load_calibrators(models)
    states, choice = read_set_states(models), load_set_choice()
    tracking = StageRun("evaluate", models=models)  # one run per model, from now
    docs = read_documents()
    results = Results(params.bootstrap)
    with atomic_outputs() as out:
        plot_dir, figure_dir = out.dir(paths.PLOTS), out.dir(paths.FIGURES)
        for model, calibrator in calibrators.items():
            scores = score_model(model, calibrator, docs, params.bootstrap, seed)
            results.add(model, calibrator.method, scores)
            write_views(plot_dir, figure_dir, model, scores, params.histogram_bins)
            probs, state = scores.probs["calibrated"], states[model]
            if state is not None:
                sets = score_sets(
                    probs, scores.labels, state, choice, params.bootstrap, seed, GROUPS
                )
                results.add_sets(model, sets)
                write_set_views(plot_dir, figure_dir, model, probs, state, choice)
            summary = scores.summary
            print(
                f"evaluate: {model}: accuracy {summary['calibrated']['accuracy']:.4f}, ECE "
                f"{summary['uncalibrated']['ece']:.4f} -> {summary['calibrated']['ece']:.4f} "
                f"({calibrator.method})"
            )
        validate(pd.DataFrame(results.rows), MetricsRow, str(paths.METRICS))
        validate_set_rows(results.sets, str(paths.METRICS_DETAIL))
        # All models are scored on the same test documents (sorted by id), so one plot fits.
        ids, labels = scores.ids, scores.labels
        write_risk_coverage(plot_dir, figure_dir, results.probs, labels, params.curve_points)
        focus = error_model(results.metrics, models)
        errors = analyse_errors(ids, labels, results.probs, focus)
        write_json(out.file(paths.METRICS), results.metrics)
        write_json(out.file(paths.METRICS_DETAIL), results.detail)
        report = render_report(results, models, errors)
        Path(out.file(paths.REPORT_MD)).write_text(report, encoding="utf-8")
    print(
        f"evaluate: {len(calibrators)} model(s) -> {paths.METRICS}, {paths.REPORT_MD}, "
        f"{paths.FIGURES}/"
    )
    for model in models:  # one row per model in the MLflow runs table
        # The report as it renders in MLflow: this model's figures, at the paths it links.
        text = render_report(results, models, errors, figure_models=[model])
        figures = {name: paths.FIGURES / name for name in (model, RISK_COVERAGE_PNG)}
        calibrated = results.metrics[model]["calibrated"]
        with report_bundle(text, figures, report_html) as (report_file, page, figure_folder):
            tracking.finish(
                all_params=True,
                metrics={name: calibrated[key] for key, name in MLFLOW_METRICS.items()}
                | {f"test_set_{k}": v for k, v in results.metrics[model].get("sets", {}).items()},
                report={"test_documents": results.detail[model]["calibrated"]["n"]},
                tags={"calibration": results.methods[model]},
                artifacts=[report_file, page, paths.METRICS, paths.METRICS_DETAIL, figure_folder],
                model=model,
            )


if __name__ == "__main__":
    run_stage(main)
