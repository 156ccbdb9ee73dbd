"""Benchmark: the cost of MLflow system metrics on a training stage.

Runs one training stage (``wide`` by default) of a reproduced project again and again,
alternating with and without system metrics (``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING``),
each logging to a throwaway SQLite store, and prints the wall time of every run, the mean
and spread (min-max) of each side and the relative difference of the means. The stage
rewrites its outputs with the same bytes. Not part of the test suite.

    python tests/bench/bench_system_metrics.py --project . --stage wide --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWITCH = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"


def time_stage(project: Path, stage: str, store: Path, monitored: bool) -> float:
    """Wall seconds of one run of ``stage`` in ``project``."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    env[SWITCH] = "true" if monitored else "false"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", f"pipeline.stages.{stage}"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed in {project}:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=Path.cwd())
    parser.add_argument("--stage", default="wide", choices=("wide", "pretrain", "finetune"))
    parser.add_argument("--runs", type=int, default=3, help="runs on each side (>= 3)")
    args = parser.parse_args()
    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "mlflow.db"
        time_stage(args.project, args.stage, store, True)  # warm-up: store, page cache
        for i in range(2 * max(args.runs, 3)):
            monitored = i % 2 == 0
            seconds = time_stage(args.project, args.stage, store, monitored)
            times[monitored].append(seconds)
            print(f"run {i + 1}: {'with   ' if monitored else 'without'} {seconds:.2f} s")
    for monitored, values in times.items():
        label = "with system metrics   " if monitored else "without system metrics"
        spread = max(values) - min(values)
        print(
            f"{label}: mean {statistics.mean(values):.2f} s, "
            f"min {min(values):.2f}, max {max(values):.2f} (spread {spread:.2f} s)"
        )
    on, off = statistics.mean(times[True]), statistics.mean(times[False])
    print(f"difference of the means: {100 * (on - off) / off:+.2f}% of the stage's time")


if __name__ == "__main__":
    main()
