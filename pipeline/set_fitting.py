"""Conformal thresholds of one model, fitted by ``calibrate`` on its validation rows.

The calibrator is fitted on the same validation rows, so the rows are scored with
out-of-fold probabilities: each from the same calibration method refitted without the
row's fold (:func:`pipeline.conformal.cross_fit`). The method ``none`` fits nothing, so
its probabilities are the softmax itself. Test rows are never read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.calibration import fit_calibrator, softmax
from pipeline.conformal import METHODS, ConformalState, cross_fit, fit_conformal
from pipeline.errors import PipelineError
from pipeline.served_sets import level_key


def out_of_fold_probs(
    logits: np.ndarray,
    labels: np.ndarray,
    method: str,
    opts: Mapping[str, Any],
    folds: int,
    seed: int,
) -> np.ndarray:
    """Validation probabilities, each row from a ``method`` calibrator that never saw it.

    Args:
        logits: Validation logits (n, k).
        labels: Validation labels, n integers in ``[0, k)``.
        method: The calibration method (after ``auto`` chose one).
        opts: Its options (:func:`pipeline.calibration.fit_calibrator`).
        folds: Stratified folds, seeded by ``seed``.

    Raises:
        PipelineError: ``folds`` exceeds the rows, or a fold's fit fails on bad input.
    """
    if method == "none":
        return softmax(logits)

    def fit_predict(train: np.ndarray, held_out: np.ndarray) -> np.ndarray:
        calibrator = fit_calibrator(method, logits[train], labels[train], seed, **opts)
        return calibrator.predict_proba(logits[held_out])

    try:
        return cross_fit(labels, fit_predict, folds, seed)
    except ValueError as exc:
        raise PipelineError(f"conformal sets: {exc}") from None


def fit_sets(
    logits: np.ndarray,
    labels: np.ndarray,
    method: str,
    opts: Mapping[str, Any],
    levels: Sequence[float],
    folds: int,
    seed: int,
) -> ConformalState:
    """Thresholds of every conformal method and variant at ``levels``, fitted on the
    out-of-fold probabilities of :func:`out_of_fold_probs` (same arguments)."""
    probs = out_of_fold_probs(logits, labels, method, opts, folds, seed)
    return fit_conformal(probs, labels, levels)


def sets_summary(
    state: ConformalState, groups: Sequence[str], method: str, folds: int
) -> dict[str, Any]:
    """What ``reports/calibrate/<model>.json`` says about the thresholds.

    Returns:
        ``levels``, ``scored_with`` (how the validation rows were scored), the marginal
        ``thresholds`` per conformal method and level (``None``: every class) and, per
        level, the classes whose Mondrian threshold ``fallback`` to the marginal one.
    """
    scored = "softmax (method none)" if method == "none" else f"{method}, {folds}-fold cross-fit"
    return {
        "levels": list(state.levels),
        "scored_with": scored,
        "thresholds": {
            m: {
                level_key(level): _finite(state.thresholds[m]["marginal"][i, 0])
                for i, level in enumerate(state.levels)
            }
            for m in METHODS
        },
        "fallback": {
            level_key(level): [groups[c] for c in classes]
            for level, classes in zip(state.levels, state.fallback, strict=True)
        },
    }


def _finite(value: float) -> float | None:
    return None if np.isinf(value) else float(value)
