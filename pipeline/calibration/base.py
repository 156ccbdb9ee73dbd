"""The calibrator interface: input checks, saved-state checks, and the identity baseline.

Every calibrator maps logits (n, k) to probabilities (n, k), is fitted on validation data
with :meth:`Calibrator.fit`, and round-trips through a small JSON-serialisable state
(:meth:`Calibrator.to_dict`, :meth:`Calibrator.from_dict`). Subclasses register themselves
under their ``method`` name when they are defined.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np

from pipeline.errors import PipelineError


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row max so it never overflows."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def check_logits(logits: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """A writable float64 copy of ``logits``, checked.

    Args:
        logits: The logits, shape (n, k).
        num_classes: The ``k`` they must have, or None for any ``k >= 2``.

    Returns:
        The logits as a new float64 array (torch refuses read-only arrays).

    Raises:
        ValueError: The shape is not (n > 0, k >= 2), ``k`` is not ``num_classes``, or a
            value is NaN or infinite.
    """
    logits = np.array(logits, dtype=np.float64)  # a writable copy: torch refuses read-only
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (n>0, k>=2), got {logits.shape}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"expected {num_classes} classes, got logits of shape {logits.shape}")
    if not np.all(np.isfinite(logits)):
        raise ValueError("logits contain NaN or infinite values")
    return logits


def check_labels(labels: np.ndarray, n: int, k: int) -> np.ndarray:
    """``labels`` as int64, checked to be ``n`` integers in ``[0, k)``.

    Raises:
        ValueError: The shape is not (n,), the dtype is not integer, or a label is out of
            range.
    """
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {n} integers, got shape {labels.shape} {labels.dtype}")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must lie in [0, {k}), got [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


def state_array(state: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    """``state[key]`` as a finite float64 array of ``shape``.

    Raises:
        PipelineError: The key is missing, not numeric, of another shape, or not finite.
    """
    try:
        value = np.asarray(state[key], dtype=np.float64)
    except KeyError:
        raise PipelineError(f"calibrator state: missing key '{key}'") from None
    except (TypeError, ValueError):
        raise PipelineError(f"calibrator state: '{key}' is not numeric") from None
    if value.shape != shape or not np.all(np.isfinite(value)):
        raise PipelineError(f"calibrator state: '{key}' must be finite, shape {shape}")
    return value


def state_positive(state: Mapping[str, Any], key: str) -> float:
    """``state[key]`` as a finite float > 0.

    Raises:
        PipelineError: The value is missing, not a finite scalar, or not > 0.
    """
    value = float(state_array(state, key, ()))
    if value <= 0:
        raise PipelineError(f"calibrator state: {key}={value} must be > 0")
    return value


@dataclass(eq=False)
class Calibrator(ABC):
    """A fitted map from logits (n, k) to calibrated probabilities (n, k)."""

    method: ClassVar[str]
    registry: ClassVar[dict[str, type[Calibrator]]] = {}
    num_classes: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "method" in vars(cls):  # shared bases such as _AffineScaling register nothing
            Calibrator.registry[cls.method] = cls

    @classmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray, seed: int, **opts: Any) -> Self:
        """Fit on validation logits and labels, checked here once for every method.

        Args:
            logits: Validation logits, shape (n, k).
            labels: Validation labels, n integers in ``[0, k)``.
            seed: Unused; it keeps one interface, since every method is deterministic.
            **opts: The method's own options (see :func:`pipeline.calibration.fit_calibrator`).

        Raises:
            ValueError: A bad shape, a non-finite logit or a label out of range.
        """
        logits = check_logits(logits)
        return cls._fit(logits, check_labels(labels, *logits.shape), **opts)

    @classmethod
    @abstractmethod
    def _fit(cls, logits: np.ndarray, labels: np.ndarray, **opts: Any) -> Self:
        """Fit on checked arrays: finite float64 logits (n, k) and int64 labels in [0, k)."""

    @abstractmethod
    def _predict(self, logits: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @classmethod
    @abstractmethod
    def _from_state(cls, state: Mapping[str, Any], k: int) -> Calibrator: ...

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities: finite, in [0, 1], rows summing to 1.

        Raises:
            ValueError: The logits are not finite or not of shape (n, ``num_classes``).
            PipelineError: The calibrator produced a non-finite probability.
        """
        probs = self._predict(check_logits(logits, self.num_classes))
        if not np.all(np.isfinite(probs)):
            raise PipelineError(f"{self.method} calibrator produced non-finite probabilities")
        return probs

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (plain floats and lists), tagged with the method name."""
        return {"method": self.method, "num_classes": self.num_classes, **self._state()}

    @staticmethod
    def from_dict(state: Mapping[str, Any]) -> Calibrator:
        """Rebuild a calibrator saved with :meth:`to_dict`.

        Raises:
            PipelineError: The state is not a mapping, names an unknown method, or holds a
                missing or invalid value.
        """
        if not isinstance(state, Mapping):
            raise PipelineError(f"calibrator state must be a mapping, got {type(state).__name__}")
        method = state.get("method")
        if method not in Calibrator.registry:
            allowed = ", ".join(sorted(Calibrator.registry))
            raise PipelineError(f"calibrator state: unknown method {method!r} (known: {allowed})")
        k = state.get("num_classes")
        if not isinstance(k, int) or isinstance(k, bool) or k < 2:
            raise PipelineError(f"calibrator state: num_classes={k!r} must be an integer >= 2")
        return Calibrator.registry[method]._from_state(state, k)


@dataclass(eq=False)
class Identity(Calibrator):
    """No calibration: the model's own softmax, so "no calibration" runs the same code."""

    method: ClassVar[str] = "none"

    @classmethod
    def _fit(cls, logits: np.ndarray, labels: np.ndarray) -> Identity:
        return cls(logits.shape[1])

    def _predict(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits)

    def _state(self) -> dict[str, Any]:
        return {}

    @classmethod
    def _from_state(cls, state: Mapping[str, Any], k: int) -> Identity:
        return cls(k)
