"""Choosing a calibrator: fit one by name, or pick one by cross-validated NLL."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from pipeline.calibration.base import Calibrator, check_labels, check_logits
from pipeline.errors import PipelineError
from pipeline.metrics import nll

METHODS: tuple[str, ...] = (
    "temperature",
    "ets",
    "temperature_platt",
    "vector",
    "matrix",
    "histogram",
    "isotonic",
)
"""The calibration methods :func:`select_auto` compares by default, simplest first."""


def fit_calibrator(
    method: str, logits: np.ndarray, labels: np.ndarray, seed: int, **opts: Any
) -> Calibrator:
    """Fit the calibrator named ``method`` on validation data.

    Args:
        method: A registered method: one of :data:`METHODS`, or ``none``.
        logits: Validation logits, shape (n, k).
        labels: Validation labels, n integers in ``[0, k)``.
        seed: Passed on to :meth:`Calibrator.fit`.
        **opts: Method options: ``max_iter`` for the scaling methods, plus ``reg`` for
            ``vector`` and ``matrix``; ``n_bins`` and ``eps`` for ``histogram``; ``eps``
            for ``isotonic``.

    Returns:
        The fitted calibrator.

    Raises:
        PipelineError: An unknown method or option, so a typo in params fails loudly.
        ValueError: Bad logits or labels (see :meth:`Calibrator.fit`).
    """
    cls = Calibrator.registry.get(method)
    if cls is None:
        allowed = ", ".join(sorted(Calibrator.registry))
        raise PipelineError(f"unknown calibration method {method!r} (known: {allowed})")
    try:
        return cls.fit(logits, labels, seed, **opts)
    except TypeError as exc:
        raise PipelineError(f"calibration method {method!r}: bad options {opts}: {exc}") from None


def select_auto(
    logits: np.ndarray,
    labels: np.ndarray,
    methods: Sequence[str] = METHODS,
    folds: int = 5,
    seed: int = 0,
    method_opts: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Pick the method with the lowest mean held-out NLL under stratified K-fold CV.

    Uses the validation split only: each method is fitted on ``folds - 1`` parts and scored
    on the remaining one, with the same (seeded, shuffled) folds for every method.

    Args:
        logits: Validation logits, shape (n, k).
        labels: Validation labels, n integers in ``[0, k)``.
        methods: The candidates; ties go to the one listed first, so list simpler first.
        folds: The number of folds, from 2 to the size of the largest class.
        seed: Seeds the fold shuffle.
        method_opts: Options per method, passed to :func:`fit_calibrator`.

    Returns:
        The chosen method and ``{method: {"mean_nll", "std_nll", "fold_nll"}}``.

    Raises:
        PipelineError: No method, an unknown method or option, or ``folds`` out of range.
        ValueError: Bad logits or labels.
    """
    logits = check_logits(logits)
    labels = check_labels(labels, *logits.shape)
    _check_candidates(methods, labels, folds)
    method_opts = method_opts or {}
    splits = _stratified_folds(logits, labels, folds, seed)
    table: dict[str, dict[str, Any]] = {}
    for method in methods:
        scores = []
        for train_idx, test_idx in splits:
            cal = fit_calibrator(
                method, logits[train_idx], labels[train_idx], seed, **method_opts.get(method, {})
            )
            scores.append(nll(cal.predict_proba(logits[test_idx]), labels[test_idx]))
        table[method] = {
            "mean_nll": float(np.mean(scores)),
            "std_nll": float(np.std(scores)),
            "fold_nll": [float(s) for s in scores],
        }
    best = min(methods, key=lambda m: table[m]["mean_nll"])  # min keeps the first on ties
    return best, table


def _check_candidates(methods: Sequence[str], labels: np.ndarray, folds: int) -> None:
    """Check :func:`select_auto`'s methods and fold count against checked ``labels``.

    Raises:
        PipelineError: No method, an unknown method, or ``folds`` outside
            ``[2, size of the largest class]``.
    """
    if not methods:
        raise PipelineError("calibration auto-selection needs at least one method")
    unknown = [m for m in methods if m not in Calibrator.registry]
    if unknown:
        allowed = ", ".join(sorted(Calibrator.registry))
        raise PipelineError(f"unknown calibration methods {unknown} (known: {allowed})")
    largest_class = int(np.bincount(labels).max())
    if not 2 <= folds <= largest_class:
        raise PipelineError(
            f"calibration folds={folds} must lie in [2, {largest_class}] "
            "(the size of the largest validation class)"
        )


def _stratified_folds(
    logits: np.ndarray, labels: np.ndarray, folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train_idx, test_idx)`` of each fold: stratified by label, shuffled with ``seed``."""
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Small (smoke) validation splits have classes rarer than `folds`; that is fine here.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return list(splitter.split(logits, labels))
