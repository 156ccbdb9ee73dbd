"""Evaluation plots as PNG files, and the same data as rows for DVC plots.

PNG functions take plain arrays and an output path and draw on a standalone
``matplotlib.figure.Figure`` (Agg canvas, no pyplot), so they never touch global state,
need no display and are safe to call from tests. The ``*_rows`` functions return lists of
flat dicts that the stage writes as JSON for ``dvc plots show`` (drawn by the Vega-Lite
templates in ``.dvc/plots/``); they are computed by the same metric code as the PNGs, so
both views always agree. Numbers are fractions in [0, 1] everywhere, never percentages,
as in ``reports/metrics.json`` and MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from pipeline.metrics import N_BINS, check_inputs, ece, reliability_bins, risk_coverage

DPI = 120


def _save(fig: Figure, path: str | Path, suptitle: str = "") -> Path:
    """Render with Agg and write the PNG, creating the parent folder."""
    if suptitle:
        fig.suptitle(suptitle)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
    return path


def _predictions(labels: np.ndarray, preds: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    labels, preds = np.asarray(labels), np.asarray(preds)
    if labels.shape != preds.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and preds {preds.shape} must be equal 1-d shapes")
    for name, arr in (("labels", labels), ("preds", preds)):
        if arr.size and (arr.min() < 0 or arr.max() >= k):
            raise ValueError(f"{name} must lie in [0, {k}) for {k} class names")
    return labels.astype(np.int64), preds.astype(np.int64)


def reliability_diagram(
    probs_before: np.ndarray,
    probs_after: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    n_bins: int = N_BINS,
    title: str = "",
) -> Path:
    """Reliability diagrams before and after calibration, each with its bin counts below.

    Bars are per-bin accuracy; the hatched red part spans the gap to the bin's mean
    confidence (above the bar: overconfident; across the bar: underconfident). Counts are
    drawn on a log scale because a confident model puts most rows in the last bin.
    """
    fig = Figure(figsize=(10, 6.5))
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1], hspace=0.08, wspace=0.2)
    width = 1.0 / n_bins
    for col, (name, probs) in enumerate((("before", probs_before), ("after", probs_after))):
        bins = reliability_bins(probs, labels, n_bins)
        ax = fig.add_subplot(grid[0, col])
        ax_count = fig.add_subplot(grid[1, col], sharex=ax)
        nonempty = bins.count > 0
        centers = (bins.lower + bins.upper) / 2
        acc = np.where(nonempty, bins.accuracy, 0.0)
        conf = np.where(nonempty, bins.confidence, 0.0)
        ax.bar(centers, acc, width=width, edgecolor="black", color="tab:blue", label="accuracy")
        ax.bar(
            centers[nonempty],
            (conf - acc)[nonempty],
            bottom=acc[nonempty],
            width=width,
            facecolor="none",
            edgecolor="tab:red",
            hatch="//",
            label="gap to mean confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{name}: ECE {ece(probs, labels, n_bins):.4f}")
        ax.tick_params(labelbottom=False)
        if col == 0:
            ax.set_ylabel("accuracy")
            ax.legend(loc="upper left", fontsize=8)
        ax_count.bar(centers, bins.count, width=width, color="grey", edgecolor="black")
        for x, c in zip(centers[nonempty], bins.count[nonempty], strict=True):
            ax_count.text(x, c, str(int(c)), ha="center", va="bottom", fontsize=6)
        ax_count.set_yscale("log")
        ax_count.set_ylim(0.8, max(2.0, bins.count.max() * 3))
        ax_count.set_xlabel(f"top-label confidence ({n_bins} equal-width bins)")
        if col == 0:
            ax_count.set_ylabel("count")
    return _save(fig, path, title)


def confidence_histogram(
    probs_before: np.ndarray,
    probs_after: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    n_bins: int = 20,
    title: str = "",
) -> Path:
    """Top-label confidence of correct vs wrong predictions, before and after calibration.

    Dashed lines mark accuracy and mean confidence: their distance is the overall
    over- or under-confidence (Guo et al. 2017, Figure 1).
    """
    fig = Figure(figsize=(10, 3.8))
    edges = np.linspace(0, 1, n_bins + 1)
    for col, (name, probs) in enumerate((("before", probs_before), ("after", probs_after))):
        probs, y = check_inputs(probs, labels)
        confidence = probs.max(axis=1)
        correct = probs.argmax(axis=1) == y
        ax = fig.add_subplot(1, 2, col + 1)
        ax.hist(
            [confidence[correct], confidence[~correct]],
            bins=edges,
            stacked=True,
            color=["tab:green", "tab:red"],
            label=["correct", "wrong"],
        )
        ax.axvline(correct.mean(), color="black", linestyle="--", label="accuracy")
        ax.axvline(confidence.mean(), color="tab:blue", linestyle=":", label="mean confidence")
        ax.set(xlim=(0, 1), xlabel="top-label confidence", title=name)
        if col == 0:
            ax.set_ylabel("documents")
            ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path, title)


def confusion_matrix_plot(
    labels: np.ndarray,
    preds: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """Confusion matrix coloured by row-normalised recall, annotated with raw counts.

    Row normalisation makes classes of different sizes comparable; the counts keep the
    absolute numbers visible. Zero cells are left blank so the errors stand out.
    """
    k = len(class_names)
    labels, preds = _predictions(labels, preds, k)
    cm = confusion_matrix(labels, preds, labels=np.arange(k))
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.nan_to_num(cm / cm.sum(axis=1, keepdims=True))
    size = max(5.0, 0.5 * k + 2)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fontsize = 7 if k > 10 else 9
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                color = "white" if rates[i, j] > 0.5 else "black"
                ax.text(
                    j, i, str(cm[i, j]), ha="center", va="center", fontsize=fontsize, color=color
                )
    ax.set_xticks(np.arange(k), labels=list(class_names), rotation=90, fontsize=fontsize + 1)
    ax.set_yticks(np.arange(k), labels=list(class_names), fontsize=fontsize + 1)
    ax.set(xlabel="predicted", ylabel="true")
    acc = float(np.trace(cm) / max(cm.sum(), 1))
    ax.set_title(f"{title + ': ' if title else ''}accuracy {acc:.4f} (n={cm.sum()})")
    return _save(fig, path)


def per_class_bars(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Horizontal precision and recall bars of :func:`per_class_rows` (horizontal so long
    class names stay readable)."""
    k = len(rows)
    ypos = np.arange(k)
    fig = Figure(figsize=(8, max(3.0, 0.35 * k + 1)))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(ypos - 0.2, [r["precision"] for r in rows], height=0.4, label="precision")
    ax.barh(ypos + 0.2, [r["recall"] for r in rows], height=0.4, label="recall")
    ax.set_yticks(ypos, labels=[f"{r['class']} ({r['support']})" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="score (support in brackets)", title=title or "per-class scores")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def set_size_histogram(
    counts_by_level: Mapping[str, np.ndarray], path: str | Path, title: str = ""
) -> Path:
    """Share of documents per prediction-set size, one bar group per size and one bar per
    coverage level (``counts_by_level``: level name -> documents per size 0, 1, ...)."""
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(counts_by_level), 1)
    for i, (level, counts) in enumerate(counts_by_level.items()):
        shares = np.asarray(counts, dtype=np.float64) / np.sum(counts)
        offset = (i - (len(counts_by_level) - 1) / 2) * width
        ax.bar(np.arange(shares.size) + offset, shares, width=width, label=f"level {level}")
    ax.set(xlabel="set size (classes)", ylabel="share of test documents", ylim=(0, 1))
    ax.set_title(title or "prediction-set sizes")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def risk_coverage_plot(
    probs_by_name: Mapping[str, np.ndarray],
    labels: np.ndarray,
    path: str | Path,
    title: str = "",
) -> Path:
    """Accuracy vs coverage when abstaining on the least confident documents, one line per model.

    Reading it: at coverage ``c`` the model answers the fraction ``c`` of documents it is
    most confident about; a curve that rises steeply toward low coverage means confidence
    ranks errors well.
    """
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for name, probs in probs_by_name.items():
        coverage, acc = risk_coverage(probs, labels)
        ax.plot(coverage, acc, label=f"{name} (all answered: {acc[-1]:.4f})")
    ax.set(xlim=(0, 1), xlabel="coverage (fraction answered)", ylabel="accuracy on answered")
    ax.set_title(title or "risk-coverage")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def reliability_rows(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS
) -> list[dict[str, Any]]:
    """Non-empty reliability bins as rows: bin, lower, upper, count, confidence, accuracy, gap."""
    bins = reliability_bins(probs, labels, n_bins)
    return [
        {
            "bin": int(i),
            "lower": float(bins.lower[i]),
            "upper": float(bins.upper[i]),
            "count": int(bins.count[i]),
            "confidence": float(bins.confidence[i]),
            "accuracy": float(bins.accuracy[i]),
            "gap": float(bins.confidence[i] - bins.accuracy[i]),
        }
        for i in np.flatnonzero(bins.count > 0)
    ]


def confidence_rows(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 20
) -> list[dict[str, Any]]:
    """Confidence histogram in long form: per bin (``lower``, ``upper``) one row for the
    correct and one for the wrong predictions (``outcome``, ``documents``), every bin, so
    a template can stack and colour them."""
    probs, y = check_inputs(probs, labels)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0, 1, n_bins + 1)
    counts = {
        "correct": np.histogram(confidence[correct], bins=edges)[0],
        "wrong": np.histogram(confidence[~correct], bins=edges)[0],
    }
    return [
        {
            "lower": float(edges[i]),
            "upper": float(edges[i + 1]),
            "outcome": outcome,
            "documents": int(count[i]),
        }
        for i in range(n_bins)
        for outcome, count in counts.items()
    ]


def risk_coverage_rows(
    probs: np.ndarray, labels: np.ndarray, points: int = 100
) -> list[dict[str, float]]:
    """The risk-coverage curve at about ``points`` evenly spaced coverages (always incl. 100%).

    Thinned so the committed JSON stays small whatever the test-set size.
    """
    coverage, acc = risk_coverage(probs, labels)
    n = len(coverage)
    idx = np.unique(np.linspace(0, n - 1, min(points, n)).round().astype(np.int64))
    return [
        {"coverage": float(coverage[i]), "accuracy": float(acc[i]), "risk": float(1 - acc[i])}
        for i in idx
    ]


def confusion_rows(
    labels: np.ndarray, preds: np.ndarray, class_names: Sequence[str]
) -> list[dict[str, str]]:
    """One row per document, ``{"actual", "predicted"}`` class names: DVC's confusion format."""
    labels, preds = _predictions(labels, preds, len(class_names))
    names = list(class_names)
    return [
        {"actual": names[a], "predicted": names[p]}
        for a, p in zip(labels.tolist(), preds.tolist(), strict=True)
    ]


def per_class_rows(
    labels: np.ndarray, preds: np.ndarray, class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """Per-class precision, recall, F1 and support (scikit-learn; 0 where undefined)."""
    k = len(class_names)
    labels, preds = _predictions(labels, preds, k)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=np.arange(k), zero_division=0
    )
    return [
        {
            "class": str(class_names[j]),
            "precision": float(precision[j]),
            "recall": float(recall[j]),
            "f1": float(f1[j]),
            "support": int(support[j]),
        }
        for j in range(k)
    ]
