"""Post-hoc calibrators: map a model's logits to probabilities that mean what they say.

Every calibrator is fitted on validation logits only (the test split is only scored) and
shares one interface (:class:`Calibrator`), so the ``calibrate`` stage swaps them with a
param. Why these methods and the default: ``docs/design.md#calibration``.

Modules:
    base: the :class:`Calibrator` interface, input checks and ``none`` (the softmax).
    optim: full-batch L-BFGS, the optimiser of the scaling methods.
    scaling: ``temperature`` (the default), ``ets``, ``temperature_platt``, ``vector``,
        ``matrix``.
    binning: ``histogram`` and ``isotonic``, one-vs-rest on the softmax probabilities.
    select: :func:`fit_calibrator` (one method by name) and :func:`select_auto` (the
        method with the lowest cross-validated NLL).

Importing this package defines, and so registers, every method.
"""

from pipeline.calibration.base import Calibrator, Identity, softmax
from pipeline.calibration.binning import DEFAULT_EPS, HistogramBinning, IsotonicCalibration
from pipeline.calibration.optim import lbfgs
from pipeline.calibration.scaling import (
    TOP_MARGIN,
    EnsembleTemperatureScaling,
    MatrixScaling,
    TemperaturePlatt,
    TemperatureScaling,
    VectorScaling,
)
from pipeline.calibration.select import METHODS, fit_calibrator, select_auto

__all__ = [
    "DEFAULT_EPS",
    "METHODS",
    "TOP_MARGIN",
    "Calibrator",
    "EnsembleTemperatureScaling",
    "HistogramBinning",
    "Identity",
    "IsotonicCalibration",
    "MatrixScaling",
    "TemperaturePlatt",
    "TemperatureScaling",
    "VectorScaling",
    "fit_calibrator",
    "lbfgs",
    "select_auto",
    "softmax",
]
