"""Scoring every model's conformal prediction sets on the test split.

Per model: the thresholds ``calibrate`` stored in its calibrator JSON, applied to its
calibrated test probabilities, and per conformal method, variant and level the numbers of
:func:`pipeline.conformal_metrics.set_summary`. The method and variant the registered
model serves (``register.set_method``, ``register.set_variant``) give the headline
(coverage and mean set size at :data:`HEADLINE_LEVEL`) and the set-size views. Only test
rows are read; nothing is fitted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import paths, plots
from pipeline.conformal import METHODS, VARIANTS, ConformalState, set_mask
from pipeline.conformal_metrics import set_summary
from pipeline.errors import PipelineError
from pipeline.io import write_json
from pipeline.schemas import SetMetricsRow, validate
from pipeline.served_sets import level_key, read_state
from pipeline.set_params import SetChoice

HEADLINE_LEVEL = 0.95
"""The one level of ``reports/metrics.json`` (the others are in the detail file)."""
SET_VIEW = "set_size"
"""The set-size histogram: ``reports/plots/set_size/<model>.json`` and
``reports/figures/<model>/set_size.png``."""
ROW_KEYS = (
    "coverage",
    "coverage_ci_low",
    "coverage_ci_high",
    "mean_set_size",
    "median_set_size",
    "singleton_share",
    "empty_share",
    "worst_class_coverage",
)
"""The numbers of a :class:`pipeline.schemas.SetMetricsRow`."""


def read_set_states(models: Sequence[str]) -> dict[str, ConformalState | None]:
    """The conformal state of each model's calibrator JSON (None where it holds none).

    Raises:
        PipelineError: A file is unreadable or its state is malformed (the path first).
    """
    found = {}
    for model in models:
        path = paths.calibrator_file(model)
        try:
            found[model] = read_state(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, PipelineError) as exc:
            raise PipelineError(f"{path}: {exc}") from None
    return found


def score_sets(
    probs: np.ndarray,
    labels: np.ndarray,
    state: ConformalState,
    choice: SetChoice,
    n_boot: int,
    seed: int,
    groups: Sequence[str],
) -> dict[str, Any]:
    """One model's sets on its test rows, at every fitted method, variant and level.

    Args:
        probs: Calibrated test probabilities (n, k).
        labels: Test labels.
        state: The thresholds fitted by ``calibrate``.
        choice: The served method and variant.
        n_boot: Bootstrap resamples of the coverage interval, seeded by ``seed``.
        groups: Class names.

    Returns:
        ``method`` and ``variant`` (served), ``fallback`` (per level, the classes whose
        Mondrian threshold is the marginal one) and ``scores``: method -> variant ->
        level (:func:`pipeline.served_sets.level_key`) -> :func:`set_summary` plus
        ``worst_class_name``.
    """
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for method in METHODS:
        for variant in VARIANTS:
            by_level = scores.setdefault(method, {}).setdefault(variant, {})
            for level in state.levels:
                mask = set_mask(probs, state, level, method, variant)
                summary = set_summary(mask, labels, n_boot, seed)
                summary["worst_class_name"] = groups[int(summary["worst_class"])]
                by_level[level_key(level)] = summary
    return {
        "method": choice.set_method,
        "variant": choice.set_variant,
        "fallback": {
            level_key(level): [groups[c] for c in classes]
            for level, classes in zip(state.levels, state.fallback, strict=True)
        },
        "scores": scores,
    }


def served_scores(sets: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The summaries of the served method and variant, by level key."""
    return sets["scores"][sets["method"]][sets["variant"]]


def headline(sets: Mapping[str, Any]) -> dict[str, float]:
    """``coverage_95`` and ``mean_size_95`` of the served sets (empty if 0.95 is not fitted)."""
    summary = served_scores(sets).get(level_key(HEADLINE_LEVEL))
    if summary is None:
        return {}
    suffix = f"{HEADLINE_LEVEL * 100:g}"
    return {
        f"coverage_{suffix}": summary["coverage"],
        f"mean_size_{suffix}": summary["mean_set_size"],
    }


def validate_set_rows(sets_by_model: Mapping[str, Mapping[str, Any]], source: str) -> None:
    """Check every score of :func:`score_sets` against :class:`SetMetricsRow`.

    Raises:
        PipelineError: A number out of range or an interval out of order.
    """
    rows = [
        {"model": model, "method": m, "variant": v, "level": float(level)}
        | {k: summary[k] for k in ROW_KEYS}
        for model, sets in sets_by_model.items()
        for m, by_variant in sets["scores"].items()
        for v, by_level in by_variant.items()
        for level, summary in by_level.items()
    ]
    if rows:
        validate(pd.DataFrame(rows), SetMetricsRow, source)


def write_set_views(
    plot_dir: Path,
    figure_dir: Path,
    model: str,
    probs: np.ndarray,
    state: ConformalState,
    choice: SetChoice,
) -> None:
    """The served sets' size histogram at each level: the DVC plot
    ``plot_dir/set_size/<model>.json`` (rows ``model``, ``level``, ``size``, ``documents``)
    and the PNG ``figure_dir/<model>/set_size.png``."""
    method, variant = choice.set_method, choice.set_variant
    sizes = {
        level_key(level): set_mask(probs, state, level, method, variant).sum(axis=1)
        for level in state.levels
    }
    largest = max(int(s.max()) for s in sizes.values())
    counts = {key: np.bincount(s, minlength=largest + 1) for key, s in sizes.items()}
    path = plot_dir / paths.model_plot(SET_VIEW, model).relative_to(paths.PLOTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(
        path,
        [
            {"model": model, "level": key, "size": size, "documents": int(n)}
            for key, row in counts.items()
            for size, n in enumerate(row)
        ],
    )
    title = f"{model}: {method}, {variant}"
    plots.set_size_histogram(counts, figure_dir / model / f"{SET_VIEW}.png", title=title)
