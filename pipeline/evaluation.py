"""Scoring calibrated models on the test split, before and after calibration.

For one model: its calibrator (``data/models/calibrator/<model>.json``), its test rows of
``data/predictions/<model>/predictions.parquet``, the summaries of
:func:`pipeline.metrics.summarize` for the plain softmax (``uncalibrated``) and the
calibrated probabilities, and its views: the DVC plot JSON and the PNG figures. Only test
rows are read; nothing is fitted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import paths, plots
from pipeline.calibration import Calibrator, softmax
from pipeline.domain import GROUPS
from pipeline.errors import PipelineError
from pipeline.io import write_json
from pipeline.metrics import N_BINS, summarize
from pipeline.predictions import load_predictions, split_arrays, validate_probabilities
from pipeline.set_evaluation import headline

VARIANTS = ("uncalibrated", "calibrated")
HEADLINE = ("accuracy", "macro_f1", "nll", "brier", "ece", "ece_debiased")
"""The numbers of ``reports/metrics.json``; the rest of a summary goes to the detail file."""
VIEWS = ("reliability", "confidence", "confusion", "per_class")
"""Each model's views: a PNG ``reports/figures/<model>/<view>.png`` the report links, and
a DVC plot ``reports/plots/<view>/<model>.json`` (dvc.yaml's plots name the folders)."""
RISK_COVERAGE_PNG = "risk_coverage.png"  # every model's curve, in reports/figures/


@dataclass(frozen=True)
class ModelScores:
    """One model's test rows, probabilities and summaries (keys of both: :data:`VARIANTS`)."""

    ids: np.ndarray
    labels: np.ndarray
    probs: dict[str, np.ndarray]
    summary: dict[str, dict[str, Any]]
    per_class: list[dict[str, Any]]
    """:func:`plots.per_class_rows` of the calibrated predictions."""


@dataclass
class Results:
    """What ``evaluate`` writes, gathered model by model (:meth:`add`).

    ``metrics`` is ``reports/metrics.json`` (model -> variant -> :data:`HEADLINE`),
    ``detail`` is ``reports/metrics_detail.json`` (the binning, the resamples, then per
    model the rest of each summary and ``per_class``), ``rows`` one row per model and
    variant for :class:`pipeline.schemas.MetricsRow`, ``methods`` each model's
    calibration method, ``probs`` its calibrated test probabilities and ``sets`` its
    prediction-set scores (:meth:`add_sets`; absent for a calibrator without thresholds).
    """

    n_boot: int
    metrics: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)
    probs: dict[str, np.ndarray] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.detail = {"ece_bins": N_BINS, "bootstrap": self.n_boot, **self.detail}

    def add(self, model: str, method: str, scores: ModelScores) -> None:
        """Record one model's scores (``method``: its calibration method)."""
        summary = scores.summary
        self.rows += [{"model": model, "variant": v, **summary[v]} for v in VARIANTS]
        self.metrics[model], self.detail[model] = split_summary(summary)
        self.detail[model]["per_class"] = scores.per_class
        self.methods[model] = method
        self.probs[model] = scores.probs["calibrated"]

    def add_sets(self, model: str, sets: dict[str, Any]) -> None:
        """Record one model's set scores (:func:`pipeline.set_evaluation.score_sets`, after
        :meth:`add`): all in the detail file, the served ones at 0.95 in the metrics file."""
        self.sets[model] = sets
        self.detail[model]["sets"] = sets
        head = headline(sets)
        if head:
            self.metrics[model]["sets"] = head


def load_calibrators(models: Sequence[str]) -> dict[str, Calibrator]:
    """The calibrator of each model in ``models`` (``calibrate.models``), in that order."""
    found = {}
    for model in models:
        path = paths.calibrator_file(model)
        if not path.is_file():
            raise PipelineError(f"{path}: not found (run `dvc repro calibrate@{model}` first)")
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise PipelineError(f"{path}: not a readable calibrator ({exc})") from None
        try:
            found[model] = Calibrator.from_dict(state)
        except PipelineError as exc:
            raise PipelineError(f"{path}: {exc}") from None
    return found


def evaluate_model(
    logits: np.ndarray, labels: np.ndarray, calibrator: Calibrator, n_boot: int, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Probabilities and summaries before and after calibration, on test rows."""
    probs = {"uncalibrated": softmax(logits), "calibrated": calibrator.predict_proba(logits)}
    return probs, {v: summarize(probs[v], labels, n_boot, seed) for v in VARIANTS}


def score_model(
    model: str, calibrator: Calibrator, docs: pd.DataFrame, n_boot: int, seed: int
) -> ModelScores:
    """Read ``model``'s test predictions and score them (:func:`evaluate_model`).

    Raises:
        PipelineError: The predictions are missing or do not match ``docs``, or some
            probabilities are not a distribution.
    """
    ids, logits, labels = split_arrays(load_predictions(model, docs), "test")
    probs, summary = evaluate_model(logits, labels, calibrator, n_boot, seed)
    for variant in VARIANTS:
        validate_probabilities(ids, labels, probs[variant], f"{model} test ({variant})")
    per_class = plots.per_class_rows(labels, probs["calibrated"].argmax(axis=1), GROUPS)
    return ModelScores(ids, labels, probs, summary, per_class)


def split_summary(
    summary: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """One model's summaries as (headline numbers, everything else) per variant."""
    head = {v: {k: summary[v][k] for k in HEADLINE} for v in VARIANTS}
    rest = {v: {k: x for k, x in summary[v].items() if k not in HEADLINE} for v in VARIANTS}
    return head, rest


def write_views(
    plot_dir: Path, figure_dir: Path, model: str, scores: ModelScores, histogram_bins: int
) -> None:
    """Write one model's :data:`VIEWS` as DVC plots and as PNG figures.

    The plots go to ``plot_dir/<view>/<model>.json`` (one folder per view, which dvc.yaml's
    plots section names, so a new model's plots appear by themselves), their rows tagged
    with ``model`` and ``calibration`` for the templates in ``.dvc/plots/`` to facet by;
    the PNGs ``report.md`` links go to ``figure_dir/<model>/<view>.png``.

    Args:
        scores: The model's test scores (:func:`score_model`).
        histogram_bins: Bins of the confidence histogram.
    """
    probs, labels, per_class = scores.probs, scores.labels, scores.per_class
    preds = probs["calibrated"].argmax(axis=1)

    def tagged(rows: list[dict[str, Any]], variant: str) -> list[dict[str, Any]]:
        return [{"model": model, "calibration": variant, **row} for row in rows]

    def write_plot(kind: str, rows: list[dict[str, Any]]) -> None:
        path = plot_dir / paths.model_plot(kind, model).relative_to(paths.PLOTS)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, rows)

    write_plot(
        "reliability",
        [r for v, p in probs.items() for r in tagged(plots.reliability_rows(p, labels), v)],
    )
    write_plot(
        "confidence",
        [
            r
            for v, p in probs.items()
            for r in tagged(plots.confidence_rows(p, labels, histogram_bins), v)
        ],
    )
    write_plot("confusion", plots.confusion_rows(labels, preds, GROUPS))
    write_plot("per_class", tagged(per_class, "calibrated"))

    out = figure_dir / model
    before, after = probs["uncalibrated"], probs["calibrated"]
    plots.reliability_diagram(before, after, labels, out / "reliability.png", title=model)
    plots.confidence_histogram(
        before, after, labels, out / "confidence.png", histogram_bins, title=model
    )
    plots.confusion_matrix_plot(labels, preds, GROUPS, out / "confusion.png", title=model)
    plots.per_class_bars(per_class, out / "per_class.png", title=model)


def write_risk_coverage(
    plot_dir: Path,
    figure_dir: Path,
    probs_by_model: Mapping[str, np.ndarray],
    labels: np.ndarray,
    curve_points: int,
) -> None:
    """Every model's risk-coverage curve, as one PNG ``figure_dir/``:data:`RISK_COVERAGE_PNG` and
    as the DVC plot :data:`paths.RISK_COVERAGE` under ``plot_dir``.

    Args:
        probs_by_model: Calibrated test probabilities of each model, all on the same test
            documents in the same order (one ``labels`` fits them all).
        curve_points: Points kept on each curve of the DVC plot.
    """
    plots.risk_coverage_plot(probs_by_model, labels, figure_dir / RISK_COVERAGE_PNG)
    write_json(
        plot_dir / paths.RISK_COVERAGE.relative_to(paths.PLOTS),
        [
            {"model": model, **row}
            for model, p in probs_by_model.items()
            for row in plots.risk_coverage_rows(p, labels, curve_points)
        ],
    )
