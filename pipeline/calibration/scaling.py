"""Scaling calibrators: maps of the logits fitted by minimising validation NLL.

- ``temperature``: ``softmax(z / T)`` with one scalar ``T``; it never changes the argmax.
- ``ets``, ensemble temperature scaling: ``w1 softmax(z / T) + w2 softmax(z) + w3 / k``.
- ``temperature_platt``: temperature scaling, then a Platt map of the top label's log-odds.
- ``vector``: ``softmax(z * w + b)``; ``matrix``: ``softmax(z @ W.T + b)``, both
  L2-regularised toward the identity map.

Every fit runs :func:`pipeline.calibration.optim.lbfgs` in float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.calibration.base import Calibrator, softmax, state_array, state_positive
from pipeline.calibration.optim import as_tensors, lbfgs
from pipeline.errors import PipelineError


@dataclass(eq=False)
class TemperatureScaling(Calibrator):
    """``softmax(z / T)`` (Guo et al., 2017): one parameter, and the argmax never changes.

    See ``docs/design.md#calibration`` for why it is the default.
    """

    method: ClassVar[str] = "temperature"
    temperature: float

    @classmethod
    def _fit(
        cls, logits: np.ndarray, labels: np.ndarray, max_iter: int = 100
    ) -> TemperatureScaling:
        """Minimise validation NLL over ``log T``, which keeps ``T > 0`` unconstrained.

        Args:
            logits: Checked validation logits, shape (n, k).
            labels: Checked validation labels.
            max_iter: The most L-BFGS iterations.
        """
        z, y = as_tensors(logits, labels)
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        lbfgs([log_t], lambda: F.cross_entropy(z / log_t.exp(), y), max_iter)
        return cls(z.shape[1], float(log_t.detach().exp()))

    def _predict(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits / self.temperature)

    def _state(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    @classmethod
    def _from_state(cls, state: Mapping[str, Any], k: int) -> TemperatureScaling:
        return cls(k, state_positive(state, "temperature"))


def _log_temperature_start(logits: np.ndarray, labels: np.ndarray, max_iter: int) -> torch.Tensor:
    """``log T`` of the NLL-optimal temperature as a trainable tensor.

    It is the starting point of the methods built on temperature scaling.
    """
    t = TemperatureScaling._fit(logits, labels, max_iter=max_iter).temperature
    return torch.tensor(np.log(t), dtype=torch.float64, requires_grad=True)


@dataclass(eq=False)
class EnsembleTemperatureScaling(Calibrator):
    """``w1 softmax(z / T) + w2 softmax(z) + w3 / k`` (Zhang et al., 2020, "Mix-n-Match").

    ``T`` and the weights (a point of the simplex, parameterised by a softmax) are fitted
    together by NLL, starting from plain temperature scaling; ``max_iter`` bounds each of
    the two L-BFGS fits. Every part ranks the classes as ``z`` does, so the argmax never
    changes (unless ``w3`` were exactly 1). The uniform part caps how sure the model can
    be (``docs/design.md#calibration``).
    """

    method: ClassVar[str] = "ets"
    temperature: float
    weights: np.ndarray  # (tempered, raw, uniform), non-negative, summing to 1

    @classmethod
    def _fit(
        cls, logits: np.ndarray, labels: np.ndarray, max_iter: int = 200
    ) -> EnsembleTemperatureScaling:
        z, y = as_tensors(logits, labels)
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

        lbfgs([log_t, mix], loss, max_iter)
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
        weights = state_array(state, "weights", (3,))
        if weights.min() < 0 or abs(weights.sum() - 1) > 1e-9:
            raise PipelineError("calibrator state: 'weights' must be >= 0 and sum to 1")
        return cls(k, state_positive(state, "temperature"), weights)


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
    ``T``, ``a``, ``b`` are fitted together by NLL, starting from temperature scaling;
    ``max_iter`` bounds each of the two L-BFGS fits.
    """

    method: ClassVar[str] = "temperature_platt"
    temperature: float
    slope: float
    intercept: float

    @classmethod
    def _fit(cls, logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> TemperaturePlatt:
        z, y = as_tensors(logits, labels)
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

        lbfgs([log_t, alpha, b], loss, max_iter)
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
        intercept = float(state_array(state, "intercept", ()))
        return cls(
            k, state_positive(state, "temperature"), state_positive(state, "slope"), intercept
        )


@dataclass(eq=False)
class _AffineScaling(Calibrator):
    """``softmax(affine(z))`` fitted by NLL with an L2 pull toward the identity map.

    The penalty ``reg * (||W - I||^2 + ||b||^2)`` shrinks toward "no change" rather than
    toward zero (which would mean uniform predictions); without it the parameters overfit a
    small validation split, and the bias of a class missing from the split would run off to
    minus infinity. Fit options: ``reg`` and ``max_iter`` (the most L-BFGS iterations),
    defaulting to the subclass's. Subclasses say what ``W`` is.
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
        z, y = as_tensors(logits, labels)
        k = z.shape[1]
        eye = cls._identity(k)
        w = eye.clone().requires_grad_(True)
        b = torch.zeros(k, dtype=torch.float64, requires_grad=True)

        def loss() -> torch.Tensor:
            penalty = ((w - eye) ** 2).sum() + (b**2).sum()
            return F.cross_entropy(cls._apply(z, w) + b, y) + reg * penalty

        lbfgs([w, b], loss, cls.max_iter if max_iter is None else max_iter)
        return cls(k, w.detach().numpy().copy(), b.detach().numpy().copy())

    def _predict(self, logits: np.ndarray) -> np.ndarray:
        return softmax(self._apply(logits, self.weight) + self.bias)

    def _state(self) -> dict[str, Any]:
        return {"weight": self.weight.tolist(), "bias": self.bias.tolist()}

    @classmethod
    def _from_state(cls, state: Mapping[str, Any], k: int) -> _AffineScaling:
        shape = tuple(cls._identity(k).shape)
        return cls(k, state_array(state, "weight", shape), state_array(state, "bias", (k,)))


class VectorScaling(_AffineScaling):
    """``softmax(z * w + b)``: per-class scale and bias (Guo et al., 2017)."""

    method, full, reg, max_iter = "vector", False, 1e-3, 200


class MatrixScaling(_AffineScaling):
    """``softmax(z @ W.T + b)``: a full linear map of the logits (k^2 + k parameters)."""

    method, full, reg, max_iter = "matrix", True, 1e-2, 500
