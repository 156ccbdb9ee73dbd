"""Benchmark: wall time and peak memory of every stage of ``dvc repro`` on the current params.

Runs ``dvc repro --force --single-item <stage>`` for each stage of ``dvc.yaml`` in
pipeline order (so each stage really runs, through DVC, with its real inputs), measures
its wall time and the peak resident memory of the stage's process tree, prints a table and
writes ``reports/bench/stages.json``. On the default config this is a full, forced run
(about half an hour on 2 cores); the outputs and ``dvc.lock`` it leaves are the ones a
plain ``dvc repro`` would produce.

    NEWSGROUPS_ARCHIVE=../shared/data/20news-bydate.tar.gz python tests/bench/bench_stages.py

Not part of the test suite: timings depend on the machine and on what else it is doing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

OUT = Path("reports/bench/stages.json")


def stage_order() -> list[str]:
    """Stage names as ``dvc stage list`` gives them (dvc.yaml's order, which is also their
    dependency order here; a ``foreach`` stage expanded into its ``calibrate@<model>``)."""
    listed = subprocess.run(
        ["dvc", "stage", "list", "--name-only"], capture_output=True, text=True, check=True
    )
    return listed.stdout.split()


def run_stage(stage: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB of the stage's process tree) of one forced repro."""
    start = time.perf_counter()
    proc = subprocess.Popen(["dvc", "repro", "--force", "--single-item", stage])
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"error: dvc repro {stage} failed with exit code {proc.returncode}")
    # ru_maxrss (KiB on Linux) of the waited child: the largest process of its tree
    # (dvc itself or the stage command it ran and waited for).
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stages", nargs="*", help="stages to time (default: all, in order)")
    args = parser.parse_args()
    stages = args.stages or stage_order()
    rows = []
    for stage in stages:
        seconds, peak = run_stage(stage)
        rows.append({"stage": stage, "seconds": round(seconds, 1), "peak_rss_mib": round(peak)})
        print(f"bench: {stage}: {seconds / 60:.2f} min, peak RSS {peak:,.0f} MiB", flush=True)
    total = sum(r["seconds"] for r in rows)
    result = {
        "command": "python tests/bench/bench_stages.py " + " ".join(args.stages),
        "params": yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8")),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "total_minutes": round(total / 60, 2),
        "max_peak_rss_mib": max(r["peak_rss_mib"] for r in rows),
        "stages": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{'stage':<22} {'minutes':>8} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['stage']:<22} {r['seconds'] / 60:>8.2f} {r['peak_rss_mib']:>9,}")
    print(f"{'total':<10} {total / 60:>8.2f}   -> {OUT}")


if __name__ == "__main__":
    main()
