"""The smoke pipeline through baseline, calibrate and evaluate, run by real DVC."""

from __future__ import annotations

import itertools
import json
import sys

import pytest
from mlflow import MlflowClient

from tests.helpers import dvc, ran, read_json, run

VARIANTS = ("uncalibrated", "calibrated")
MODELS = ("baseline", "wide", "transformer", "blend")
PNGS = ("reliability", "confidence", "confusion", "per_class")
pytestmark = pytest.mark.e2e


def _check_metrics(metrics: dict, n_test: int) -> None:
    assert metrics["ece_bins"] == 15
    assert set(metrics) - {"ece_bins"} == set(MODELS)
    for model, variant in itertools.product(MODELS, VARIANTS):
        m = metrics[model][variant]
        assert m["n"] == n_test
        # topic words make the tiny posts separable; the tiny transformer trains briefly
        assert (0.1 if model == "transformer" else 0.5) <= m["accuracy"] <= 1
        assert m["accuracy_ci_low"] <= m["accuracy"] <= m["accuracy_ci_high"]
        for key in ("ece", "adaptive_ece", "mce", "classwise_ece", "aurc", "macro_f1"):
            assert 0 <= m[key] <= 1, (model, variant, key, m[key])
        assert m["nll"] >= 0 and 0 <= m["brier"] <= 2


def test_smoke_pipeline_through_evaluate(smoke) -> None:
    repo, overrides = smoke.repo, smoke.overrides
    first = ran(smoke.output)
    assert first == {
        "fetch",
        "tokenize",
        "pretrain",
        "finetune",
        "wide",
        "blend",
        "baseline",
        "calibrate",
        "evaluate",
        "register",
    }
    _check_metrics(read_json(repo / "reports/metrics.json"), n_test=60)
    assert read_json(repo / "reports/calibrate.json")["baseline"]["method"] == "temperature"
    plots = repo / "reports/plots"
    for model, name in itertools.product(MODELS, PNGS):
        assert (plots / f"{model}/{name}.png").stat().st_size > 1000
    assert (plots / "risk_coverage.png").is_file()
    report = (repo / "reports/report.md").read_text(encoding="utf-8")
    assert "15 equal-width bins" in report and "| baseline | temperature |" in report
    for model in MODELS:
        assert f"| {model} | temperature |" in report
    # one evaluate run per model in the tracking store, all of one pipeline execution
    client = MlflowClient()
    experiment = client.get_experiment_by_name("newsgroups-pipeline")
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.stage = 'evaluate' and tags.git_commit = '{smoke.commit}'",
    )
    assert sorted(r.data.tags["model"] for r in runs) == sorted(MODELS)
    assert "reports/metrics.json" in dvc(repo, "metrics", "show")
    # Every plot declared in dvc.yaml resolves (DVC reports unreadable sources as errors).
    shown = json.loads(dvc(repo, "plots", "show", "--json"))
    assert not shown.get("errors"), shown.get("errors")
    assert {
        "Reliability (calibrated)",
        "Confusion, blend",
        "Pretraining loss (MLM)",
        "Fine-tuning loss",
    } <= set(shown["data"])
    assert "reports/plots/baseline/reliability.png" in shown["data"]
    before = {p: p.read_bytes() for p in (repo / "data").rglob("*") if p.is_file()}

    # A failed experiment leaves the committed reports in place (persist + atomic writes),
    # and the README's recovery (git checkout params.yaml, dvc checkout) restores the rest.
    reports = {p: p.read_bytes() for p in (repo / "reports").rglob("*.json") if p.is_file()}
    bad = [*(f"-S={o}" for o in overrides), "-S=calibrate.method=nope"]
    failed = run([sys.executable, "-m", "dvc", "exp", "run", *bad], repo, check=False)
    assert failed.returncode != 0 and "calibrate.method='nope'" in failed.stderr
    assert not (repo / "data/models/calibrator").exists()  # DVC removed the cached output
    assert {p: p.read_bytes() for p in reports} == reports
    run(["git", "checkout", "--", "params.yaml"], repo)
    dvc(repo, "checkout")
    assert "up to date" in dvc(repo, "status").lower()
    assert (repo / "data/models/calibrator/baseline.json").is_file()

    # Changing only a calibrate param reruns only calibrate and what reads calibrators.
    exp = dvc(repo, "exp", "run", *(f"-S={o}" for o in overrides), "-S=calibrate.method=vector")
    assert ran(exp) == {"calibrate", "evaluate", "register"}
    assert read_json(repo / "data/models/calibrator/baseline.json")["method"] == "vector"
    assert read_json(repo / "reports/calibrate.json")["baseline"]["method"] == "vector"
    _check_metrics(read_json(repo / "reports/metrics.json"), n_test=60)
    assert "| baseline | vector |" in (repo / "reports/report.md").read_text(encoding="utf-8")
    predictions = repo / "data/predictions/baseline/predictions.parquet"
    assert predictions.read_bytes() == before[predictions]  # baseline untouched
    assert "calibrate.method" in dvc(repo, "params", "diff", "HEAD")

    # A wide param reruns the wide model and what reads it, nothing upstream; a blend
    # param reruns neither model.
    exp = dvc(repo, "exp", "run", *(f"-S={o}" for o in overrides), "-S=wide.C=0.5")
    assert ran(exp) == {"wide", "blend", "calibrate", "evaluate", "register"}
    exp = dvc(
        repo, "exp", "run", *(f"-S={o}" for o in overrides), "-S=wide.C=0.5", "-S=blend.folds=3"
    )
    # The served blend's weights are fitted on all of validation, so folds may leave
    # register's inputs unchanged; the models themselves never rerun.
    assert ran(exp) - {"register"} == {"blend", "calibrate", "evaluate"}
    assert read_json(repo / "reports/blend.json")["folds"] == 3

    # Changing only a finetune param reruns finetune and what follows, never pretrain.
    exp = dvc(repo, "exp", "run", *(f"-S={o}" for o in overrides), "-S=finetune.dropout=0.2")
    assert ran(exp) == {"finetune", "blend", "calibrate", "evaluate", "register"}
    pretrained = repo / "data/models/pretrained/model.safetensors"
    assert pretrained.read_bytes() == before[pretrained]
