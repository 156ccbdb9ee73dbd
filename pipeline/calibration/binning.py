"""Binning calibrators: one-vs-rest maps of each class's softmax probability.

- ``histogram`` (Zadrozny & Elkan, 2001): equal-width bins, each predicting its share of
  positives.
- ``isotonic`` (Zadrozny & Elkan, 2002): a non-decreasing step map (scikit-learn's
  isotonic regression).

Both renormalise the per-class scores to sum to 1. Prediction never calls scikit-learn, so
a saved calibrator does not depend on its pickle format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from sklearn.isotonic import IsotonicRegression

from pipeline.calibration.base import Calibrator, softmax, state_array
from pipeline.errors import PipelineError
from pipeline.metrics import bin_index

DEFAULT_EPS = 1e-6
"""Floor for one-vs-rest scores before renormalising, so no class gets probability 0."""


def _renormalise(scores: np.ndarray, fallback: np.ndarray, eps: float) -> np.ndarray:
    """Turn one-vs-rest scores into a distribution: clip, guard, floor at ``eps``, normalise.

    A row whose scores are all 0 (every class mapped to an empty-evidence region) falls back
    to the uncalibrated probabilities instead of dividing by zero.
    """
    scores = np.clip(scores, 0.0, 1.0)
    dead = ~(scores.sum(axis=1) > 0)
    scores[dead] = fallback[dead]
    scores = np.maximum(scores, eps)
    return scores / scores.sum(axis=1, keepdims=True)


@dataclass(eq=False)
class HistogramBinning(Calibrator):
    """One-vs-rest histogram binning on softmax probabilities, then renormalised.

    Each class's probability range is cut into ``n_bins`` equal-width bins; a bin predicts
    the fraction of validation rows in it that belong to the class. A bin no validation row
    fell in keeps its midpoint (no evidence, so roughly no change). Fit options:
    ``n_bins`` and ``eps`` (the score floor, :data:`DEFAULT_EPS`).
    """

    method: ClassVar[str] = "histogram"
    values: np.ndarray  # (k, n_bins)
    eps: float = DEFAULT_EPS

    @classmethod
    def _fit(
        cls, logits: np.ndarray, labels: np.ndarray, n_bins: int = 15, eps: float = DEFAULT_EPS
    ) -> HistogramBinning:
        if n_bins < 1:
            raise PipelineError(f"histogram binning: n_bins={n_bins} must be >= 1")
        probs = softmax(logits)
        k = logits.shape[1]
        midpoints = (np.arange(n_bins) + 0.5) / n_bins
        values = np.empty((k, n_bins))
        for j in range(k):
            idx = bin_index(probs[:, j], n_bins)
            count = np.bincount(idx, minlength=n_bins)
            positives = np.bincount(idx, weights=(labels == j).astype(np.float64), minlength=n_bins)
            with np.errstate(invalid="ignore", divide="ignore"):
                values[j] = np.where(count > 0, positives / count, midpoints)
        return cls(k, values, eps)

    def _predict(self, logits: np.ndarray) -> np.ndarray:
        probs = softmax(logits)
        n_bins = self.values.shape[1]
        scores = np.empty_like(probs)
        for j in range(self.num_classes):
            scores[:, j] = self.values[j, bin_index(probs[:, j], n_bins)]
        return _renormalise(scores, probs, self.eps)

    def _state(self) -> dict[str, Any]:
        return {"eps": self.eps, "values": self.values.tolist()}

    @classmethod
    def _from_state(cls, state: Mapping[str, Any], k: int) -> HistogramBinning:
        values = np.asarray(state.get("values", []), dtype=np.float64)
        if values.ndim != 2:
            raise PipelineError("calibrator state: 'values' must be a (k, n_bins) table")
        return cls(k, state_array(state, "values", (k, values.shape[1])), _eps(state))


def _eps(state: Mapping[str, Any]) -> float:
    """The saved score floor ``state["eps"]``, checked to lie in (0, 1)."""
    eps = float(state_array(state, "eps", ()))
    if not 0 < eps < 1:
        raise PipelineError(f"calibrator state: eps={eps} must lie in (0, 1)")
    return eps


@dataclass(eq=False)
class IsotonicCalibration(Calibrator):
    """One-vs-rest isotonic regression (scikit-learn) on softmax probabilities, renormalised.

    Stores each class's step points; prediction is linear interpolation between them,
    clamped outside, which is exactly what ``IsotonicRegression(out_of_bounds="clip")``
    predicts. Fit option: ``eps`` (the score floor, :data:`DEFAULT_EPS`).
    """

    method: ClassVar[str] = "isotonic"
    x: list[np.ndarray]
    y: list[np.ndarray]
    eps: float = DEFAULT_EPS

    @classmethod
    def _fit(
        cls, logits: np.ndarray, labels: np.ndarray, eps: float = DEFAULT_EPS
    ) -> IsotonicCalibration:
        probs = softmax(logits)
        xs, ys = [], []
        for j in range(logits.shape[1]):
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
            iso.fit(probs[:, j], (labels == j).astype(np.float64))
            xs.append(np.asarray(iso.X_thresholds_, dtype=np.float64))
            ys.append(np.asarray(iso.y_thresholds_, dtype=np.float64))
        return cls(logits.shape[1], xs, ys, eps)

    def _predict(self, logits: np.ndarray) -> np.ndarray:
        probs = softmax(logits)
        scores = np.column_stack(
            [np.interp(probs[:, j], self.x[j], self.y[j]) for j in range(self.num_classes)]
        )
        return _renormalise(scores, probs, self.eps)

    def _state(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "x": [a.tolist() for a in self.x],
            "y": [a.tolist() for a in self.y],
        }

    @classmethod
    def _from_state(cls, state: Mapping[str, Any], k: int) -> IsotonicCalibration:
        xs_raw, ys_raw = state.get("x"), state.get("y")
        if not isinstance(xs_raw, list) or not isinstance(ys_raw, list):
            raise PipelineError("calibrator state: 'x' and 'y' must be lists of lists")
        if len(xs_raw) != k or len(ys_raw) != k:
            raise PipelineError(f"calibrator state: 'x' and 'y' must hold {k} lists each")
        xs, ys = [], []
        for j in range(k):
            xj = np.asarray(xs_raw[j], dtype=np.float64)
            yj = np.asarray(ys_raw[j], dtype=np.float64)
            ok = xj.ndim == 1 and xj.shape == yj.shape and len(xj) > 0
            if not ok or not np.all(np.diff(xj) >= 0) or not np.all(np.isfinite(yj)):
                raise PipelineError(f"calibrator state: bad isotonic steps for class {j}")
            xs.append(xj)
            ys.append(yj)
        return cls(k, xs, ys, _eps(state))
