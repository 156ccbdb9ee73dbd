"""Stage `evaluate`: score every calibrated model on the test split, before and after.

For each calibrator in ``data/models/calibrator/<model>.json`` (written by `calibrate`)
it reads the model's test rows from ``data/predictions/<model>/predictions.parquet`` and
computes, for the plain softmax ("uncalibrated") and the calibrated probabilities, every
metric of :func:`pipeline.metrics.summarize`: accuracy, macro-F1, NLL, Brier, ECE with 15
equal-width bins over top-label confidence (Guo et al. 2017), its debiased estimate
(Kumar et al. 2019), adaptive (equal-mass) ECE, MCE, classwise ECE, AURC, and bootstrap
95% intervals for accuracy and ECE. Only test rows are read here; nothing is fitted.

Outputs: ``reports/metrics.json`` (DVC metrics), ``reports/plots/`` (JSON for
``dvc plots show`` and PNGs) and ``reports/report.md`` (summary table and plots).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from pipeline import plots
from pipeline.calibration import Calibrator, softmax
from pipeline.config import Section, load_section, load_seed
from pipeline.errors import PipelineError, run_stage
from pipeline.io import atomic_outputs, write_json
from pipeline.metrics import N_BINS, summarize
from pipeline.predictions import (
    load_predictions,
    read_documents,
    split_arrays,
    validate_probabilities,
)
from pipeline.schemas import GROUPS, MetricsRow, validate
from pipeline.tracking import StageRun

CALIBRATORS = Path("data/models/calibrator")
METRICS = Path("reports/metrics.json")
PLOTS = Path("reports/plots")
REPORT = Path("reports/report.md")
VARIANTS = ("uncalibrated", "calibrated")
TABLE_COLUMNS = (
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("nll", "NLL"),
    ("brier", "Brier"),
    ("ece", "ECE"),
    ("ece_debiased", "debiased ECE"),
    ("adaptive_ece", "adaptive ECE"),
    ("mce", "MCE"),
    ("classwise_ece", "classwise ECE"),
    ("aurc", "AURC"),
)


class EvaluateParams(Section):
    """Section ``evaluate`` of params.yaml."""

    # Bootstrap resamples of the test split for the 95% intervals of accuracy and ECE.
    bootstrap: int = Field(default=1000, ge=10)
    # Bins of the confidence histogram (ECE always uses 15 equal-width bins).
    histogram_bins: int = Field(default=20, ge=2, le=200)
    # Points kept on the risk-coverage curve in the DVC plot JSON.
    curve_points: int = Field(default=100, ge=2)


def load_calibrators(folder: Path = CALIBRATORS) -> dict[str, Calibrator]:
    """Every ``<model>.json`` calibrator in ``folder``, by model name, sorted."""
    if not folder.is_dir():
        raise PipelineError(f"{folder}: not found (run `dvc repro calibrate` first)")
    found = {}
    for path in sorted(folder.glob("*.json")):
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise PipelineError(f"{path}: not a readable calibrator ({exc})") from None
        try:
            found[path.stem] = Calibrator.from_dict(state)
        except PipelineError as exc:
            raise PipelineError(f"{path}: {exc}") from None
    if not found:
        raise PipelineError(f"{folder}: no calibrators (run `dvc repro calibrate` first)")
    return found


def evaluate_model(
    logits: np.ndarray, labels: np.ndarray, calibrator: Calibrator, n_boot: int, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Probabilities and summaries before and after calibration, on test rows."""
    probs = {"uncalibrated": softmax(logits), "calibrated": calibrator.predict_proba(logits)}
    return probs, {v: summarize(probs[v], labels, n_boot, seed) for v in VARIANTS}


def write_plots(
    folder: Path,
    model: str,
    probs: dict[str, np.ndarray],
    labels: np.ndarray,
    params: EvaluateParams,
) -> None:
    """One model's DVC plot JSON files and PNGs under ``folder/<model>/``."""
    out = folder / model
    out.mkdir(parents=True, exist_ok=True)
    before, after = probs["uncalibrated"], probs["calibrated"]
    preds = after.argmax(axis=1)
    for variant, p in probs.items():
        write_json(out / f"reliability_{variant}.json", plots.reliability_rows(p, labels))
        write_json(
            out / f"confidence_{variant}.json",
            plots.confidence_rows(p, labels, params.histogram_bins),
        )
        write_json(
            out / f"risk_coverage_{variant}.json",
            plots.risk_coverage_rows(p, labels, params.curve_points),
        )
    write_json(out / "confusion.json", plots.confusion_rows(labels, preds, GROUPS))
    write_json(out / "per_class.json", plots.per_class_rows(labels, preds, GROUPS))
    plots.reliability_diagram(before, after, labels, out / "reliability.png", title=model)
    plots.confidence_histogram(
        before, after, labels, out / "confidence.png", params.histogram_bins, title=model
    )
    plots.confusion_matrix_plot(labels, preds, GROUPS, out / "confusion.png", title=model)
    plots.per_class_bars(labels, preds, GROUPS, out / "per_class.png", title=model)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def render_report(
    metrics: dict[str, Any], methods: dict[str, str], models: list[str], n_boot: int
) -> str:
    """``reports/report.md``: the key table for every model, the conventions and the plots."""
    lines = [
        "# Evaluation report",
        "",
        "Test split only; calibrators were fitted on the validation split. "
        "Accuracy, macro-F1 and the ECEs in %; NLL in nats; Brier is the multiclass form "
        "(sum over classes, 0-2). "
        f"**ECE convention:** {N_BINS} equal-width bins over the top-label confidence, "
        "weighted by bin size (Guo et al. 2017); debiased ECE is the square root of Kumar et "
        "al.'s (2019) unbiased estimate of the squared ECE over the same bins: near 0 when "
        "the plain ECE is only sampling noise; adaptive ECE uses 15 equal-mass bins; "
        "MCE is the largest bin gap; classwise ECE averages one-vs-rest ECEs over classes. "
        f"Brackets: bootstrap 95% intervals ({n_boot} resamples of the test documents).",
        "",
        "| model | calibration | " + " | ".join(name for _, name in TABLE_COLUMNS) + " |",
        "|---|---|" + "---:|" * len(TABLE_COLUMNS),
    ]
    for model in models:
        for variant in VARIANTS:
            m = metrics[model][variant]
            label = "none" if variant == "uncalibrated" else methods[model]
            cells = []
            for key, _ in TABLE_COLUMNS:
                value = m[key]
                if key in ("accuracy", "ece"):
                    cells.append(
                        f"{_pct(value)} [{_pct(m[key + '_ci_low'])}, {_pct(m[key + '_ci_high'])}]"
                    )
                elif key in ("macro_f1", "ece_debiased", "adaptive_ece", "mce", "classwise_ece"):
                    cells.append(_pct(value))
                else:
                    cells.append(f"{value:.4f}")
            lines.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
    n = metrics[models[0]]["uncalibrated"]["n"]
    lines += [
        "",
        f"{n} test documents. `dvc metrics show` / `dvc metrics diff` read "
        "`reports/metrics.json`; `dvc plots show` renders the interactive versions of the "
        "plots below.",
        "",
        "## Risk-coverage",
        "",
        "Accuracy on the documents a model answers when it abstains on its least confident "
        "ones (calibrated probabilities).",
        "",
        "![risk-coverage](plots/risk_coverage.png)",
    ]
    for model in models:
        lines += [
            "",
            f"## {model}",
            "",
            f"Calibration: `{methods[model]}`.",
            "",
            f"![reliability {model}](plots/{model}/reliability.png)",
            "",
            f"![confidence {model}](plots/{model}/confidence.png)",
            "",
            f"![confusion {model}](plots/{model}/confusion.png)",
            "",
            f"![per-class {model}](plots/{model}/per_class.png)",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    params = load_section("evaluate", EvaluateParams)
    seed = load_seed()
    tracking = StageRun("evaluate")
    calibrators = load_calibrators()
    docs = read_documents()
    metrics: dict[str, Any] = {"ece_bins": N_BINS}
    methods: dict[str, str] = {}
    test_probs: dict[str, np.ndarray] = {}
    rows = []
    with atomic_outputs() as out:
        folder = out.dir(PLOTS)
        for model, calibrator in calibrators.items():
            preds = load_predictions(model, docs)
            ids, logits, labels = split_arrays(preds, "test")
            probs, summary = evaluate_model(logits, labels, calibrator, params.bootstrap, seed)
            for variant in VARIANTS:
                validate_probabilities(ids, labels, probs[variant], f"{model} test ({variant})")
                rows.append({"model": model, "variant": variant, **summary[variant]})
            metrics[model] = summary
            methods[model] = calibrator.method
            test_probs[model] = probs["calibrated"]
            write_plots(folder, model, probs, labels, params)
            print(
                f"evaluate: {model}: accuracy {summary['calibrated']['accuracy']:.4f}, ECE "
                f"{summary['uncalibrated']['ece']:.4f} -> {summary['calibrated']['ece']:.4f} "
                f"({calibrator.method})"
            )
        validate(pd.DataFrame(rows), MetricsRow, str(METRICS))
        # All models are scored on the same test documents (sorted by id), so one plot fits.
        plots.risk_coverage_plot(test_probs, labels, folder / "risk_coverage.png")
        write_json(out.file(METRICS), metrics)
        models = list(calibrators)
        Path(out.file(REPORT)).write_text(
            render_report(metrics, methods, models, params.bootstrap), encoding="utf-8"
        )
    print(f"evaluate: {len(calibrators)} model(s) -> {METRICS}, {REPORT}, {PLOTS}/")
    for model in calibrators:  # one row per model in the MLflow runs table
        tracking.log(
            [], metrics[model], [REPORT, METRICS, PLOTS / model], all_params=True, model=model
        )


if __name__ == "__main__":
    run_stage(main)
