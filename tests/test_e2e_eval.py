"""The smoke pipeline through baseline, calibrate and evaluate, run by real DVC.

Also what a user reads afterwards: the real SQLite MLflow store the stages logged to (the
session store of conftest.py), the registry, `dvc plots show` with the project's templates
and offline page, `make compare`, and the report's image links.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from pipeline.evaluation import VIEWS
from tests.helpers import (
    ROOT,
    dvc,
    ran,
    read_json,
    run,
    stage_env,
)

VARIANTS = ("uncalibrated", "calibrated")
MODELS = ("baseline", "wide", "transformer", "blend")
CALIBRATE = {m: f"calibrate@{m}" for m in MODELS}  # one DVC stage per model of calibrate.models
PNGS = ("reliability", "confidence", "confusion", "per_class")
HEADLINE = {"accuracy", "macro_f1", "nll", "brier", "ece", "ece_debiased"}
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
PRODUCTION = "newsgroups-classifier"
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _check_metrics(metrics: dict, detail: dict, n_test: int) -> None:
    assert set(metrics) == set(MODELS)  # headline numbers only: dvc exp show stays narrow
    assert detail["ece_bins"] == 15
    for model in MODELS:  # prediction sets: two headline numbers, at 0.95 only
        assert set(metrics[model]) == {*VARIANTS, "sets"}
        sets = metrics[model]["sets"]
        assert set(sets) == {"coverage_95", "mean_size_95"}
        assert 0 <= sets["coverage_95"] <= 1 and 0 <= sets["mean_size_95"] <= 20
        served = detail[model]["sets"]["scores"]["lac"]["marginal"]
        assert set(served) == {"0.9", "0.95"} and served["0.95"]["coverage"] == sets["coverage_95"]
    for model, variant in itertools.product(MODELS, VARIANTS):
        m, d = metrics[model][variant], detail[model][variant]
        assert set(m) == HEADLINE
        assert d["n"] == n_test
        # topic words make the tiny posts separable; the tiny transformer trains briefly
        assert (0.1 if model == "transformer" else 0.5) <= m["accuracy"] <= 1
        assert d["accuracy_ci_low"] <= m["accuracy"] <= d["accuracy_ci_high"]
        for key in ("ece", "ece_debiased", "macro_f1"):
            assert 0 <= m[key] <= 1, (model, variant, key, m[key])
        for key in ("adaptive_ece", "mce", "classwise_ece", "aurc"):
            assert 0 <= d[key] <= 1, (model, variant, key, d[key])
        assert m["nll"] >= 0 and 0 <= m["brier"] <= 2
    assert len(detail["blend"]["per_class"]) == 20


def image_links(markdown: str) -> list[str]:
    return IMAGE_LINK.findall(markdown)


def test_smoke_pipeline_through_evaluate(smoke) -> None:
    repo = smoke.repo
    first = ran(smoke.output)
    assert first == {
        "fetch",
        "tokenize",
        "pretrain",
        "finetune",
        "wide",
        "blend",
        "baseline",
        *CALIBRATE.values(),
        "evaluate",
        "register",
    }
    metrics = read_json(repo / "reports/metrics.json")
    _check_metrics(metrics, read_json(repo / "reports/metrics_detail.json"), n_test=60)
    assert read_json(repo / "reports/calibrate/baseline.json")["method"] == "temperature"
    figures = repo / "reports/figures"
    for model, name in itertools.product(MODELS, (*PNGS, "set_size")):
        assert (figures / f"{model}/{name}.png").stat().st_size > 1000
    assert "## Prediction sets" in (repo / "reports/report.md").read_text(encoding="utf-8")
    calibrator = read_json(repo / "data/models/calibrator/baseline.json")
    assert calibrator["conformal"]["levels"] == [0.9, 0.95]
    assert set(read_json(repo / "reports/calibrate/baseline.json")["sets"]["fallback"]) == {
        "0.9",
        "0.95",
    }
    assert (figures / "risk_coverage.png").is_file()
    report = (repo / "reports/report.md").read_text(encoding="utf-8")
    assert "15 equal-width bins" in report and "| baseline | temperature |" in report
    for model in MODELS:
        assert f"| {model} | temperature |" in report
    assert "## Error analysis" in report and "| `test/" in report  # ids with their Subject
    assert "question" in report.split("## Error analysis")[1]  # the tiny posts' Subject lines
    shown = dvc(repo, "metrics", "show")
    assert "reports/metrics.json" in shown and "reports/data.json" not in shown
    check_tracking_store(metrics, smoke.commit)
    check_plots(repo)

    # report.md renders in a fresh clone: every image it links is committed beside it
    committed = set(run(["git", "ls-files", "reports"], repo).stdout.split())
    links = image_links(report)
    assert len(links) == 1 + len(MODELS) * (len(PNGS) + 1)  # + each model's set sizes
    assert {f"reports/{link}" for link in links} <= committed
    assert "reports/figures/blend/reliability.png" in committed


def test_production_registration_and_a_failed_experiment(smoke) -> None:
    repo = smoke.repo
    metrics = read_json(repo / "reports/metrics.json")
    # Registering a smoke run under the production name takes its param; the version then
    # says what it is.
    assert smoke.exp_run("register.production=true") == {"register"}
    check_production_version(metrics, head(repo), read_json(repo / "reports/register.json"))
    run(["git", "checkout", "--", "params.yaml", "dvc.lock", "reports"], repo)
    dvc(repo, "checkout")

    # A failed experiment leaves the committed reports in place (persist + atomic writes),
    # and the recovery of docs/troubleshooting.md (git checkout params.yaml, dvc checkout)
    # restores the rest.
    reports = {p: p.read_bytes() for p in (repo / "reports").rglob("*.json") if p.is_file()}
    bad = [*(f"-S={o}" for o in smoke.overrides), "-S=calibrate.method=nope"]
    failed = run([sys.executable, "-m", "dvc", "exp", "run", *bad], repo, check=False)
    assert failed.returncode != 0 and "calibrate.method='nope'" in failed.stderr
    # DVC removed the cached output of the calibrate@<model> stage that failed
    assert len(list((repo / "data/models/calibrator").glob("*.json"))) < len(MODELS)
    assert {p: p.read_bytes() for p in reports} == reports
    run(["git", "checkout", "--", "params.yaml"], repo)
    dvc(repo, "checkout")
    assert "up to date" in dvc(repo, "status").lower()
    assert (repo / "data/models/calibrator/baseline.json").is_file()


def test_calibrate_params_rerun_only_calibration_and_evaluation(smoke) -> None:
    repo = smoke.repo
    before = smoke.data_files()
    # Changing only a calibrate param reruns only calibrate and what reads calibrators.
    assert smoke.exp_run("calibrate.method=vector") == {
        *CALIBRATE.values(),
        "evaluate",
        "register",
    }
    assert read_json(repo / "data/models/calibrator/baseline.json")["method"] == "vector"
    assert read_json(repo / "reports/calibrate/baseline.json")["method"] == "vector"
    _check_metrics(
        read_json(repo / "reports/metrics.json"),
        read_json(repo / "reports/metrics_detail.json"),
        n_test=60,
    )
    assert "| baseline | vector |" in (repo / "reports/report.md").read_text(encoding="utf-8")
    predictions = repo / "data/predictions/baseline/predictions.parquet"
    assert predictions.read_bytes() == before[predictions]  # baseline untouched
    assert "calibrate.method" in dvc(repo, "params", "diff", "HEAD")

    # calibrate.models is the one list of models: dropping two reruns only evaluate (and
    # register, which reads metrics.json), and their rows and plots leave the outputs.
    # (every experiment keeps the workspace's values of the params changed before it)
    kept = ["calibrate.method=vector"]
    assert smoke.exp_run(*kept, "calibrate.models=[baseline,blend]") - {"register"} == {"evaluate"}
    assert set(read_json(repo / "reports/metrics.json")) == {"baseline", "blend"}
    assert {p.name for p in (repo / "reports/plots/reliability").iterdir()} == {
        "baseline.json",
        "blend.json",
    }


def test_model_params_rerun_only_their_model_and_what_reads_it(smoke) -> None:
    repo = smoke.repo
    # A wide param reruns the wide model and what reads it, nothing upstream; a blend
    # param reruns neither model.
    # (every experiment keeps the workspace's values of the params changed before it)
    kept = ["wide.C=0.5"]
    assert smoke.exp_run(*kept) == {
        "wide",
        "blend",
        CALIBRATE["wide"],
        CALIBRATE["blend"],
        "evaluate",
        "register",
    }
    served = [
        repo / "data/models/blend/blend.json",
        repo / "data/models/calibrator/blend.json",
        repo / "reports/metrics.json",
    ]
    served_before = [p.read_bytes() for p in served]
    kept.append("blend.folds=3")
    exp = smoke.exp_run(*kept)
    # register reads the blend's weights, its calibrator and metrics: on the smoke data the
    # folds change neither (the blend separates the classes), so it is rightly skipped
    changed = [p.read_bytes() for p in served] != served_before
    rerun = {"blend", CALIBRATE["blend"], "evaluate"}
    assert exp == rerun | ({"register"} if changed else set())
    assert read_json(repo / "reports/blend.json")["folds"] == 3


def test_a_finetune_param_reruns_the_encoder_but_never_pretrain(smoke) -> None:
    repo = smoke.repo
    before = smoke.data_files()
    # Changing only a finetune param reruns finetune and what follows, never pretrain.
    assert smoke.exp_run("finetune.dropout=0.2") == {
        "finetune",
        "blend",
        CALIBRATE["transformer"],
        CALIBRATE["blend"],
        "evaluate",
        "register",
    }
    pretrained = repo / "data/models/pretrained/model.safetensors"
    assert pretrained.read_bytes() == before[pretrained]

    # `make compare`: the experiments side by side in a 200-column terminal.
    bin_dir = f"BIN={Path(sys.executable).parent}"
    compare = run(
        ["make", "-s", "-o", ".venv/.installed-stamp", bin_dir, "compare", "ARGS=--no-pager"],
        repo,
        {**stage_env(), "COLUMNS": "1000"},  # the table's natural width, not a wrapped one
    ).stdout
    lines = [line.rstrip() for line in compare.splitlines() if line.strip()]
    assert max(map(len, lines)) <= 200, compare
    header = next(line for line in lines if "Experiment" in line)
    assert "blend.calibrated.accuracy" in header and "finetune.dropout" in header
    assert "uncalibrated" not in compare and "transformer.calibrated" not in compare

    # Every model stage's predictions are deps of blend: one joins it by params alone, up
    # to evaluate (the served model combines the encoder and the wide model only).
    # (every experiment keeps the workspace's values of the params changed before it)
    kept = ["finetune.dropout=0.2"]
    three = "blend.models=[transformer,wide,baseline]"
    assert smoke.exp_run(*kept, three, stage="evaluate") == {
        "blend",
        CALIBRATE["blend"],
        "evaluate",
    }
    assert set(read_json(repo / "reports/blend.json")["weights"]) == {
        "transformer",
        "wide",
        "baseline",
    }


def check_tracking_store(metrics: dict, commit: str) -> None:
    """The MLflow store after a smoke run (the session's SQLite store)."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name("newsgroups-pipeline")
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.source.git.commit` = '{commit}'"
    )
    by_stage: dict[str, list] = {}
    for r in runs:
        by_stage.setdefault(r.data.tags["stage"], []).append(r)
    assert len(by_stage["pretrain"]) == len(by_stage["finetune"]) == 1
    # no metric point at timestamp 0 (or step 0 under a curve's key), in any run
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["config"] == "smoke"
        assert "(smoke)" in r.data.tags["mlflow.runName"]
        for key in r.data.metrics:
            history = client.get_metric_history(r.info.run_id, key)
            assert all(m.timestamp > 0 for m in history), (r.data.tags["mlflow.runName"], key)
    # pretraining and fine-tuning curves never share a key
    pre, fine = by_stage["pretrain"][0], by_stage["finetune"][0]

    def curves(run: Run) -> set[str]:
        return {k for k in run.data.metrics if not k.startswith("system/")}

    assert not curves(pre) & curves(fine)
    assert all(k.startswith(("pretrain/", "system/")) for k in pre.data.metrics)
    assert {"finetune/train_loss", "finetune/val_loss", "finetune/val_acc"} <= set(
        fine.data.metrics
    )
    assert len(client.get_metric_history(fine.info.run_id, "finetune/val_acc")) >= 2
    # one evaluate run per model with the calibrated headline metrics of metrics.json
    evaluate = by_stage["evaluate"]
    assert sorted(r.data.tags["model"] for r in evaluate) == sorted(MODELS)
    for r in evaluate:
        model = r.data.tags["model"]
        calibrated = metrics[model]["calibrated"]
        assert r.data.metrics["test_accuracy"] == pytest.approx(calibrated["accuracy"])
        assert r.data.metrics["test_ece"] == pytest.approx(calibrated["ece"])
        assert r.data.metrics["test_nll"] == pytest.approx(calibrated["nll"])
        assert all(k.startswith("test_") for k in r.data.metrics)  # no counts, no n
        assert r.data.params["report.test_documents"] == "60"
        # the report renders from the run's artifacts: every image it links is there
        artifacts = client.download_artifacts(r.info.run_id, "")
        text = Path(artifacts, "report.md").read_text(encoding="utf-8")
        links = image_links(text)
        assert "figures/risk_coverage.png" in links and f"figures/{model}/reliability.png" in links
        assert all(Path(artifacts, link).is_file() for link in links), links
        assert 'src="data:image/png;base64,' in Path(artifacts, "report.html").read_text()
    stage_runs = [r for r in runs if r.data.tags["stage"] != "pipeline"]
    keys = {k for r in stage_runs for k in curves(r)}
    assert len(keys) <= 40, sorted(keys)  # a few headline numbers per stage (was 168)
    # the one parent row carries each model's calibrated test metrics of metrics.json
    (parent,) = by_stage["pipeline"]
    assert {r.data.tags["mlflow.parentRunId"] for r in stage_runs} == {parent.info.run_id}
    for model in MODELS:
        calibrated = metrics[model]["calibrated"]
        assert parent.data.metrics[f"{model}/test_accuracy"] == pytest.approx(
            calibrated["accuracy"]
        )
    # a smoke run never registers under the production name
    assert not client.search_registered_models(f"name = '{PRODUCTION}'")
    # the smoke run's version (later tests' reruns may have moved the alias since)
    versions = client.search_model_versions(f"name = '{PRODUCTION}-smoke'")
    ours = [v for v in versions if v.tags.get("git_commit") == commit]
    assert len(ours) == 1 and ours[0].tags["config"] == "smoke"
    alias = client.get_model_version_by_alias(f"{PRODUCTION}-smoke", "candidate")
    assert alias.tags["config"] == "smoke"


def check_production_version(metrics: dict, commit: str, report: dict) -> None:
    """`register.production=true` on smoke outputs: a described, tagged, aliased version."""
    client = MlflowClient()
    version = client.get_model_version_by_alias(PRODUCTION, "candidate")
    blend = metrics["blend"]["calibrated"]
    assert f"accuracy {blend['accuracy']:.4f}, ECE {blend['ece']:.4f}" in version.description
    assert f"Commit {commit[:12]}, config smoke" in version.description
    assert version.tags["git_commit"] == commit and version.tags["config"] == "smoke"
    assert version.tags["dvc_exp_name"]  # registered by `dvc exp run`
    assert version.tags["test_accuracy"] == f"{blend['accuracy']:.4f}"
    assert version.tags["test_ece"] == f"{blend['ece']:.4f}"
    assert report["model_uri"] == f"models:/{PRODUCTION}/{version.version}"
    logged = client.get_logged_model(report["logged_model_uri"].removeprefix("models:/"))
    assert {m.key for m in logged.metrics} >= {"test_accuracy", "test_ece", "test_nll"}


def check_plots(repo: Path) -> None:
    """`dvc plots show` with the project's templates, and the offline page of `make plots`."""
    shown = json.loads(dvc(repo, "plots", "show", "--json"))
    assert not shown.get("errors"), shown.get("errors")
    per_model = {f"reports/plots/{kind}/{m}.json" for kind in (*VIEWS, "set_size") for m in MODELS}
    assert per_model | {
        "Pretraining loss",
        "Fine-tuning loss",
        "Risk-coverage (calibrated)",
    } <= set(shown["data"])
    spec = json.dumps(shown["data"]["reports/plots/reliability/blend.json"][0]["content"])
    assert '"strokeDash"' in spec and '"count"' in spec  # diagonal and bin counts
    assert '"uncalibrated"' in spec and '"calibrated"' in spec  # both panels from one file
    histogram = json.dumps(shown["data"]["reports/plots/confidence/blend.json"][0]["content"])
    assert '"stack": "zero"' in histogram and "smooth" not in histogram
    risk = json.dumps(shown["data"]["Risk-coverage (calibrated)"][0]["content"])
    assert all(f'"model": "{m}"' in risk for m in MODELS)  # one line per model
    page = repo / ".tools/plots.html"
    modules = ROOT / ".tools/node_modules"  # `make test` installs vega there with npm
    run(
        [
            sys.executable,
            "-m",
            "pipeline.tools.plot_page",
            "--node-modules",
            str(modules),
            "--out",
            str(page),
        ],
        repo,
    )
    dvc(repo, "plots", "show", "--html-template", str(page), "--out", "dvc_plots")
    html = (repo / "dvc_plots/index.html").read_text(encoding="utf-8")
    assert '<meta charset="utf-8">' in html and "vegaEmbed(" in html
    assert "<script src=" not in html and "cdn.jsdelivr" not in html  # renders offline
    assert html.count("vegaEmbed('#") >= 15


def head(repo: Path) -> str:
    return run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
