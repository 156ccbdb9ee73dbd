"""Evaluation of conformal prediction sets: coverage, set sizes, per-class coverage.

Every function takes ``mask`` (n, k): booleans, class ``j`` in row ``i``'s set (from
:func:`pipeline.conformal.set_mask`), and ``labels`` (n,): integer classes in ``[0, k)``.
They are pure, so evaluation and tests score sets the same way.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.conformal import check_labels


def _covered(mask: np.ndarray, labels: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or mask.shape[0] == 0:
        raise ValueError(f"mask must have shape (n>0, k), got {mask.shape}")
    labels = check_labels(labels, mask.shape[0], mask.shape[1])
    return mask[np.arange(labels.size), labels]


def coverage(mask: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose set holds their label."""
    return float(_covered(mask, labels).mean())


def coverage_ci(
    mask: np.ndarray, labels: np.ndarray, n_boot: int, seed: int, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` interval of the coverage, rows resampled.

    One seeded generator draws ``n_boot`` resamples of all rows, so it is reproducible.
    """
    covered = _covered(mask, labels).astype(np.float64)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        stats[b] = covered[rng.integers(0, covered.size, size=covered.size)].mean()
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def class_coverage(mask: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(k,) coverage among the rows of each class; NaN for a class without rows."""
    covered = _covered(mask, labels)
    labels = np.asarray(labels, dtype=np.int64)
    k = np.asarray(mask).shape[1]
    rows = np.bincount(labels, minlength=k)
    hits = np.bincount(labels, weights=covered, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, hits / np.maximum(rows, 1), np.nan)


def set_summary(
    mask: np.ndarray, labels: np.ndarray, n_boot: int, seed: int
) -> dict[str, float | int | list[float | None]]:
    """Coverage (with a bootstrap 95% interval), set sizes and per-class coverage.

    Returns:
        Flat keys ``coverage``, ``coverage_ci_low``, ``coverage_ci_high``,
        ``mean_set_size``, ``median_set_size``, ``singleton_share``, ``empty_share``,
        ``worst_class`` (the lowest-covered class with rows, lowest index on ties),
        ``worst_class_coverage`` and ``class_coverage`` (per class, ``None`` without rows).
    """
    sizes = np.asarray(mask, dtype=bool).sum(axis=1)
    per_class = class_coverage(mask, labels)
    worst = int(np.nanargmin(per_class))
    low, high = coverage_ci(mask, labels, n_boot, seed)
    return {
        "coverage": coverage(mask, labels),
        "coverage_ci_low": low,
        "coverage_ci_high": high,
        "mean_set_size": float(sizes.mean()),
        "median_set_size": float(np.median(sizes)),
        "singleton_share": float(np.mean(sizes == 1)),
        "empty_share": float(np.mean(sizes == 0)),
        "worst_class": worst,
        "worst_class_coverage": float(per_class[worst]),
        "class_coverage": [None if math.isnan(v) else float(v) for v in per_class],
    }
