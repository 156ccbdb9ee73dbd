"""The regression gate, run as CI runs it: a subprocess on real metric files and git."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.tools.gate import GateParams, compare, format_table
from tests.helpers import ROOT, run

PARAMS = {
    "gate": {
        "models": ["transformer", "baseline"],
        "variant": "calibrated",
        "max_accuracy_drop": 0.01,
        "max_ece_rise": 0.01,
        "max_nll_rise": 0.02,
    }
}


def summary(accuracy: float, nll: float, ece: float) -> dict[str, float]:
    return {"n": 7532, "accuracy": accuracy, "nll": nll, "brier": 0.23, "ece": ece, "mce": 0.1}


# The shape pipeline/stages/evaluate.py writes.
METRICS: dict[str, Any] = {
    "ece_bins": 15,
    "transformer": {
        "uncalibrated": summary(0.80, 0.90, 0.12),
        "calibrated": summary(0.80, 0.70, 0.03),
    },
    "baseline": {
        "uncalibrated": summary(0.85, 0.71, 0.18),
        "calibrated": summary(0.85, 0.55, 0.04),
    },
}


def changed(path: list[str], value: Any) -> dict[str, Any]:
    """A copy of METRICS with one value replaced (or removed, for value=...)."""
    metrics = copy.deepcopy(METRICS)
    node = metrics
    for key in path[:-1]:
        node = node[key]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return metrics


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS), encoding="utf-8")
    (tmp_path / "baseline.json").write_text(json.dumps(METRICS), encoding="utf-8")
    return tmp_path


def gate(cwd: Path, *args: str):
    return run([sys.executable, "-m", "pipeline.tools.gate", *args], cwd, check=False)


def gate_files(tmp: Path, current: dict[str, Any] | str):
    text = current if isinstance(current, str) else json.dumps(current)
    (tmp / "current.json").write_text(text, encoding="utf-8")
    return gate(tmp, "--baseline", "baseline.json", "--current", "current.json")


def row(stdout: str, model: str, metric: str) -> str:
    return next(line for line in stdout.splitlines() if line.split()[:2] == [model, metric])


def test_unchanged_and_small_changes_pass(files: Path) -> None:
    current = changed(["transformer", "calibrated", "accuracy"], 0.795)  # -0.005 < 0.01
    current["baseline"]["calibrated"]["ece"] = 0.05  # +0.01: exactly the tolerance
    current["baseline"]["calibrated"]["nll"] = 0.40  # better
    proc = gate_files(files, current)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = proc.stdout.splitlines()[1].split()
    assert header == ["model", "metric", "baseline", "current", "change", "tolerance", "status"]
    assert row(proc.stdout, "transformer", "accuracy").split()[2:] == [
        "0.8000",
        "0.7950",
        "-0.0050",
        "-0.0100",
        "ok",
    ]
    assert "gate passed: 6 checks" in proc.stdout


def test_accuracy_regression_fails(files: Path) -> None:
    proc = gate_files(files, changed(["transformer", "calibrated", "accuracy"], 0.78))
    assert proc.returncode == 1
    assert "FAIL: dropped by 0.0200 (allowed 0.0100)" in row(proc.stdout, "transformer", "accuracy")
    assert row(proc.stdout, "baseline", "accuracy").endswith("ok")
    assert "gate FAILED: 1 of 6 checks (transformer accuracy)" in proc.stdout


def test_ece_and_nll_rise_fail(files: Path) -> None:
    current = changed(["baseline", "calibrated", "ece"], 0.07)
    current["baseline"]["calibrated"]["nll"] = 0.60
    proc = gate_files(files, current)
    assert proc.returncode == 1
    assert "FAIL: rose by 0.0300 (allowed 0.0100)" in row(proc.stdout, "baseline", "ece")
    assert "FAIL: rose by 0.0500 (allowed 0.0200)" in row(proc.stdout, "baseline", "nll")
    assert "2 of 6 checks" in proc.stdout


def test_uncalibrated_variant_is_selectable(files: Path) -> None:
    params = {"gate": {**PARAMS["gate"], "variant": "uncalibrated", "models": ["baseline"]}}
    (files / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    proc = gate_files(files, changed(["baseline", "uncalibrated", "ece"], 0.30))
    assert proc.returncode == 1 and "(uncalibrated)" in proc.stdout
    assert "FAIL: rose by 0.1200" in row(proc.stdout, "baseline", "ece")


@pytest.mark.parametrize(
    ("path", "value", "status"),
    [
        (["transformer", "calibrated", "nll"], ..., "FAIL: current missing"),
        (["transformer", "calibrated"], ..., "FAIL: current missing"),
        (["transformer", "calibrated", "nll"], float("nan"), "FAIL: current not finite (nan)"),
        (["transformer", "calibrated", "nll"], float("inf"), "FAIL: current not finite (inf)"),
        (["transformer", "calibrated", "nll"], "0.7", 'FAIL: current not a number ("0.7")'),
        (["transformer", "calibrated", "nll"], None, "FAIL: current not a number (null)"),
    ],
)
def test_missing_or_non_numeric_metric_fails(files: Path, path, value, status: str) -> None:
    proc = gate_files(files, changed(path, value))
    assert proc.returncode == 1
    assert row(proc.stdout, "transformer", "nll").endswith(status)
    assert "transformer nll" in proc.stdout.splitlines()[-1]


def test_missing_model_in_baseline_fails(files: Path) -> None:
    (files / "baseline.json").write_text(json.dumps({"baseline": METRICS["baseline"]}))
    proc = gate_files(files, METRICS)
    assert proc.returncode == 1
    assert row(proc.stdout, "transformer", "ece").endswith("FAIL: baseline missing")
    assert "3 of 6 checks" in proc.stdout


@pytest.mark.parametrize("text", ['{"transformer": {', "", "[1, 2]"])
def test_malformed_json_is_one_error_naming_the_file(files: Path, text: str) -> None:
    proc = gate_files(files, text)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: current.json: ")
    assert "Traceback" not in proc.stderr


def test_missing_current_file_and_bad_params_are_errors(files: Path) -> None:
    proc = gate(files, "--baseline", "baseline.json", "--current", "nope.json")
    assert proc.returncode == 1 and proc.stderr.startswith("error: nope.json: file not found")
    bad = {"gate": {**PARAMS["gate"], "max_ece_rise": -1}}
    (files / "params.yaml").write_text(yaml.safe_dump(bad), encoding="utf-8")
    proc = gate_files(files, METRICS)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: params.yaml: gate.max_ece_rise=-1")


def git(repo: Path, *args: str) -> str:
    return run(["git", *args], repo).stdout


def test_default_baseline_is_main_in_git(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "reports").mkdir(parents=True)
    git(repo, "init", "-q")
    git(repo, "checkout", "-q", "-b", "main")
    (repo / "params.yaml").write_text(yaml.safe_dump(PARAMS), encoding="utf-8")
    metrics = repo / "reports/metrics.json"
    metrics.write_text(json.dumps(METRICS), encoding="utf-8")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "baseline metrics")
    git(repo, "checkout", "-q", "-b", "feature")

    # The working copy regresses; main's committed file is the baseline.
    metrics.write_text(json.dumps(changed(["baseline", "calibrated", "accuracy"], 0.80)))
    proc = gate(repo)
    assert proc.returncode == 1
    assert "vs main:reports/metrics.json (calibrated)" in proc.stdout.splitlines()[0]
    assert "FAIL: dropped by 0.0500" in row(proc.stdout, "baseline", "accuracy")

    # Committing the regression on the branch does not move the baseline...
    git(repo, "commit", "-q", "-am", "worse")
    assert gate(repo).returncode == 1
    # ... an explicit revision does.
    assert gate(repo, "--baseline", "feature").returncode == 0
    assert gate(repo, "--baseline", "HEAD:reports/metrics.json").returncode == 0

    proc = gate(repo, "--baseline", "no-such-branch")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: baseline no-such-branch:reports/metrics.json: ")

    # A malformed committed baseline is named by its revision.
    git(repo, "checkout", "-q", "main")
    metrics.write_text("{not json")
    git(repo, "commit", "-q", "-am", "broken")
    (tmp_path / "ok.json").write_text(json.dumps(METRICS), encoding="utf-8")
    proc = gate(repo, "--baseline", "main", "--current", str(tmp_path / "ok.json"))
    assert proc.stderr.startswith("error: main:reports/metrics.json: not valid JSON")


def test_summary_appends_markdown(files: Path) -> None:
    (files / "current.json").write_text(json.dumps(METRICS), encoding="utf-8")
    summary_file = files / "summary.md"
    summary_file.write_text("before\n", encoding="utf-8")
    args = ["--baseline", "baseline.json", "--current", "current.json", "--summary", "summary.md"]
    assert gate(files, *args).returncode == 0
    text = summary_file.read_text(encoding="utf-8")
    assert text.startswith("before\n### Regression gate: current.json vs baseline.json")
    assert "| transformer | accuracy | 0.8000 | 0.8000 | +0.0000 | -0.0100 | ok |" in text


def test_compare_is_pure_and_boundaries_hold() -> None:
    params = GateParams.model_validate(PARAMS["gate"])
    # Exactly at tolerance despite float noise: 0.85 - 0.84 = 0.010000000000000009.
    current = changed(["baseline", "calibrated", "accuracy"], 0.84)
    assert all(c.passed for c in compare(METRICS, current, params))
    current = changed(["baseline", "calibrated", "accuracy"], True)  # bool is not a number
    failed = [c for c in compare(METRICS, current, params) if not c.passed]
    assert [(c.model, c.metric) for c in failed] == [("baseline", "accuracy")]
    assert "FAIL: current not a number (true)" in format_table(failed)


def test_default_gate_config_is_valid() -> None:
    conf = yaml.safe_load((ROOT / "conf/gate/default.yaml").read_text(encoding="utf-8"))
    params = GateParams.model_validate(conf)
    calibrate = yaml.safe_load((ROOT / "conf/calibrate/default.yaml").read_text(encoding="utf-8"))
    assert set(params.models) == set(calibrate["models"])  # every evaluated model is gated
    assert params.variant == "calibrated"
