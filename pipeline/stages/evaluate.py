"""Stage `evaluate`: score every calibrated model on the test split, before and after.

For each model of ``calibrate.models`` (the one list of models) it takes the calibrator
``data/models/calibrator/<model>.json`` (written by ``calibrate@<model>``), reads the
model's test rows from ``data/predictions/<model>/predictions.parquet`` and computes,
for the plain softmax ("uncalibrated") and the calibrated probabilities, every metric of
:func:`pipeline.metrics.summarize`: accuracy, macro-F1, NLL, Brier, ECE with 15 equal-width
bins over top-label confidence (Guo et al. 2017), its debiased estimate (Kumar et al.
2019), adaptive (equal-mass) ECE, MCE, classwise ECE, AURC, and bootstrap
95% intervals for accuracy and ECE. Only test rows are read here; nothing is fitted.

Outputs, every number a fraction (accuracy 0.8695, not 86.95) on every surface:

- ``reports/metrics.json`` (the DVC metrics file): model -> ``uncalibrated`` /
  ``calibrated`` -> the headline numbers (:data:`HEADLINE`), all ``dvc exp show`` needs;
- ``reports/metrics_detail.json`` (a plain report): test size, intervals, adaptive and
  classwise ECE, MCE, AURC and per-class precision/recall/F1 per model;
- ``reports/plots/`` (JSON for ``dvc plots show``, DVC-cached), ``reports/figures/``
  (the PNGs the report links, committed) and ``reports/report.md`` (tables, figures and
  an error analysis: the most confident mistakes, the documents the models disagree on).

MLflow: one run per model, ``evaluate/<model>``, opened when the stage starts, with the
calibrated ``test_accuracy``, ``test_ece``, ``test_nll`` (and ``test_ece_debiased``,
``test_macro_f1``, ``test_brier``). Artifacts: the report with that model's figures at the
paths it links (``report.md``, ``figures/``), the same report as one self-contained
``report.html`` (MLflow's viewer shows no images in Markdown), and both metrics files.
"""

from __future__ import annotations

import html
import itertools
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from pipeline import paths, plots
from pipeline.calibration import Calibrator, softmax
from pipeline.config import Section, load_section, load_seed
from pipeline.domain import GROUPS
from pipeline.errors import PipelineError, run_stage
from pipeline.io import atomic_outputs, write_json
from pipeline.metrics import N_BINS, summarize
from pipeline.predictions import (
    load_predictions,
    read_documents,
    split_arrays,
    validate_probabilities,
)
from pipeline.schemas import MetricsRow, validate
from pipeline.stages.calibrate import CalibrateParams
from pipeline.tracking import StageRun

VARIANTS = ("uncalibrated", "calibrated")
HEADLINE = ("accuracy", "macro_f1", "nll", "brier", "ece", "ece_debiased")
"""The numbers of ``reports/metrics.json``; the rest of a summary goes to the detail file."""
MLFLOW_METRICS = {  # calibrated summary key -> metric of the evaluate/<model> run
    "accuracy": "test_accuracy",
    "ece": "test_ece",
    "nll": "test_nll",
    "ece_debiased": "test_ece_debiased",
    "macro_f1": "test_macro_f1",
    "brier": "test_brier",
}
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
VIEWS = ("reliability", "confidence", "confusion", "per_class")
"""Each model's views: a PNG ``reports/figures/<model>/<view>.png`` the report links, and
a DVC plot ``reports/plots/<view>/<model>.json`` (dvc.yaml's plots name the folders)."""
ERROR_ROWS = 10  # rows of each error-analysis table


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


def split_summary(
    summary: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """One model's summaries as (headline numbers, everything else) per variant."""
    head = {v: {k: summary[v][k] for k in HEADLINE} for v in VARIANTS}
    rest = {v: {k: x for k, x in summary[v].items() if k not in HEADLINE} for v in VARIANTS}
    return head, rest


def write_views(
    plot_dir: Path,
    figure_dir: Path,
    model: str,
    probs: dict[str, np.ndarray],
    labels: np.ndarray,
    per_class: list[dict[str, Any]],
    params: EvaluateParams,
) -> None:
    """One model's DVC plot JSON, ``plot_dir/<kind>/<model>.json`` (one folder per kind,
    which dvc.yaml's plots section names, so a new model's plots appear by themselves),
    and the PNGs ``report.md`` links under ``figure_dir/<model>/``. Plot rows carry
    ``model`` and ``calibration`` so the templates in ``.dvc/plots/`` can facet by them.
    ``per_class`` is :func:`plots.per_class_rows` of the calibrated predictions, computed
    once for the plot, the figure and ``metrics_detail.json``."""
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
            for r in tagged(plots.confidence_rows(p, labels, params.histogram_bins), v)
        ],
    )
    write_plot("confusion", plots.confusion_rows(labels, preds, GROUPS))
    write_plot("per_class", tagged(per_class, "calibrated"))

    out = figure_dir / model
    before, after = probs["uncalibrated"], probs["calibrated"]
    plots.reliability_diagram(before, after, labels, out / "reliability.png", title=model)
    plots.confidence_histogram(
        before, after, labels, out / "confidence.png", params.histogram_bins, title=model
    )
    plots.confusion_matrix_plot(labels, preds, GROUPS, out / "confusion.png", title=model)
    plots.per_class_bars(per_class, out / "per_class.png", title=model)


# ------------------------------------------------------------------ error analysis


def subject_line(text: str) -> str:
    """The post's ``Subject:`` header ('' when the headers were removed or it has none)."""
    for line in text.splitlines():
        if not line.strip():
            break  # the header block ends at the first blank line
        if line[:8].lower() == "subject:":
            return line[8:].strip()
    return ""


def confident_mistakes(
    ids: Sequence[str], labels: np.ndarray, probs: np.ndarray, k: int = ERROR_ROWS
) -> list[dict[str, Any]]:
    """The ``k`` wrong predictions made with the highest confidence (ties: by id order)."""
    confidence = probs.max(axis=1)
    predicted = probs.argmax(axis=1)
    order = np.argsort(-confidence, kind="stable")
    wrong = [i for i in order if predicted[i] != labels[i]][:k]
    return [
        {
            "id": str(ids[i]),
            "true": GROUPS[labels[i]],
            "predicted": GROUPS[predicted[i]],
            "confidence": float(confidence[i]),
        }
        for i in wrong
    ]


def disagreement(probs_by_model: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per document, the mean total-variation distance between two models' probabilities,
    over every pair of models: 0 when all agree exactly, 1 when no two overlap."""
    stacked = list(probs_by_model.values())
    pairs = list(itertools.combinations(range(len(stacked)), 2))
    if not pairs:
        return np.zeros(len(stacked[0]) if stacked else 0)
    return np.mean([0.5 * np.abs(stacked[a] - stacked[b]).sum(axis=1) for a, b in pairs], axis=0)


def disagreements(
    ids: Sequence[str],
    labels: np.ndarray,
    probs_by_model: Mapping[str, np.ndarray],
    k: int = ERROR_ROWS,
) -> list[dict[str, Any]]:
    """The ``k`` documents the models disagree on most, with each model's answer."""
    score = disagreement(probs_by_model)
    order = np.argsort(-score, kind="stable")[:k]
    return [
        {
            "id": str(ids[i]),
            "true": GROUPS[labels[i]],
            "disagreement": float(score[i]),
            "answers": {
                m: {"predicted": GROUPS[int(p[i].argmax())], "confidence": float(p[i].max())}
                for m, p in probs_by_model.items()
            },
        }
        for i in order
    ]


def read_subjects(ids: set[str], path: Path = paths.DOCUMENTS) -> dict[str, str]:
    """``id -> Subject`` for the documents the error analysis shows."""
    docs = read_documents(path, columns=("id", "text"))
    docs = docs[docs["id"].isin(ids)]
    return {i: subject_line(t) for i, t in zip(docs["id"], docs["text"], strict=True)}


def md_cell(text: str, limit: int = 70) -> str:
    """Text safe inside a Markdown table cell: one line, no markup, at most ``limit`` chars."""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    for char in "\\`*_[]<>|#":
        text = text.replace(char, "\\" + char)
    return text or "(none)"


# ------------------------------------------------------------------------- report


def _num(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}"


def render_report(
    metrics: dict[str, Any],
    detail: dict[str, Any],
    methods: dict[str, str],
    models: list[str],
    n_boot: int,
    errors: Mapping[str, Any] | None = None,
    figure_models: Sequence[str] | None = None,
) -> str:
    """``reports/report.md``: the key table for every model, the conventions, the figures
    (paths relative to the report: ``figures/<model>/*.png``) and the error analysis.
    ``figure_models``: whose figure sections to include (default: every model's)."""
    lines = [
        "# Evaluation report",
        "",
        "Test split only; calibrators were fitted on the validation split. Every number is a "
        "fraction, as in `reports/metrics.json`, the DVC plots and MLflow (accuracy 0.8695 "
        "is 86.95%); NLL in nats; Brier is the multiclass form (sum over classes, 0-2). "
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
            m = {**metrics[model][variant], **detail[model][variant]}
            label = "none" if variant == "uncalibrated" else methods[model]
            cells = []
            for key, _ in TABLE_COLUMNS:
                if key in ("accuracy", "ece"):
                    low, high = m[key + "_ci_low"], m[key + "_ci_high"]
                    cells.append(f"{_num(m[key])} [{_num(low)}, {_num(high)}]")
                else:
                    cells.append(_num(m[key]))
            lines.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
    n = detail[models[0]]["uncalibrated"]["n"]
    lines += [
        "",
        f"{n} test documents. `reports/metrics.json` holds the headline columns (`dvc "
        "metrics show`, `dvc exp show`), `reports/metrics_detail.json` the others and the "
        "per-class scores; `make plots` renders the interactive versions of the figures "
        "below.",
        "",
        "## Risk-coverage",
        "",
        "Accuracy on the documents a model answers when it abstains on its least confident "
        "ones (calibrated probabilities).",
        "",
        "![risk-coverage](figures/risk_coverage.png)",
    ]
    if errors:
        lines += render_errors(errors, models)
    for model in models if figure_models is None else figure_models:
        lines += ["", f"## {model}", "", f"Calibration: `{methods[model]}`."]
        for name in VIEWS:
            lines += ["", f"![{name.replace('_', '-')} {model}](figures/{model}/{name}.png)"]
    return "\n".join(lines) + "\n"


def render_errors(errors: Mapping[str, Any], models: list[str]) -> list[str]:
    """The error-analysis section: confident mistakes and the largest disagreements."""
    subjects = errors["subjects"]
    lines = ["", "## Error analysis", ""]
    if not errors["mistakes"]:
        lines.append(f"`{errors['model']}` gets every test document right.")
    else:
        lines += [
            f"The {len(errors['mistakes'])} test documents `{errors['model']}` gets wrong with "
            "the highest calibrated confidence (a mislabelled or cross-posted message, or a "
            "Subject naming another group's topic, are the usual reasons):",
            "",
            "| id | true group | predicted | confidence | Subject |",
            "|---|---|---|---:|---|",
        ]
    for row in errors["mistakes"]:
        lines.append(
            f"| `{row['id']}` | {row['true']} | {row['predicted']} | "
            f"{_num(row['confidence'], 3)} | {md_cell(subjects.get(row['id'], ''))} |"
        )
    lines += [
        "",
        "The documents the models disagree on most (mean total-variation distance between "
        "two models' calibrated probabilities, over every pair; 1 is total disagreement). "
        "Each cell: the model's predicted group and its confidence.",
        "",
        "| id | true group | disagreement | " + " | ".join(models) + " | Subject |",
        "|---|---|---:|" + "---|" * len(models) + "---|",
    ]
    for row in errors["disagreements"]:
        answers = [
            f"{a['predicted']} ({_num(a['confidence'], 2)})"
            for a in (row["answers"][m] for m in models)
        ]
        lines.append(
            f"| `{row['id']}` | {row['true']} | {_num(row['disagreement'], 3)} | "
            + " | ".join(answers)
            + f" | {md_cell(subjects.get(row['id'], ''))} |"
        )
    return lines


HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Evaluation report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 1em auto; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 2px 6px; }}
img {{ max-width: 100%; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def report_html(markdown: str, folder: Path) -> str:
    """The report as one self-contained HTML page, figures inlined as data URIs: MLflow's
    artifact viewer renders Markdown without its images, but renders HTML."""
    import base64
    import re

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)

    def inline(match: re.Match[str]) -> str:
        path = folder / html.unescape(match.group(1))
        if not path.is_file():
            raise PipelineError(f"{path}: the report links it, but it was not written")
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    return HTML_PAGE.format(body=re.sub(r'src="([^"]+\.png)"', inline, body))


def error_model(metrics: Mapping[str, Any], models: Sequence[str]) -> str:
    """Whose mistakes to list: the served blend, else the most accurate model."""
    if "blend" in models:
        return "blend"
    return max(models, key=lambda m: metrics[m]["calibrated"]["accuracy"])


def main() -> None:
    params = load_section("evaluate", EvaluateParams)
    seed = load_seed()
    models = load_section("calibrate", CalibrateParams).models
    calibrators = load_calibrators(models)
    tracking = StageRun("evaluate", models=models)  # one run per model, from now
    docs = read_documents()
    metrics: dict[str, Any] = {}
    detail: dict[str, Any] = {"ece_bins": N_BINS, "bootstrap": params.bootstrap}
    methods: dict[str, str] = {}
    test_probs: dict[str, np.ndarray] = {}
    rows = []
    ids = labels = None
    with atomic_outputs() as out:
        plot_dir, figure_dir = out.dir(paths.PLOTS), out.dir(paths.FIGURES)
        for model, calibrator in calibrators.items():
            preds = load_predictions(model, docs)
            ids, logits, labels = split_arrays(preds, "test")
            probs, summary = evaluate_model(logits, labels, calibrator, params.bootstrap, seed)
            for variant in VARIANTS:
                validate_probabilities(ids, labels, probs[variant], f"{model} test ({variant})")
                rows.append({"model": model, "variant": variant, **summary[variant]})
            metrics[model], detail[model] = split_summary(summary)
            per_class = plots.per_class_rows(labels, probs["calibrated"].argmax(axis=1), GROUPS)
            detail[model]["per_class"] = per_class
            methods[model] = calibrator.method
            test_probs[model] = probs["calibrated"]
            write_views(plot_dir, figure_dir, model, probs, labels, per_class, params)
            print(
                f"evaluate: {model}: accuracy {summary['calibrated']['accuracy']:.4f}, ECE "
                f"{summary['uncalibrated']['ece']:.4f} -> {summary['calibrated']['ece']:.4f} "
                f"({calibrator.method})"
            )
        validate(pd.DataFrame(rows), MetricsRow, str(paths.METRICS))
        # All models are scored on the same test documents (sorted by id), so one plot fits.
        plots.risk_coverage_plot(test_probs, labels, figure_dir / "risk_coverage.png")
        write_json(
            plot_dir / paths.RISK_COVERAGE.relative_to(paths.PLOTS),
            [
                {"model": model, **row}
                for model, p in test_probs.items()
                for row in plots.risk_coverage_rows(p, labels, params.curve_points)
            ],
        )
        focus = error_model(metrics, models)
        errors = {
            "model": focus,
            "mistakes": confident_mistakes(ids, labels, test_probs[focus]),
            "disagreements": disagreements(ids, labels, test_probs),
        }
        shown = {r["id"] for r in errors["mistakes"]} | {r["id"] for r in errors["disagreements"]}
        errors["subjects"] = read_subjects(shown)
        write_json(out.file(paths.METRICS), metrics)
        write_json(out.file(paths.METRICS_DETAIL), detail)
        report = render_report(metrics, detail, methods, models, params.bootstrap, errors)
        Path(out.file(paths.REPORT_MD)).write_text(report, encoding="utf-8")
    print(
        f"evaluate: {len(calibrators)} model(s) -> {paths.METRICS}, {paths.REPORT_MD}, "
        f"{paths.FIGURES}/"
    )
    for model in models:  # one row per model in the MLflow runs table
        calibrated = metrics[model]["calibrated"]
        with tempfile.TemporaryDirectory() as tmp:
            # The report as it renders in MLflow: this model's figures, at the paths it links.
            report_file, figures = Path(tmp) / paths.REPORT_MD.name, Path(tmp) / paths.FIGURES.name
            text = render_report(
                metrics, detail, methods, models, params.bootstrap, errors, figure_models=[model]
            )
            report_file.write_text(text, encoding="utf-8")
            shutil.copytree(paths.FIGURES / model, figures / model)
            shutil.copy2(paths.FIGURES / "risk_coverage.png", figures / "risk_coverage.png")
            page = Path(tmp) / "report.html"
            page.write_text(report_html(text, Path(tmp)), encoding="utf-8")
            tracking.finish(
                all_params=True,
                metrics={name: calibrated[key] for key, name in MLFLOW_METRICS.items()},
                report={"test_documents": detail[model]["calibrated"]["n"]},
                tags={"calibration": methods[model]},
                artifacts=[report_file, page, paths.METRICS, paths.METRICS_DETAIL, figures],
                model=model,
            )


if __name__ == "__main__":
    run_stage(main)
