"""Split conformal prediction sets on top of calibrated class probabilities.

Given calibrated probabilities on ``n`` validation rows and their labels, a conformal
threshold turns a new row's probabilities into a set of classes that holds the true class
with probability at least ``level``, marginally over rows, provided the validation rows
and the new row are exchangeable (Vovk et al. 2005; Angelopoulos & Bates 2021).

Scores (smaller means the class fits the row better); the set of a row is every class
whose score is at most the threshold:

- ``lac`` (Sadinle, Lei & Wasserman 2019): ``1 - p_y``. The smallest sets on average.
- ``aps`` (Romano, Sesia & Candès 2020), non-randomised: the total probability of the
  classes ranked at or above ``y`` (the mass ranked above ``y`` plus ``y``'s own), ranking
  by decreasing probability with ties broken by class index. Sets grow on hard rows.
  Served sets must be deterministic, so the randomised variant is not provided.

Either set may be empty (the top class alone scores above the threshold).

Threshold at ``level``: the ``k``-th smallest validation score, ``k = ceil((n + 1) *
level)``, i.e. the empirical quantile at ``k / n`` without interpolation. It exists when
``k <= n``, i.e. ``n >= level / (1 - level)`` (``1 / alpha - 1`` rows, 19 at 0.95: see
:func:`min_rows`); with fewer rows the threshold is infinite and the set is every class.

Mondrian (class-conditional) variant: the threshold of class ``c`` is computed from the
validation rows labelled ``c`` alone, which gives coverage at ``level`` for each class;
a class with fewer than :func:`min_rows` rows takes the marginal threshold instead and is
listed in the state's ``fallback``. For each class and variant the thresholds are made
non-decreasing in the level (a running maximum, which can only raise coverage), so the set
at a lower level is a subset of the set at a higher one for every row.

:func:`cross_fit` scores validation rows with out-of-fold probabilities, so the thresholds
do not use probabilities of a calibrator fitted on the same rows. The module needs numpy
only: the state is a plain JSON-serialisable dict (:meth:`ConformalState.to_dict`).
:mod:`pipeline.conformal_metrics` scores the sets.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METHODS: tuple[str, ...] = ("lac", "aps")
"""Conformity scores, each fitted in every state."""

VARIANTS: tuple[str, ...] = ("marginal", "mondrian")
"""One threshold for all classes, or one per class (with the marginal one as fallback)."""

_TOL = 1e-9
"""Slack for float rounding in ``(n + 1) * level`` and when matching a requested level."""

FitPredict = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``fit_predict(train_idx, held_out_idx)``: fit on the train rows, return probabilities
(len(held_out_idx), k) for the held-out rows."""


def check_level(level: Any, key: str = "level") -> float:
    """The coverage level as a float in (0, 1).

    Raises:
        ValueError: one line naming ``key`` when ``level`` is not a number in (0, 1).
    """
    if isinstance(level, bool) or not isinstance(level, int | float | np.floating):
        raise ValueError(f"{key} must be a number in (0, 1), got {level!r}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"{key} must lie in (0, 1), got {level!r}")
    return float(level)


def min_rows(level: float) -> int:
    """The fewest rows with a finite threshold at ``level``: ``ceil(level / (1 - level))``."""
    level = check_level(level)
    return math.ceil(level / (1.0 - level) - _TOL)


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The split-conformal threshold of ``scores`` at ``level``.

    Returns:
        The ``ceil((n + 1) * level)``-th smallest score, or ``inf`` when that rank exceeds
        ``n`` (too few rows for the level, the empty array included).
    """
    level = check_level(level)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n = scores.size
    rank = math.ceil((n + 1) * level - _TOL)
    if rank > n:
        return math.inf
    return float(np.partition(scores, rank - 1)[rank - 1])


def _check_probs(probs: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must have shape (n, k>=2), got {probs.shape}")
    if num_classes is not None and probs.shape[1] != num_classes:
        raise ValueError(f"expected {num_classes} classes, got probs of shape {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contain NaN or infinite values")
    return probs


def check_labels(labels: np.ndarray, n: int, k: int) -> np.ndarray:
    """``labels`` as int64, checked to be ``n`` integers in ``[0, k)`` (else ValueError)."""
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {n} integers, got shape {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in [0, {k})")
    return labels.astype(np.int64)


def class_scores(probs: np.ndarray, method: str) -> np.ndarray:
    """The conformity score of every candidate class of every row.

    Args:
        probs: (n, k) class probabilities.
        method: one of :data:`METHODS`.

    Returns:
        (n, k) float64 scores; a row's set at threshold ``q`` is ``scores[i] <= q``.
    """
    probs = _check_probs(probs)
    if method == "lac":
        return 1.0 - probs
    if method != "aps":
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    order = np.argsort(-probs, axis=1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    scores = np.empty_like(probs)
    np.put_along_axis(scores, order, cumulative, axis=1)
    return scores


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold id in ``[0, folds)`` per row; each class is spread evenly over the folds.

    Rows of each class are shuffled by one seeded generator and dealt round-robin, so
    fold sizes, overall and per class, differ by at most one.

    Raises:
        ValueError: when ``folds`` is not in ``[2, n]``.
    """
    labels = np.asarray(labels).ravel()
    if not 2 <= folds <= labels.size:
        raise ValueError(f"folds must lie in [2, {labels.size}] (the row count), got {folds}")
    rng = np.random.default_rng(seed)
    order = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    )
    fold_of = np.empty(labels.size, dtype=np.int64)
    fold_of[order] = np.arange(labels.size) % folds
    return fold_of


def cross_fit(labels: np.ndarray, fit_predict: FitPredict, folds: int, seed: int) -> np.ndarray:
    """Out-of-fold probabilities: each row is predicted by a fit that never saw its fold.

    Args:
        labels: (n,) integer labels, used only to stratify the folds.
        fit_predict: called once per fold with ``(train_idx, held_out_idx)``.
        folds: number of folds (see :func:`stratified_folds`).
        seed: seeds the fold assignment.

    Returns:
        (n, k) probabilities, row ``i`` from the fit that held out ``i``'s fold.
    """
    fold_of = stratified_folds(labels, folds, seed)
    out: np.ndarray | None = None
    for fold in range(folds):
        held_out = np.flatnonzero(fold_of == fold)
        probs = _check_probs(fit_predict(np.flatnonzero(fold_of != fold), held_out))
        if probs.shape[0] != held_out.size:
            raise ValueError(f"fit_predict returned {probs.shape[0]} rows for {held_out.size}")
        if out is None:
            out = np.empty((fold_of.size, probs.shape[1]))
        elif probs.shape[1] != out.shape[1]:
            raise ValueError(f"fit_predict returned {probs.shape[1]} classes, not {out.shape[1]}")
        out[held_out] = probs
    assert out is not None  # folds >= 2
    return out


@dataclass(frozen=True)
class ConformalState:
    """Fitted thresholds of every method and variant at each level (see :func:`fit_conformal`).

    Attributes:
        levels: fitted coverage levels, strictly increasing.
        class_counts: validation rows per class (``n`` is their sum).
        fallback: per level, the classes whose Mondrian threshold is the marginal one.
        thresholds: ``method -> variant -> (levels, k)`` array, ``inf`` for "every class".
    """

    levels: tuple[float, ...]
    class_counts: tuple[int, ...]
    fallback: tuple[tuple[int, ...], ...]
    thresholds: Mapping[str, Mapping[str, np.ndarray]]

    @property
    def n(self) -> int:
        """Validation rows the thresholds were fitted on."""
        return sum(self.class_counts)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_counts)

    def level_index(self, level: float) -> int:
        """Position of ``level`` in :attr:`levels`.

        Raises:
            ValueError: one line naming the level and the fitted levels.
        """
        for i, fitted in enumerate(self.levels):
            if abs(fitted - level) <= _TOL:
                return i
        fitted_text = ", ".join(f"{v:g}" for v in self.levels)
        raise ValueError(f"level {level:g} was not fitted (fitted levels: {fitted_text})")

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-serialisable dict; infinite thresholds become ``None``."""
        return {
            "levels": list(self.levels),
            "n": self.n,
            "class_counts": list(self.class_counts),
            "fallback": [list(classes) for classes in self.fallback],
            "thresholds": {
                method: {
                    "marginal": _to_json(by_variant["marginal"][:, 0]),
                    "mondrian": [_to_json(row) for row in by_variant["mondrian"]],
                }
                for method, by_variant in self.thresholds.items()
            },
        }

    @staticmethod
    def from_dict(state: Mapping[str, Any]) -> ConformalState:
        """Rebuild a state from :meth:`to_dict` output, validating every key.

        Raises:
            ValueError: one line naming the first key that is missing or malformed.
        """
        levels = _levels_from(state)
        counts = tuple(_int_list(state, "class_counts", None))
        if len(counts) < 2 or _get(state, "n") != sum(counts):
            raise ValueError("conformal state: 'n' must equal the sum of 'class_counts' (k>=2)")
        fallback = _get(state, "fallback")
        if not isinstance(fallback, list) or len(fallback) != len(levels):
            raise ValueError(f"conformal state: 'fallback' must be a list of {len(levels)} lists")
        fallback_sets = tuple(
            tuple(_int_list({"fallback": f}, "fallback", len(counts))) for f in fallback
        )
        thresholds = _get(state, "thresholds")
        if not isinstance(thresholds, Mapping) or set(thresholds) != set(METHODS):
            raise ValueError(f"conformal state: 'thresholds' must have the keys {list(METHODS)}")
        table = {m: _thresholds_from(thresholds[m], m, len(levels), len(counts)) for m in METHODS}
        return ConformalState(levels, counts, fallback_sets, table)


def _get(state: Mapping[str, Any], key: str) -> Any:
    if key not in state:
        raise ValueError(f"conformal state: missing key {key!r}")
    return state[key]


def _to_json(values: np.ndarray) -> list[float | None]:
    return [None if math.isinf(v) else float(v) for v in values]


def _levels_from(state: Mapping[str, Any]) -> tuple[float, ...]:
    levels = _get(state, "levels")
    if not isinstance(levels, list) or not levels:
        raise ValueError("conformal state: 'levels' must be a non-empty list")
    values = tuple(check_level(v, "levels") for v in levels)
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError("conformal state: 'levels' must be strictly increasing")
    return values


def _int_list(state: Mapping[str, Any], key: str, below: int | None) -> list[int]:
    values = _get(state, key)
    ok = isinstance(values, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    )
    if not ok or (below is not None and any(v >= below for v in values)):
        bound = "" if below is None else f" below {below}"
        raise ValueError(f"conformal state: {key!r} must be a list of integers >= 0{bound}")
    return values


def _float_row(values: Any, key: str, size: int) -> np.ndarray:
    ok = isinstance(values, list) and len(values) == size
    if ok and all(
        v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in values
    ):
        row = np.array([math.inf if v is None else float(v) for v in values])
        if not np.isnan(row).any():
            return row
    raise ValueError(f"conformal state: {key!r} must be a list of {size} numbers or null")


def _thresholds_from(by_variant: Any, method: str, n_levels: int, k: int) -> dict[str, np.ndarray]:
    key = f"thresholds.{method}"
    if not isinstance(by_variant, Mapping) or set(by_variant) != set(VARIANTS):
        raise ValueError(f"conformal state: {key!r} must have the keys {list(VARIANTS)}")
    marginal = _float_row(by_variant["marginal"], f"{key}.marginal", n_levels)
    rows = by_variant["mondrian"]
    if not isinstance(rows, list) or len(rows) != n_levels:
        raise ValueError(f"conformal state: '{key}.mondrian' must be a list of {n_levels} lists")
    table = {
        "marginal": np.repeat(marginal[:, None], k, axis=1),
        "mondrian": np.stack([_float_row(r, f"{key}.mondrian", k) for r in rows]),
    }
    for variant, values in table.items():
        if np.any(values[1:] < values[:-1]):
            raise ValueError(f"conformal state: '{key}.{variant}' must not decrease with the level")
    return table


def fit_conformal(probs: np.ndarray, labels: np.ndarray, levels: Sequence[float]) -> ConformalState:
    """Fit the thresholds of every method and variant at each level.

    Args:
        probs: (n, k) calibrated probabilities of the validation rows, ideally out-of-fold
            (:func:`cross_fit`); never test rows.
        labels: (n,) integer labels in ``[0, k)``.
        levels: coverage levels in (0, 1), distinct; stored sorted.

    Returns:
        The fitted state. A class with fewer than ``min_rows(level)`` rows falls back to
        the marginal threshold at that level and is listed in ``fallback``.
    """
    probs = _check_probs(probs)
    n, k = probs.shape
    labels = check_labels(labels, n, k)
    values = sorted(check_level(v, "levels") for v in levels)
    if not values or any(b - a <= _TOL for a, b in itertools.pairwise(values)):
        raise ValueError(f"levels must be a non-empty list of distinct levels, got {list(levels)}")
    counts = np.bincount(labels, minlength=k)
    fallback = tuple(tuple(np.flatnonzero(counts < min_rows(v)).tolist()) for v in values)
    table: dict[str, dict[str, np.ndarray]] = {}
    for method in METHODS:
        true_scores = class_scores(probs, method)[np.arange(n), labels]
        by_class = [true_scores[labels == c] for c in range(k)]
        marginal = np.array([conformal_quantile(true_scores, v) for v in values])
        mondrian = np.array(
            [[conformal_quantile(by_class[c], v) for c in range(k)] for v in values]
        )
        for i, classes in enumerate(fallback):
            mondrian[i, list(classes)] = marginal[i]
        table[method] = {
            "marginal": np.repeat(np.maximum.accumulate(marginal)[:, None], k, axis=1),
            "mondrian": np.maximum.accumulate(mondrian, axis=0),
        }
    return ConformalState(tuple(values), tuple(counts.tolist()), fallback, table)


def set_mask(
    probs: np.ndarray, state: ConformalState, level: float, method: str, variant: str
) -> np.ndarray:
    """Membership of every class in every row's prediction set (deterministic).

    Returns:
        (n, k) booleans: class ``j`` is in row ``i``'s set when its score is at most the
        threshold of ``j`` (the same for all classes in the marginal variant).

    Raises:
        ValueError: a level outside (0, 1), a level not fitted, an unknown method or
            variant, or probabilities of the wrong shape (one line each).
    """
    index = state.level_index(check_level(level))
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    scores = class_scores(_check_probs(probs, state.num_classes), method)
    return scores <= state.thresholds[method][variant][index]


def prediction_sets(
    probs: np.ndarray, state: ConformalState, level: float, method: str, variant: str
) -> list[list[int]]:
    """Each row's prediction set as class indices, most probable first (ties: lower index).

    Same arguments and errors as :func:`set_mask`.
    """
    mask = set_mask(probs, state, level, method, variant)
    order = np.argsort(-np.asarray(probs, dtype=np.float64), axis=1, kind="stable")
    return [[int(j) for j in row if keep[j]] for row, keep in zip(order, mask, strict=True)]
