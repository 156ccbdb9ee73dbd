"""Post-hoc calibrators: map a model's logits to probabilities that mean what they say.

All calibrators are fitted on validation logits only (the test split is only scored) and
share one interface, so the ``calibrate`` stage can swap them with a param:

- ``temperature`` (the default; Guo et al. 2017): ``softmax(z / T)`` with one scalar ``T``
  fitted by minimising NLL. It never changes the argmax, so accuracy is untouched.
- ``ets``, ensemble temperature scaling (Zhang et al. 2020, "Mix-n-Match"): a convex mix
  ``w1 softmax(z / T) + w2 softmax(z) + w3 / k``, 3 free parameters. The uniform part caps
  how sure the model can be, which is what transfers when test is harder than validation.
- ``temperature_platt``: temperature scaling, then a Platt map ``a s + b`` (``a > 0``) of
  the top label's log-odds ``s``; the other classes share the rest in their tempered
  proportions. 3 parameters, fitted jointly; the argmax never changes.
- ``vector``: ``softmax(z * w + b)``, per-class scale and shift.
- ``matrix``: ``softmax(z @ W.T + b)``, L2-regularised toward the identity (``W = I``,
  ``b = 0``) because its k^2 + k parameters overfit a small validation split.
- ``histogram`` (Zadrozny & Elkan 2001) and ``isotonic`` (Zadrozny & Elkan 2002): fitted
  one-vs-rest on each class's softmax probability, then renormalised to sum to 1.
- ``none``: the uncalibrated softmax, so "no calibration" goes through the same code.

The scaling methods are fitted with torch L-BFGS (strong-Wolfe line search) in float64;
isotonic regression is scikit-learn's. ``to_dict`` gives a small JSON-serialisable state
and :meth:`Calibrator.from_dict` rebuilds an identical calibrator from it (predictions
never call scikit-learn, so a saved calibrator does not depend on its pickle format).
:func:`select_auto` picks a method by cross-validated NLL on the validation split.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.isotonic import IsotonicRegression
from sklearn.model_selection import StratifiedKFold

from pipeline.errors import PipelineError
from pipeline.metrics import bin_index, nll, torch_single_thread

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

DEFAULT_EPS = 1e-6
"""Floor for one-vs-rest scores before renormalising, so no class gets probability 0."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row max so it never overflows."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _check_logits(logits: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    logits = np.array(logits, dtype=np.float64)  # a writable copy: torch refuses read-only
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (n>0, k>=2), got {logits.shape}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"expected {num_classes} classes, got logits of shape {logits.shape}")
    if not np.all(np.isfinite(logits)):
        raise ValueError("logits contain NaN or infinite values")
    return logits


def _check_labels(labels: np.ndarray, n: int, k: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {n} integers, got shape {labels.shape} {labels.dtype}")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must lie in [0, {k}), got [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


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


def _lbfgs(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor], max_iter: int) -> None:
    """Minimise ``loss_fn`` over ``params`` with full-batch L-BFGS (deterministic on CPU)."""
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch_single_thread():
        opt.step(closure)
    for p in params:
        if not torch.all(torch.isfinite(p)):
            raise PipelineError("calibrator fit diverged (non-finite parameters)")


def _as_tensors(logits: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The checked float64 logits and int64 labels as tensors (sharing their memory), for
    the L-BFGS fits."""
    return torch.from_numpy(logits), torch.from_numpy(labels)


def _as_array(state: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        value = np.asarray(state[key], dtype=np.float64)
    except KeyError:
        raise PipelineError(f"calibrator state: missing key '{key}'") from None
    except (TypeError, ValueError):
        raise PipelineError(f"calibrator state: '{key}' is not numeric") from None
    if value.shape != shape or not np.all(np.isfinite(value)):
        raise PipelineError(f"calibrator state: '{key}' must be finite, shape {shape}")
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
        """Fit on validation logits and labels, checked here once for every method (a bad
        shape, a non-finite logit or a label out of range is a ValueError). ``seed`` keeps
        one interface: every method here is deterministic."""
        logits = _check_logits(logits)
        return cls._fit(logits, _check_labels(labels, *logits.shape), **opts)

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
        """Calibrated probabilities: finite, in [0, 1], rows summing to 1."""
        probs = self._predict(_check_logits(logits, self.num_classes))
        if not np.all(np.isfinite(probs)):
            raise PipelineError(f"{self.method} calibrator produced non-finite probabilities")
        return probs

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (plain floats and lists), tagged with the method name."""
        return {"method": self.method, "num_classes": self.num_classes, **self._state()}

    @staticmethod
    def from_dict(state: Mapping[str, Any]) -> Calibrator:
        """Rebuild a calibrator saved with :meth:`to_dict`; bad state is a PipelineError."""
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
    """No calibration: the model's own softmax (a baseline for :func:`select_auto`)."""

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


@dataclass(eq=False)
class TemperatureScaling(Calibrator):
    """``softmax(z / T)``: one parameter, so it cannot overfit and never changes the argmax."""

    method: ClassVar[str] = "temperature"
    temperature: float

    @classmethod
    def _fit(
        cls, logits: np.ndarray, labels: np.ndarray, max_iter: int = 100
    ) -> TemperatureScaling:
        """Minimise validation NLL over ``log T`` (keeps ``T > 0`` without constraints)."""
        z, y = _as_tensors(logits, labels)
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        _lbfgs([log_t], lambda: F.cross_entropy(z / log_t.exp(), y), max_iter)
        return cls(z.shape[1], float(log_t.detach().exp()))

    def _predict(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits / self.temperature)

    def _state(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    @classmethod
    def _from_state(cls, state: Mapping[str, Any], k: int) -> TemperatureScaling:
        return cls(k, _positive(state, "temperature"))


def _log_temperature_start(logits: np.ndarray, labels: np.ndarray, max_iter: int) -> torch.Tensor:
    """``log T`` of the NLL-optimal temperature, a trainable tensor: the starting point of
    the methods built on temperature scaling."""
    t = TemperatureScaling._fit(logits, labels, max_iter=max_iter).temperature
    return torch.tensor(np.log(t), dtype=torch.float64, requires_grad=True)


def _positive(state: Mapping[str, Any], key: str) -> float:
    value = float(_as_array(state, key, ()))
    if value <= 0:
        raise PipelineError(f"calibrator state: {key}={value} must be > 0")
    return value


@dataclass(eq=False)
class EnsembleTemperatureScaling(Calibrator):
    """``w1 softmax(z / T) + w2 softmax(z) + w3 / k`` (Zhang et al. 2020, "Mix-n-Match").

    ``T`` and the weights (a point of the simplex, parameterised by a softmax) are fitted
    together by NLL, starting from plain temperature scaling. Every part ranks the classes
    as ``z`` does, so the argmax never changes (unless ``w3`` were exactly 1).
    """

    method: ClassVar[str] = "ets"
    temperature: float
    weights: np.ndarray  # (tempered, raw, uniform), non-negative, summing to 1

    @classmethod
    def _fit(
        cls, logits: np.ndarray, labels: np.ndarray, max_iter: int = 200
    ) -> EnsembleTemperatureScaling:
        z, y = _as_tensors(logits, labels)
        k = z.shape[1]
        log_t = _log_temperature_start(logits, labels, max_iter)
        start = np.log([0.9, 0.05, 0.05])
        mix = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        raw = F.log_softmax(z, dim=1).gather(1, y[:, None])[:, 0]
        uniform = torch.full_like(raw, -float(np.log(k)))

        def loss() -> torch.Tensor:
            tempered = F.log_softmax(z / log_t.exp(), dim=1).gather(1, y[:, None])[:, 0]
            parts = torch.stack([tempered, raw, uniform], dim=1) + F.log_softmax(mix, dim=0)
            return -torch.logsumexp(parts, dim=1).mean()

        _lbfgs([log_t, mix], loss, max_iter)
        weights = F.softmax(mix.detach(), dim=0).numpy().copy()
        return cls(k, float(log_t.detach().exp()), weights)

    def _predict(self, logits: np.ndarray) -> np.ndarray:
        w = self.weights
        return (
            w[0] * softmax(logits / self.temperature)
            + w[1] * softmax(logits)
            + w[2] / self.num_classes
        )

    def _state(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "weights": self.weights.tolist()}

    @classmethod
    def _from_state(cls, state: Mapping[str, Any], k: int) -> EnsembleTemperatureScaling:
        weights = _as_array(state, "weights", (3,))
        if weights.min() < 0 or abs(weights.sum() - 1) > 1e-9:
            raise PipelineError("calibrator state: 'weights' must be >= 0 and sum to 1")
        return cls(k, _positive(state, "temperature"), weights)


TOP_MARGIN = 1e-9
"""How far (in log-odds) the top label stays above the runner-up after a Platt map."""


def _top_label_parts(u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top index, top-label log-odds, runner-up floor and rest distribution of logits ``u``.

    ``s = u_top - logsumexp(u_others)`` is ``log(p_top / (1 - p_top))``; the floor
    ``u_second - logsumexp(u_others)`` is the log-odds at which the top would tie the
    runner-up once the others are rescaled; ``rest`` is the softmax over the other classes.
    """
    n = len(u)
    top = u.argmax(axis=1)
    others = u.copy()
    others[np.arange(n), top] = -np.inf
    shift = others.max(axis=1, keepdims=True)
    e = np.exp(others - shift)
    lse = np.log(e.sum(axis=1)) + shift[:, 0]
    rest = e / e.sum(axis=1, keepdims=True)
    return top, u[np.arange(n), top] - lse, shift[:, 0] - lse, rest


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass(eq=False)
class TemperaturePlatt(Calibrator):
    """Temperature scaling, then a Platt map of the top label's log-odds.

    With ``u = z / T`` and ``s`` the top label's log-odds, the top label gets
    ``sigmoid(max(a s + b, floor))`` and the other classes share the rest in proportion to
    ``softmax(u)``. ``a = exp(alpha) > 0`` keeps the map increasing; the floor (the
    log-odds at which the top label would tie the runner-up, plus ``TOP_MARGIN``) keeps the
    argmax, since a decreasing top probability alone could let the runner-up overtake it.
    ``T``, ``a``, ``b`` are fitted together by NLL, starting from temperature scaling.
    """

    method: ClassVar[str] = "temperature_platt"
    temperature: float
    slope: float
    intercept: float

    @classmethod
    def _fit(cls, logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> TemperaturePlatt:
        z, y = _as_tensors(logits, labels)
        k = z.shape[1]
        top = z.argmax(dim=1)
        is_top = F.one_hot(top, k).bool()
        hit = y == top
        # Index of a finite "other" entry for rows whose label is the top (never read).
        other_y = torch.where(hit, (top + 1) % k, y)
        log_t = _log_temperature_start(logits, labels, max_iter)
        alpha = torch.zeros((), dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)

        def loss() -> torch.Tensor:
            u = z / log_t.exp()
            others = u.masked_fill(is_top, -torch.inf)
            lse = torch.logsumexp(others, dim=1)
            s = u.gather(1, top[:, None])[:, 0] - lse
            floor = others.max(dim=1).values - lse + TOP_MARGIN
            s2 = torch.maximum(alpha.exp() * s + b, floor)
            rest = others.gather(1, other_y[:, None])[:, 0] - lse
            ll = torch.where(hit, F.logsigmoid(s2), F.logsigmoid(-s2) + rest)
            return -ll.mean()

        _lbfgs([log_t, alpha, b], loss, max_iter)
        t, a = float(log_t.detach().exp()), float(alpha.detach().exp())
        return cls(k, t, a, float(b.detach()))

    def _predict(self, logits: np.ndarray) -> np.ndarray:
        top, s, floor, rest = _top_label_parts(logits / self.temperature)
        s2 = np.maximum(self.slope * s + self.intercept, floor + TOP_MARGIN)
        probs = rest * _sigmoid(-s2)[:, None]
        probs[np.arange(len(top)), top] = _sigmoid(s2)
        return probs

    def _state(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "slope": self.slope, "intercept": self.intercept}

    @classmethod
    def _from_state(cls, state: Mapping[str, Any], k: int) -> TemperaturePlatt:
        intercept = float(_as_array(state, "intercept", ()))
        return cls(k, _positive(state, "temperature"), _positive(state, "slope"), intercept)


@dataclass(eq=False)
class _AffineScaling(Calibrator):
    """``softmax(affine(z))`` fitted by NLL with an L2 pull toward the identity map.

    The penalty ``reg * (||W - I||^2 + ||b||^2)`` shrinks toward "no change" rather than
    toward zero (which would mean uniform predictions); without it the parameters overfit a
    validation split of a few thousand rows, and the bias of a class missing from the split
    would run off to minus infinity. Subclasses say what ``W`` is.
    """

    reg: ClassVar[float]
    max_iter: ClassVar[int]
    weight: np.ndarray
    bias: np.ndarray

    full: ClassVar[bool]  # a k x k matrix W, else a vector w (``z * w``)

    @classmethod
    def _identity(cls, k: int) -> torch.Tensor:
        """The weight that leaves the logits unchanged (its shape is the weight's)."""
        return torch.eye(k, dtype=torch.float64) if cls.full else torch.ones(k, dtype=torch.float64)

    @classmethod
    def _apply(cls, z: Any, weight: Any) -> Any:
        """``z`` mapped by ``weight`` (tensors while fitting, arrays when predicting)."""
        return z @ weight.T if cls.full else z * weight

    @classmethod
    def _fit(
        cls,
        logits: np.ndarray,
        labels: np.ndarray,
        reg: float | None = None,
        max_iter: int | None = None,
    ) -> _AffineScaling:
        reg = cls.reg if reg is None else reg
        z, y = _as_tensors(logits, labels)
        k = z.shape[1]
        eye = cls._identity(k)
        w = eye.clone().requires_grad_(True)
        b = torch.zeros(k, dtype=torch.float64, requires_grad=True)

        def loss() -> torch.Tensor:
            penalty = ((w - eye) ** 2).sum() + (b**2).sum()
            return F.cross_entropy(cls._apply(z, w) + b, y) + reg * penalty

        _lbfgs([w, b], loss, cls.max_iter if max_iter is None else max_iter)
        return cls(k, w.detach().numpy().copy(), b.detach().numpy().copy())

    def _predict(self, logits: np.ndarray) -> np.ndarray:
        return softmax(self._apply(logits, self.weight) + self.bias)

    def _state(self) -> dict[str, Any]:
        return {"weight": self.weight.tolist(), "bias": self.bias.tolist()}

    @classmethod
    def _from_state(cls, state: Mapping[str, Any], k: int) -> _AffineScaling:
        shape = tuple(cls._identity(k).shape)
        return cls(k, _as_array(state, "weight", shape), _as_array(state, "bias", (k,)))


class VectorScaling(_AffineScaling):
    """``softmax(z * w + b)``: per-class scale and bias (Guo et al. 2017)."""

    method, full, reg, max_iter = "vector", False, 1e-3, 200


class MatrixScaling(_AffineScaling):
    """``softmax(z @ W.T + b)``: a full linear map of the logits (k^2 + k parameters)."""

    method, full, reg, max_iter = "matrix", True, 1e-2, 500


@dataclass(eq=False)
class HistogramBinning(Calibrator):
    """One-vs-rest histogram binning on softmax probabilities, then renormalised.

    Each class's probability range is cut into ``n_bins`` equal-width bins; a bin predicts
    the fraction of validation rows in it that belong to the class. A bin no validation row
    fell in keeps its midpoint (no evidence, so roughly no change).
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
        return cls(k, _as_array(state, "values", (k, values.shape[1])), _eps(state))


def _eps(state: Mapping[str, Any]) -> float:
    eps = float(_as_array(state, "eps", ()))
    if not 0 < eps < 1:
        raise PipelineError(f"calibrator state: eps={eps} must lie in (0, 1)")
    return eps


@dataclass(eq=False)
class IsotonicCalibration(Calibrator):
    """One-vs-rest isotonic regression (scikit-learn) on softmax probabilities, renormalised.

    Stores each class's step points; prediction is linear interpolation between them,
    clamped outside, which is exactly what ``IsotonicRegression(out_of_bounds="clip")``
    predicts.
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


def fit_calibrator(
    method: str, logits: np.ndarray, labels: np.ndarray, seed: int, **opts: Any
) -> Calibrator:
    """Fit the calibrator named ``method`` (see :data:`METHODS`, or ``none``) on validation data.

    ``opts`` are method options (``reg``/``max_iter`` for scaling, ``n_bins``/``eps`` for
    histogram, ``eps`` for isotonic); an unknown method or option is a PipelineError so a
    typo in params fails loudly.
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
    on the remaining one, with the same (seeded, shuffled) folds for every method. Ties go
    to the method listed first, so list simpler methods first. Returns the chosen name and
    ``{method: {"mean_nll", "std_nll", "fold_nll"}}``.
    """
    logits = _check_logits(logits)
    labels = _check_labels(labels, *logits.shape)
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
    method_opts = method_opts or {}
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Small (smoke) validation splits have classes rarer than `folds`; that is fine here.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(splitter.split(logits, labels))
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
