"""CPU, memory, disk, network (and GPU) samples of a stage, through MLflow's own monitor.

MLflow's ``SystemMetricsMonitor`` samples in a thread (``psutil``; ``pynvml`` when an
NVIDIA GPU and the package are there) every ``SAMPLING_INTERVAL_S`` seconds
(``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides it) and logs ``system/*`` metrics
to a run. :class:`Monitors` watches the training stage's own run and the parent run of
the execution, whose steps continue from the last stage's (``resume_logging``), so its
charts cover the whole execution. Stopping logs one closing sample, so a stage shorter
than the interval still has one. ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns
sampling off (the benchmark ``tests/bench/bench_system_metrics.py`` compares both).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

SAMPLING_INTERVAL_S = 5.0
SWITCH_ENV = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"  # "false" or "0": no sampling
TRAINING_STAGES = frozenset({"pretrain", "finetune", "wide"})  # their own runs get samples


class Monitors:
    """Running monitors, one per run; stop them before the runs end."""

    def __init__(self, uri: str, run_ids: Sequence[str], resume: Sequence[str] = ()) -> None:
        """Start sampling for ``run_ids`` (from step 0) and ``resume`` (from the run's
        next step)."""
        # Deferred: mlflow is slow to import, and a stage with tracking off never needs it.
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitors: list[Any] = []
        if os.environ.get(SWITCH_ENV, "").lower() in ("false", "0"):
            return
        for run_id, resume_logging in [(r, False) for r in run_ids] + [(r, True) for r in resume]:
            monitor = SystemMetricsMonitor(
                run_id,
                sampling_interval=SAMPLING_INTERVAL_S,
                resume_logging=resume_logging,
                tracking_uri=uri,
            )
            monitor.start()
            self._monitors.append(monitor)

    def stop(self) -> None:
        """Stop sampling, log one closing sample per run and flush; never raises (it
        runs at exit, and the store may be what failed)."""
        for monitor in self._monitors:
            with contextlib.suppress(Exception):
                monitor.finish()
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
        self._monitors.clear()
