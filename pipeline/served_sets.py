"""Prediction sets as the pipeline stores and serves them (numpy only: serving imports it).

``calibrate`` stores a model's fitted :class:`~pipeline.conformal.ConformalState` in its
calibrator JSON under :data:`STATE_KEY`, beside the calibrator's own keys, which
:meth:`pipeline.calibration.Calibrator.from_dict` reads without looking at this one. The
served model answers with a :data:`SET_COLUMN` column only when a request sets the
inference param :data:`LEVEL_PARAM`; the method and variant it serves are fixed when the
model is registered (``serving.json`` keys :data:`SERVING_KEYS`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.conformal import ConformalState, check_level, prediction_sets
from pipeline.errors import PipelineError

STATE_KEY = "conformal"
LEVEL_PARAM = "set_level"
SET_COLUMN = "prediction_set"
SERVING_KEYS = ("set_method", "set_variant")
NO_SETS = f"{LEVEL_PARAM}: this model version serves no prediction sets"


def read_state(calibrator_state: Mapping[str, Any]) -> ConformalState | None:
    """The conformal state of a calibrator JSON, or None when it holds none.

    Raises:
        PipelineError: one line naming the malformed key.
    """
    raw = calibrator_state.get(STATE_KEY)
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise PipelineError(f"calibrator state: {STATE_KEY!r} must be a mapping")
    try:
        return ConformalState.from_dict(raw)
    except ValueError as exc:
        raise PipelineError(f"calibrator state: {exc}") from None


def requested_level(params: Mapping[str, Any] | None) -> float | None:
    """The coverage level a request asks for, None (no sets) when absent or null.

    Raises:
        ValueError: one line naming :data:`LEVEL_PARAM` when it is not a number in (0, 1).
    """
    value = (params or {}).get(LEVEL_PARAM)
    return None if value is None else check_level(value, LEVEL_PARAM)


@dataclass(frozen=True)
class ServedSets:
    """The thresholds a served model answers with, and which of them it serves."""

    state: ConformalState
    method: str
    variant: str

    @classmethod
    def load(
        cls, calibrator_state: Mapping[str, Any], config: Mapping[str, Any]
    ) -> ServedSets | None:
        """From the calibrator JSON and ``serving.json``; None when either lacks its part."""
        state = read_state(calibrator_state)
        if state is None or any(key not in config for key in SERVING_KEYS):
            return None
        return cls(state, str(config["set_method"]), str(config["set_variant"]))

    def labels(self, probs: np.ndarray, level: float, groups: Sequence[str]) -> list[list[str]]:
        """Each row's set at a fitted ``level`` as class names, most probable first."""
        sets = prediction_sets(probs, self.state, level, self.method, self.variant)
        return [[groups[j] for j in row] for row in sets]


def check_served(sets: ServedSets | None, level: float) -> ServedSets:
    """``sets``, checked to answer at ``level``.

    Raises:
        ValueError: one line naming :data:`LEVEL_PARAM`: the model serves no sets, or
            ``level`` was not fitted (the line lists the fitted levels).
    """
    if sets is None:
        raise ValueError(NO_SETS)
    try:
        sets.state.level_index(level)
    except ValueError as exc:
        raise ValueError(f"{LEVEL_PARAM}: {exc}") from None
    return sets


def level_key(level: float) -> str:
    """A level as the reports key it: ``0.95`` -> ``"0.95"``."""
    return f"{level:g}"
