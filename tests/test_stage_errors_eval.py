"""baseline, calibrate and evaluate run as DVC runs them; bad input is one clear error line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipeline.domain import LOGIT_COLUMNS
from tests.helpers import (
    SMOKE_UNTRACKED,
    archive_overrides,
    assert_failed_cleanly,
    run_stage,
    stage_files,
    write_params,
)

# These tests exercise calibrate/evaluate on the baseline alone (no transformer stages).
BASELINE_ONLY = (*SMOKE_UNTRACKED, "calibrate.models=[baseline]")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, tiny_archive) -> Path:
    """A smoke workdir after fetch and baseline (built once for the module)."""
    work = tmp_path_factory.mktemp("fitted")
    write_params(work / "params.yaml", *BASELINE_ONLY, *archive_overrides(*tiny_archive))
    for stage in ("fetch", "baseline"):
        proc = run_stage(stage, work)
        assert proc.returncode == 0, proc.stderr
    return work


@pytest.fixture
def workdir(fitted: Path, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(fitted, work)
    return work


@pytest.mark.slow
def test_baseline_calibrate_evaluate_succeed(workdir: Path) -> None:
    preds = pd.read_parquet(workdir / "data/predictions/baseline/predictions.parquet")
    assert set(preds["split"]) == {"validation", "test"} and len(preds) == 80
    report = json.loads((workdir / "reports/baseline.json").read_text())
    val = preds[preds["split"] == "validation"]
    accuracy = (val[list(LOGIT_COLUMNS)].to_numpy().argmax(1) == val["label"]).mean()
    assert report["converged"] and report["validation_accuracy"] == pytest.approx(accuracy)
    for stage, args in (("calibrate", ["baseline"]), ("evaluate", [])):
        proc = run_stage(stage, workdir, *args)
        assert proc.returncode == 0, proc.stderr
    assert (workdir / "data/models/calibrator/baseline.json").is_file()
    assert json.loads((workdir / "reports/calibrate/baseline.json").read_text())["method"]
    for kind in ("reliability", "confidence", "confusion", "per_class"):
        assert (workdir / f"reports/plots/{kind}/baseline.json").is_file()
    metrics = json.loads((workdir / "reports/metrics.json").read_text())
    detail = json.loads((workdir / "reports/metrics_detail.json").read_text())
    assert detail["ece_bins"] == 15 and detail["baseline"]["calibrated"]["n"] == 60
    assert set(metrics["baseline"]) == {"uncalibrated", "calibrated", "sets"}
    assert set(metrics["baseline"]["sets"]) == {"coverage_95", "mean_size_95"}
    calibrator = json.loads((workdir / "data/models/calibrator/baseline.json").read_text())
    assert calibrator["conformal"]["levels"] == [0.9, 0.95] and calibrator["method"]
    sets = json.loads((workdir / "reports/calibrate/baseline.json").read_text())["sets"]
    assert sets["scored_with"].endswith("5-fold cross-fit") and set(sets["thresholds"]) == {
        "lac",
        "aps",
    }
    assert (workdir / "reports/plots/set_size/baseline.json").is_file()
    assert (workdir / "reports/figures/baseline/set_size.png").stat().st_size > 1000
    assert "## Prediction sets" in (workdir / "reports/report.md").read_text()
    assert (workdir / "reports/figures/baseline/reliability.png").stat().st_size > 1000
    assert "baseline" in (workdir / "reports/report.md").read_text()
    assert not list(workdir.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "usage: python -m pipeline.stages.calibrate <model>"),
        (["baseline", "wide"], "usage: python -m pipeline.stages.calibrate <model>"),
        (["wide"], "model 'wide' is not in calibrate.models (baseline)"),
    ],
)
def test_calibrate_needs_one_listed_model(workdir: Path, args: list[str], fragment: str) -> None:
    before = stage_files(workdir)
    assert_failed_cleanly(run_stage("calibrate", workdir, *args), workdir, fragment, before=before)


@pytest.mark.parametrize(
    ("stage", "override", "fragment"),
    [
        ("baseline", "baseline.C=0", "baseline.C=0"),
        ("baseline", "baseline.solver=liblinear", "baseline.solver='liblinear'"),
        ("baseline", "+baseline.penalty=l1", "unknown key baseline.penalty"),
        ("calibrate", "calibrate.method=platt", "calibrate.method='platt'"),
        ("calibrate", "calibrate.folds=1", "calibrate.folds=1"),
        ("evaluate", "evaluate.bootstrap=1", "evaluate.bootstrap=1"),
    ],
)
def test_invalid_params(workdir: Path, tiny_archive, stage: str, override: str, fragment: str):
    write_params(
        workdir / "params.yaml", *BASELINE_ONLY, override, *archive_overrides(*tiny_archive)
    )
    before = stage_files(workdir)
    args = ["baseline"] if stage == "calibrate" else []
    assert_failed_cleanly(
        run_stage(stage, workdir, *args), workdir, "params.yaml", fragment, before=before
    )


def test_baseline_without_documents(tmp_path: Path) -> None:
    write_params(tmp_path / "params.yaml", *BASELINE_ONLY)
    proc = run_stage("baseline", tmp_path)
    assert_failed_cleanly(proc, tmp_path, "documents.parquet", "not found")


@pytest.mark.slow
def test_calibrate_a_model_without_predictions(workdir: Path, tiny_archive) -> None:
    write_params(
        workdir / "params.yaml",
        *BASELINE_ONLY,
        "calibrate.models=[baseline,transformer]",
        *archive_overrides(*tiny_archive),
    )
    before = stage_files(workdir)
    assert_failed_cleanly(
        run_stage("calibrate", workdir, "transformer"),
        workdir,
        "data/predictions/transformer/predictions.parquet",
        "not found",
        before=before,
    )


def test_predictions_on_other_documents(workdir: Path) -> None:
    path = workdir / "data/predictions/baseline/predictions.parquet"
    preds = pd.read_parquet(path)
    preds.iloc[:-1].to_parquet(path, index=False)  # one test document missing
    before = stage_files(workdir)
    assert_failed_cleanly(
        run_stage("calibrate", workdir, "baseline"),
        workdir,
        "ids do not match",
        "test document",
        before=before,
    )


@pytest.mark.slow
def test_calibrate_thresholds_never_read_test_rows(workdir: Path) -> None:
    """Changing every test row's logits leaves the calibrator and its thresholds as they were."""
    calibrator = workdir / "data/models/calibrator/baseline.json"
    assert run_stage("calibrate", workdir, "baseline").returncode == 0
    before = calibrator.read_bytes()
    assert b'"conformal"' in before
    path = workdir / "data/predictions/baseline/predictions.parquet"
    preds = pd.read_parquet(path)
    test = preds["split"] == "test"
    preds.loc[test, list(LOGIT_COLUMNS)] = preds.loc[test, list(LOGIT_COLUMNS)].to_numpy()[::-1]
    preds.to_parquet(path, index=False)
    assert run_stage("calibrate", workdir, "baseline").returncode == 0
    assert calibrator.read_bytes() == before


def test_corrupt_predictions_schema(workdir: Path) -> None:
    path = workdir / "data/predictions/baseline/predictions.parquet"
    preds = pd.read_parquet(path)
    preds.loc[0, "logit_0"] = float("inf")
    preds.to_parquet(path, index=False)
    before = stage_files(workdir)
    proc = run_stage("calibrate", workdir, "baseline")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "failed 1 check(s) of Predictions" in proc.stderr and "finite" in proc.stderr
    assert stage_files(workdir) == before


def test_evaluate_without_calibrators(workdir: Path) -> None:
    before = stage_files(workdir)
    assert_failed_cleanly(
        run_stage("evaluate", workdir),
        workdir,
        "data/models/calibrator/baseline.json",
        "not found",
        before=before,
    )


@pytest.mark.slow
def test_evaluate_with_a_missing_predictions_file(workdir: Path) -> None:
    assert run_stage("calibrate", workdir, "baseline").returncode == 0
    (workdir / "data/predictions/baseline/predictions.parquet").unlink()
    before = stage_files(workdir)
    assert_failed_cleanly(
        run_stage("evaluate", workdir), workdir, "predictions.parquet", "not found", before=before
    )
