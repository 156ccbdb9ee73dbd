"""The evaluation report: results turned into Markdown (``reports/report.md``) and HTML.

The Markdown holds the key table of every model before and after calibration, the
conventions behind its numbers, the figures (linked as ``figures/<model>/<view>.png``,
relative to the report) and the error analysis of :mod:`pipeline.error_analysis`. The
HTML page is the same report with its figures inlined, for MLflow's artifact viewer.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from pipeline.errors import PipelineError
from pipeline.evaluation import RISK_COVERAGE_PNG, VARIANTS, VIEWS, Results
from pipeline.metrics import N_BINS
from pipeline.set_evaluation import SET_VIEW, served_scores

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
"""The key table's columns: summary key -> column header."""

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


def _num(value: float, digits: int = 4) -> str:
    """A number as the report prints it: fixed-point with ``digits`` decimals."""
    return f"{value:.{digits}f}"


def md_cell(text: str, limit: int = 70) -> str:
    """Text safe inside a Markdown table cell: one line, no markup, at most ``limit`` chars."""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    for char in "\\`*_[]<>|#":
        text = text.replace(char, "\\" + char)
    return text or "(none)"


def _conventions(n_boot: int) -> str:
    """The paragraph that says how to read every number of the report."""
    return (
        "Test split only; calibrators were fitted on the validation split. Every number is a "
        "fraction, not a percentage, as in `reports/metrics.json`, the DVC plots and MLflow; "
        "NLL in nats; Brier is the multiclass form (sum over classes, 0-2). "
        f"**ECE convention:** {N_BINS} equal-width bins over the top-label confidence, "
        "weighted by bin size (Guo et al. 2017); debiased ECE is the square root of Kumar et "
        "al.'s (2019) unbiased estimate of the squared ECE over the same bins: near 0 when "
        "the plain ECE is only sampling noise; adaptive ECE uses 15 equal-mass bins; "
        "MCE is the largest bin gap; classwise ECE averages one-vs-rest ECEs over classes. "
        f"Brackets: bootstrap 95% intervals ({n_boot} resamples of the test documents)."
    )


def _metrics_table(results: Results, models: Sequence[str]) -> list[str]:
    """The key table: one row per model and variant, intervals for accuracy and ECE."""
    lines = [
        "| model | calibration | " + " | ".join(name for _, name in TABLE_COLUMNS) + " |",
        "|---|---|" + "---:|" * len(TABLE_COLUMNS),
    ]
    for model in models:
        for variant in VARIANTS:
            m = {**results.metrics[model][variant], **results.detail[model][variant]}
            label = "none" if variant == "uncalibrated" else results.methods[model]
            cells = []
            for key, _ in TABLE_COLUMNS:
                if key in ("accuracy", "ece"):
                    low, high = m[key + "_ci_low"], m[key + "_ci_high"]
                    cells.append(f"{_num(m[key])} [{_num(low)}, {_num(high)}]")
                else:
                    cells.append(_num(m[key]))
            lines.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
    return lines


def render_report(
    results: Results,
    models: Sequence[str],
    errors: Mapping[str, Any] | None = None,
    figure_models: Sequence[str] | None = None,
) -> str:
    """The report as Markdown.

    Args:
        results: The scores of every model (:class:`pipeline.evaluation.Results`).
        models: The models of the table, in order.
        errors: The error analysis (:func:`pipeline.error_analysis.analyse_errors`), if any.
        figure_models: Whose figure sections to include (default: every model's).

    Returns:
        The Markdown text, its figures linked as ``figures/<model>/<view>.png``.
    """
    lines = ["# Evaluation report", "", _conventions(results.n_boot), ""]
    lines += _metrics_table(results, models)
    n = results.detail[models[0]]["uncalibrated"]["n"]
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
        f"![risk-coverage](figures/{RISK_COVERAGE_PNG})",
    ]
    lines += render_sets(results, models, models if figure_models is None else figure_models)
    if errors:
        lines += render_errors(errors, models)
    for model in models if figure_models is None else figure_models:
        lines += ["", f"## {model}", "", f"Calibration: `{results.methods[model]}`."]
        for name in VIEWS:
            lines += ["", f"![{name.replace('_', '-')} {model}](figures/{model}/{name}.png)"]
    return "\n".join(lines) + "\n"


def render_sets(results: Results, models: Sequence[str], figure_models: Sequence[str]) -> list[str]:
    """The prediction-set section: per model, the served sets' scores at each level and
    the set-size figure of each of ``figure_models``; nothing when no model has sets."""
    with_sets = [m for m in models if m in results.sets]
    if not with_sets:
        return []
    first = results.sets[with_sets[0]]
    lines = [
        "",
        "## Prediction sets",
        "",
        f"Split conformal sets (`{first['method']}`, `{first['variant']}`: "
        "`register.set_method`, `register.set_variant`), thresholds fitted on the validation "
        "split: a set holds the true group of at least a `level` share of exchangeable "
        "documents (docs/conformal.md). Coverage with its bootstrap 95% interval; the worst "
        "class is the group with the lowest coverage. Every method and variant: "
        "`reports/metrics_detail.json`.",
    ]
    for model in with_sets:
        lines += [
            "",
            f"**{model}**",
            "",
            "| level | coverage | mean size | median size | singletons | empty | worst class |",
            "|---:|---:|---:|---:|---:|---:|---|",
        ]
        for level, m in served_scores(results.sets[model]).items():
            lines.append(
                f"| {level} | {_num(m['coverage'])} [{_num(m['coverage_ci_low'])}, "
                f"{_num(m['coverage_ci_high'])}] | {_num(m['mean_set_size'], 2)} | "
                f"{_num(m['median_set_size'], 1)} | {_num(m['singleton_share'])} | "
                f"{_num(m['empty_share'])} | {m['worst_class_name']} "
                f"({_num(m['worst_class_coverage'])}) |"
            )
        if model in figure_models:
            lines += ["", f"![set-size {model}](figures/{model}/{SET_VIEW}.png)"]
    return lines


def render_errors(errors: Mapping[str, Any], models: Sequence[str]) -> list[str]:
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


def report_html(markdown: str, folder: Path) -> str:
    """The report as one self-contained HTML page, figures inlined as data URIs: MLflow's
    artifact viewer renders Markdown without its images, but renders HTML.

    Args:
        markdown: The report.
        folder: What the report's image links are relative to.

    Raises:
        PipelineError: The report links a PNG that is not in ``folder``.
    """
    body = MarkdownIt("commonmark").enable("table").render(markdown)

    def inline(match: re.Match[str]) -> str:
        path = folder / html.unescape(match.group(1))
        if not path.is_file():
            raise PipelineError(f"{path}: the report links it, but it was not written")
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    return HTML_PAGE.format(body=re.sub(r'src="([^"]+\.png)"', inline, body))
