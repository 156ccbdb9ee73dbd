"""The per-method options of ``calibrate.options``, as params sections.

Kept out of :mod:`pipeline.calibration`'s ``__init__`` so that loading a calibrator (the
served model does) never imports the params machinery.
"""

from __future__ import annotations

from pydantic import Field

from pipeline.config import Section


class ScalingOptions(Section):
    """Options of vector and matrix scaling."""

    reg: float = Field(ge=0.0, description="L2 penalty toward no change.")
    max_iter: int = Field(ge=1, description="L-BFGS iterations.")


class TemperatureOptions(Section):
    """Options of temperature scaling."""

    max_iter: int = Field(ge=1, description="L-BFGS iterations.")


class IterOptions(Section):
    """Options of a method fitted by L-BFGS."""

    max_iter: int = Field(ge=1, description="L-BFGS iterations.")


class HistogramOptions(Section):
    """Options of histogram binning."""

    n_bins: int = Field(ge=1, le=1000, description="Equal-width confidence bins.")


class CalibrateOptions(Section):
    """Per-method options, passed to :func:`pipeline.calibration.fit_calibrator`."""

    temperature: TemperatureOptions = Field(description="temperature scaling")
    ets: IterOptions = Field(description="ensemble temperature scaling")
    temperature_platt: IterOptions = Field(description="temperature, then a Platt map")
    vector: ScalingOptions = Field(description="vector scaling")
    matrix: ScalingOptions = Field(description="matrix scaling")
    histogram: HistogramOptions = Field(description="histogram binning")
