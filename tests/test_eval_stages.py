"""Unit tests of the baseline, calibrate and evaluate stages and the predictions contract."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.calibration import Calibrator, TemperatureScaling, softmax
from pipeline.config import compose, load_section
from pipeline.conformal import ConformalState, fit_conformal, set_mask
from pipeline.conformal_metrics import coverage
from pipeline.domain import GROUPS, LOGIT_COLUMNS
from pipeline.error_analysis import (
    confident_mistakes,
    disagreement,
    disagreements,
    subject_line,
)
from pipeline.errors import PipelineError
from pipeline.evaluation import (
    HEADLINE,
    VIEWS,
    ModelScores,
    Results,
    evaluate_model,
    load_calibrators,
    split_summary,
    write_views,
)
from pipeline.plots import per_class_rows
from pipeline.predictions import (
    check_against_documents,
    make_table,
    read_documents,
    split_arrays,
    validate_probabilities,
)
from pipeline.report import md_cell, render_report, report_html
from pipeline.schemas import MetricsRow, Predictions, validate
from pipeline.served_sets import STATE_KEY, read_state
from pipeline.set_evaluation import SET_VIEW, score_sets, validate_set_rows, write_set_views
from pipeline.set_fitting import fit_sets, out_of_fold_probs, sets_summary
from pipeline.stages.baseline import BaselineParams, fit, logits_for
from pipeline.stages.calibrate import CalibrateParams, calibrate_model
from pipeline.stages.evaluate import EvaluateParams
from tests.helpers import ROOT, default_section

K = len(GROUPS)


def _docs(n_per_class: int = 3) -> pd.DataFrame:
    rows = []
    for split, origin in (("validation", "train"), ("test", "test")):
        for label in range(K):
            for i in range(n_per_class):
                rows.append(
                    {"id": f"{origin}/{GROUPS[label]}/{split}{i}", "split": split, "label": label}
                )
    return pd.DataFrame(rows).astype({"id": "str", "split": "str", "label": "int64"})


def _predictions(docs: pd.DataFrame, seed: int = 0, scale: float = 3.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(docs), K))
    logits[np.arange(len(docs)), docs["label"].to_numpy()] += scale
    return make_table(docs["id"], docs["split"], docs["label"], logits)


# --- the predictions contract -------------------------------------------------------------


def test_predictions_table_validates_and_round_trips(tmp_path: Path) -> None:
    docs = _docs()
    table = validate(_predictions(docs), Predictions, "preds")
    assert list(table.columns) == ["id", "split", "label", *LOGIT_COLUMNS]
    path = tmp_path / "p.parquet"
    table.to_parquet(path, index=False)
    again = validate(pd.read_parquet(path), Predictions, "preds")
    check_against_documents(again, docs, "preds")
    _ids, logits, labels = split_arrays(again, "test")
    assert logits.shape == (3 * K, K) and logits.flags.writeable and labels.dtype == np.int64


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda t: t.assign(logit_3=t["logit_3"].where(t.index != 0, np.inf)), "finite"),
        (lambda t: t.assign(logit_3=t["logit_3"].where(t.index != 0, np.nan)), "logit_3"),
        (lambda t: t.assign(split="train"), "split"),
        (lambda t: t.assign(label=t["label"] + 20), "label"),
        (lambda t: t.drop(columns=["logit_19"]), "logit_19"),
        (lambda t: t.assign(split=np.where(t["split"] == "test", "validation", "test")), "test"),
    ],
)
def test_predictions_schema_rejects_bad_tables(mutate, fragment: str) -> None:
    table = mutate(_predictions(_docs()))
    with pytest.raises(PipelineError, match=fragment):
        validate(table, Predictions, "preds.parquet")


def test_ids_and_labels_must_match_the_documents() -> None:
    docs = _docs()
    preds = _predictions(docs)
    with pytest.raises(PipelineError, match="1 test document.s. missing"):
        check_against_documents(preds.iloc[:-1], docs, "p")
    wrong = preds.copy()
    wrong.loc[0, "label"] = (wrong.loc[0, "label"] + 1) % K
    with pytest.raises(PipelineError, match=r"1 validation label\(s\) differ"):
        check_against_documents(wrong, docs, "p")


def test_read_documents_reads_the_columns_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "documents.parquet"
    with pytest.raises(PipelineError, match=r"documents\.parquet: not found .*dvc repro fetch"):
        read_documents(path)
    table = pd.DataFrame(
        {"id": ["train/a/1"], "split": ["train"], "label": [0], "group": ["a"], "text": ["hi"]}
    )
    table.to_parquet(path)
    assert read_documents(path).columns.tolist() == ["id", "split", "label"]
    assert read_documents(path, columns=None).columns.tolist() == table.columns.tolist()
    assert read_documents(path, columns=("id", "text")).to_dict("list") == {
        "id": ["train/a/1"],
        "text": ["hi"],
    }


def test_probabilities_schema() -> None:
    probs = softmax(np.random.default_rng(0).normal(size=(5, K)))
    ids, labels = [f"test/x/{i}" for i in range(5)], np.arange(5)
    validate_probabilities(ids, labels, probs, "ok")
    with pytest.raises(PipelineError, match="sum to 1"):
        validate_probabilities(ids, labels, probs * 1.01, "bad")
    bad = probs.copy()
    bad[0, 0] = -0.5
    with pytest.raises(PipelineError, match=r"\[0, 1\]"):
        validate_probabilities(ids, labels, bad, "bad")


# --- baseline ------------------------------------------------------------------------------


def test_baseline_logits_are_the_models_log_odds() -> None:
    texts = [f"{GROUPS[j].replace('.', ' ')} post {i}" for j in range(K) for i in range(3)]
    labels = np.repeat(np.arange(K), 3)
    params = default_section("baseline", min_df=1)
    vectorizer, model, info = fit(texts, labels, params, seed=0)
    assert info["converged"] and info["features"] == len(vectorizer.vocabulary_)
    z = logits_for(vectorizer, model, texts)
    assert z.shape == (len(texts), K)
    np.testing.assert_allclose(softmax(z), model.predict_proba(vectorizer.transform(texts)))
    assert np.mean(z.argmax(axis=1) == labels) == 1.0
    # The vocabulary comes from the texts it was fitted on only.
    assert "unseenword" not in vectorizer.vocabulary_


def test_baseline_pruning_everything_is_a_clear_error() -> None:
    with pytest.raises(PipelineError, match="TF-IDF on the train split failed"):
        fit(["a b", "c d"], np.array([0, 1]), default_section("baseline", min_df=5), seed=0)


# --- calibrate -----------------------------------------------------------------------------


def _params(**values) -> CalibrateParams:
    return default_section("calibrate", models=["baseline"], **values)


def test_temperature_is_recovered_and_reported() -> None:
    rng = np.random.default_rng(1)
    true_logits = rng.normal(scale=2.0, size=(4000, K))
    labels = np.array([rng.choice(K, p=p) for p in softmax(true_logits)])
    calibrator, report = calibrate_model(true_logits * 2.5, labels, _params(), seed=0)
    assert isinstance(calibrator, TemperatureScaling)
    assert report["temperature"] == pytest.approx(2.5, rel=0.08)
    assert report["validation_nll_after"] < report["validation_nll_before"]
    assert report["validation_ece_after"] < report["validation_ece_before"]


@pytest.mark.parametrize(
    ("method", "keys"), [("ets", {"temperature", "weights"}), ("temperature_platt", {"slope"})]
)
def test_low_parameter_methods_report_their_parameters(method: str, keys: set[str]) -> None:
    docs = _docs(n_per_class=10)
    _, logits, labels = split_arrays(_predictions(docs, scale=6.0), "validation")
    calibrator, report = calibrate_model(logits, labels, _params(method=method), seed=0)
    assert report["method"] == calibrator.method == method
    state = calibrator.to_dict()
    assert keys <= set(report) and all(report[k] == state[k] for k in keys)
    assert json.loads(json.dumps(report))["method"] == method


def test_auto_reports_the_cv_table_and_picks_its_best() -> None:
    docs = _docs(n_per_class=10)
    _, logits, labels = split_arrays(_predictions(docs, scale=6.0), "validation")
    methods = ["none", "temperature", "vector"]
    _, report = calibrate_model(logits, labels, _params(method="auto", auto_methods=methods), 0)
    assert report["selected_by"] == "auto" and set(report["cv"]) == set(methods)
    best = min(methods, key=lambda m: report["cv"][m]["mean_nll"])
    assert report["method"] == best
    assert all(len(row["fold_nll"]) == 5 for row in report["cv"].values())


def test_calibrate_fits_sets_on_cross_fitted_validation_rows() -> None:
    docs = _docs(n_per_class=25)
    _, logits, labels = split_arrays(_predictions(docs, scale=2.0), "validation")
    params = _params(method="temperature")
    calibrator, report = calibrate_model(logits, labels, params, seed=0)
    method = report["method"]
    assert method == "temperature" and params.set_levels == [0.9, 0.95]
    oof = out_of_fold_probs(logits, labels, method, params.opts(method), params.folds, 0)
    assert not np.allclose(oof, calibrator.predict_proba(logits))  # not the in-sample fit
    np.testing.assert_array_equal(
        oof, out_of_fold_probs(logits, labels, method, params.opts(method), params.folds, 0)
    )
    state = fit_sets(logits, labels, method, params.opts(method), params.set_levels, 5, 0)
    assert state.to_dict() == fit_conformal(oof, labels, params.set_levels).to_dict()
    assert state.levels == (0.9, 0.95) and state.n == len(labels)
    assert state.fallback == ((), ())  # 25 rows per class: enough at 0.95
    # what calibrate writes: the calibrator's keys unchanged, the thresholds beside them
    saved = json.loads(json.dumps({**calibrator.to_dict(), STATE_KEY: state.to_dict()}))
    assert Calibrator.from_dict(saved).to_dict() == calibrator.to_dict()
    loaded = read_state(saved)
    assert isinstance(loaded, ConformalState) and loaded.to_dict() == state.to_dict()
    assert read_state(calibrator.to_dict()) is None  # a calibrator JSON without thresholds
    summary = json.loads(json.dumps(sets_summary(state, GROUPS, method, 5)))
    assert summary["levels"] == [0.9, 0.95]
    assert summary["scored_with"] == "temperature, 5-fold cross-fit"
    assert set(summary["thresholds"]) == {"lac", "aps"}
    assert set(summary["fallback"]) == {"0.9", "0.95"}
    assert summary["thresholds"]["lac"]["0.9"] <= summary["thresholds"]["lac"]["0.95"]
    two = np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(K)])  # per class
    few = fit_sets(logits[two], labels[two], "none", {}, [0.95], 2, 0)
    assert few.fallback == (tuple(range(K)),)
    assert sets_summary(few, GROUPS, "none", 2)["fallback"]["0.95"] == list(GROUPS)
    np.testing.assert_array_equal(
        out_of_fold_probs(logits, labels, "none", {}, 5, 0), softmax(logits)
    )
    with pytest.raises(PipelineError, match="conformal sets: folds must lie in"):
        out_of_fold_probs(logits[:3], labels[:3], method, {}, 5, 0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"method": "platt"}, "calibrate.method='platt'"),
        ({"models": []}, "calibrate.models"),
        ({"models": ["../etc"]}, "model names must match"),
        ({"models": ["a", "a"]}, "unique"),
        ({"folds": 1}, "calibrate.folds=1"),
        ({"options": {"vector": {"reg": -1}}}, "calibrate.options.vector.reg=-1"),
        ({"options": {"lasso": {}}}, "unknown key calibrate.options.lasso"),
        ({"set_levels": [0.95, 0.9]}, "set_levels must be strictly increasing"),
        ({"set_levels": [0.9, 0.9]}, "set_levels must be strictly increasing"),
        ({"set_levels": [1.5]}, "calibrate.set_levels.0=1.5"),
        ({"set_levels": []}, "calibrate.set_levels=[]"),
    ],
)
def test_invalid_calibrate_params(tmp_path: Path, values: dict, message: str) -> None:
    params = yaml.safe_load(compose())
    params["calibrate"].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    with pytest.raises(PipelineError, match=message.replace(".", r"\.").replace("[", r"\[")):
        load_section("calibrate", CalibrateParams, path)


def test_default_sections_validate() -> None:
    path = ROOT / "params.yaml"
    assert load_section("baseline", BaselineParams, path).C == 10.0
    calibrate = load_section("calibrate", CalibrateParams, path)
    assert calibrate.method == "auto"
    assert calibrate.auto_methods == ["temperature", "ets", "temperature_platt"]
    assert load_section("evaluate", EvaluateParams, path).bootstrap >= 1000
    smoke = yaml.safe_load(compose(["experiment=smoke"]))
    assert smoke["evaluate"]["bootstrap"] < 1000
    assert smoke["calibrate"]["method"] == "temperature"  # too few rows for auto's CV


# --- evaluate ------------------------------------------------------------------------------


def test_evaluate_scores_plots_and_reports(tmp_path: Path) -> None:
    docs = _docs(n_per_class=5)
    preds = _predictions(docs, scale=2.0)
    _, val_logits, val_labels = split_arrays(preds, "validation")
    calibrator, _ = calibrate_model(val_logits, val_labels, _params(), seed=0)
    ids, logits, labels = split_arrays(preds, "test")
    probs, summary = evaluate_model(logits, labels, calibrator, n_boot=20, seed=0)
    # Temperature scaling never changes the argmax, so accuracy is the same before and after.
    assert summary["calibrated"]["accuracy"] == summary["uncalibrated"]["accuracy"]
    for variant in ("uncalibrated", "calibrated"):
        validate_probabilities(ids, labels, probs[variant], variant)
    rows = [{"model": "m", "variant": v, **summary[v]} for v in summary]
    validate(pd.DataFrame(rows), MetricsRow, "metrics")

    head, rest = split_summary(summary)
    assert set(head["calibrated"]) == set(HEADLINE)  # what `dvc metrics show` lists
    assert set(head["calibrated"]) | set(rest["calibrated"]) == set(summary["calibrated"])
    assert "n" in rest["calibrated"] and "ece_ci_low" in rest["calibrated"]

    params = default_section("evaluate", bootstrap=20)
    per_class = per_class_rows(labels, probs["calibrated"].argmax(axis=1), GROUPS)
    scores = ModelScores(ids, labels, probs, summary, per_class)
    write_views(tmp_path / "plots", tmp_path / "figures", "m", scores, params.histogram_bins)
    assert {
        p.relative_to(tmp_path / "plots").as_posix()
        for p in (tmp_path / "plots").rglob("*")
        if p.is_file()
    } == {f"{kind}/m.json" for kind in VIEWS}
    assert {p.name for p in (tmp_path / "figures/m").iterdir()} == {f"{n}.png" for n in VIEWS}
    rel = json.loads((tmp_path / "plots/reliability/m.json").read_text())
    for variant in ("uncalibrated", "calibrated"):  # both panels of the reliability template
        rows = [r for r in rel if r["calibration"] == variant]
        assert sum(r["count"] for r in rows) == len(labels) and {r["model"] for r in rows} == {"m"}
    confusion = json.loads((tmp_path / "plots/confusion/m.json").read_text())
    assert len(confusion) == len(labels) and set(confusion[0]) == {"actual", "predicted"}
    plotted = json.loads((tmp_path / "plots/per_class/m.json").read_text())
    assert [{k: r[k] for k in per_class[0]} for r in plotted] == per_class

    results = Results(20, metrics={"m": head}, detail={"m": rest}, methods={"m": "temperature"})
    report = render_report(results, ["m"])
    assert "15 equal-width bins" in report and "| m | temperature |" in report
    assert "![reliability m](figures/m/reliability.png)" in report
    acc = summary["calibrated"]["accuracy"]
    assert f"| m | temperature | {acc:.4f} [" in report  # a fraction, as in metrics.json
    assert "%" not in report.split("| model |")[1]  # no percentages in the table


def test_evaluate_scores_prediction_sets(tmp_path: Path) -> None:
    docs = _docs(n_per_class=25)
    preds = _predictions(docs, scale=2.0)
    _, val_logits, val_labels = split_arrays(preds, "validation")
    calibrator, _ = calibrate_model(val_logits, val_labels, _params(method="temperature"), 0)
    state = fit_sets(val_logits, val_labels, "temperature", {}, [0.9, 0.95], 5, 0)
    _, logits, labels = split_arrays(preds, "test")
    probs, summary = evaluate_model(logits, labels, calibrator, n_boot=20, seed=0)
    choice = default_section("register").model_copy(update={"set_method": "aps"})
    sets = score_sets(probs["calibrated"], labels, state, choice, 20, 0, GROUPS)
    assert (sets["method"], sets["variant"]) == ("aps", "marginal")
    assert set(sets["fallback"]) == {"0.9", "0.95"}
    for method in ("lac", "aps"):
        for variant in ("marginal", "mondrian"):
            by_level = sets["scores"][method][variant]
            assert set(by_level) == {"0.9", "0.95"}
            for level, m in by_level.items():
                mask = set_mask(probs["calibrated"], state, float(level), method, variant)
                assert m["coverage"] == coverage(mask, labels)
                assert m["coverage_ci_low"] <= m["coverage"] <= m["coverage_ci_high"]
                assert m["worst_class_name"] == GROUPS[m["worst_class"]]
                assert m["mean_set_size"] == mask.sum(axis=1).mean()
    served = sets["scores"]["aps"]["marginal"]
    assert served["0.9"]["mean_set_size"] <= served["0.95"]["mean_set_size"]  # nested sets

    head, rest = split_summary(summary)
    results = Results(20, metrics={"m": head}, detail={"m": rest}, methods={"m": "temperature"})
    results.add_sets("m", sets)
    before = json.loads(json.dumps(split_summary(summary)[0]))
    # the existing keys stay as they were; the headline adds two numbers at 0.95 only
    assert {k: v for k, v in results.metrics["m"].items() if k != "sets"} == before
    assert results.metrics["m"]["sets"] == {
        "coverage_95": served["0.95"]["coverage"],
        "mean_size_95": served["0.95"]["mean_set_size"],
    }
    assert results.detail["m"]["sets"] is sets
    validate_set_rows(results.sets, "metrics_detail.json")
    bad = {
        "m": {**sets, "scores": {"lac": {"marginal": {"0.9": {**served["0.9"], "coverage": 2}}}}}
    }
    with pytest.raises(PipelineError, match="SetMetricsRow"):
        validate_set_rows(bad, "metrics_detail.json")

    write_set_views(
        tmp_path / "plots", tmp_path / "figures", "m", probs["calibrated"], state, choice
    )
    rows = json.loads((tmp_path / f"plots/{SET_VIEW}/m.json").read_text())
    assert {r["level"] for r in rows} == {"0.9", "0.95"} and {r["model"] for r in rows} == {"m"}
    assert sum(r["documents"] for r in rows if r["level"] == "0.95") == len(labels)
    assert (tmp_path / f"figures/m/{SET_VIEW}.png").stat().st_size > 1000
    report = render_report(results, ["m"])
    assert "## Prediction sets" in report and f"![set-size m](figures/m/{SET_VIEW}.png)" in report
    cov = served["0.95"]["coverage"]
    assert f"| 0.95 | {cov:.4f} [" in report and served["0.95"]["worst_class_name"] in report
    assert "## Prediction sets" not in render_report(
        Results(20, metrics={"m": head}, detail={"m": rest}, methods={"m": "temperature"}), ["m"]
    )
    assert f"figures/m/{SET_VIEW}.png" not in render_report(results, ["m"], figure_models=[])


def test_error_analysis_finds_confident_mistakes_and_disagreements() -> None:
    ids = ["test/a/1", "test/a/2", "test/b/3", "test/b/4"]
    labels = np.array([0, 0, 1, 1])
    sure = np.full((4, K), 0.0)
    sure[[0, 1, 2, 3], [1, 0, 0, 1]] = [0.9, 0.8, 0.6, 0.7]  # rows 0 and 2 are wrong
    sure[:, 5] = 1 - sure.max(axis=1)
    mistakes = confident_mistakes(ids, labels, sure, k=5)
    assert [m["id"] for m in mistakes] == ["test/a/1", "test/b/3"]  # most confident first
    assert mistakes[0] == {
        "id": "test/a/1",
        "true": GROUPS[0],
        "predicted": GROUPS[1],
        "confidence": pytest.approx(0.9),
    }
    other = sure.copy()
    other[3] = np.eye(K)[7]  # the models disagree completely on document 3 only
    assert disagreement({"x": sure, "y": sure})[0] == 0.0
    rows = disagreements(ids, labels, {"x": sure, "y": other}, k=2)
    assert rows[0]["id"] == "test/b/4" and rows[0]["disagreement"] == pytest.approx(1.0)
    assert rows[0]["answers"]["y"] == {"predicted": GROUPS[7], "confidence": 1.0}
    assert rows[1]["disagreement"] == 0.0


def test_subject_lines_and_markdown_cells() -> None:
    post = "From: a@b\nSubject: Re: [Q] 2 | 3 <ok>\nLines: 2\n\nSubject: not a header\n"
    assert subject_line(post) == "Re: [Q] 2 | 3 <ok>"
    assert subject_line("no headers at all\n\nSubject: body") == ""
    cell = md_cell("Re: [Q] 2 | 3 <ok>\n*x*")
    assert "|" not in cell.replace("\\|", "") and "\n" not in cell
    assert cell == "Re: \\[Q\\] 2 \\| 3 \\<ok\\> \\*x\\*"
    assert md_cell("") == "(none)" and len(md_cell("x" * 200, limit=20)) == 20


def test_report_html_inlines_every_figure(tmp_path: Path) -> None:
    from pipeline.plots import per_class_bars

    rows = [{"class": c, "precision": 1.0, "recall": 1.0, "support": 1} for c in "ab"]
    figure = per_class_bars(rows, tmp_path / "f/x.png")
    page = report_html("# T\n\n| a |\n|---|\n| 1 |\n\n![x](f/x.png)\n", tmp_path)
    assert '<meta charset="utf-8">' in page and "<table>" in page
    encoded = base64.b64encode(figure.read_bytes()).decode()
    assert f'src="data:image/png;base64,{encoded}"' in page and "f/x.png" not in page
    with pytest.raises(PipelineError, match="missing.png: the report links it"):
        report_html("![y](figures/missing.png)", tmp_path)


def test_metrics_table_rejects_nonsense() -> None:
    row = {
        "model": "m", "variant": "calibrated", "n": 10, "accuracy": 0.5,
        "accuracy_ci_low": 0.6, "accuracy_ci_high": 0.4, "macro_f1": 0.5, "nll": 1.0,
        "brier": 0.5, "ece": 1.5, "ece_ci_low": 0.1, "ece_ci_high": 0.2, "ece_debiased": 0.1,
        "adaptive_ece": 0.1,
        "mce": 0.2, "classwise_ece": 0.01, "aurc": 0.1,
    }  # fmt: skip
    with pytest.raises(PipelineError, match="ece") as info:
        validate(pd.DataFrame([row]), MetricsRow, "metrics.json")
    assert "ordered" in str(info.value)


def test_load_calibrators_reads_the_listed_models_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=r"calibrator/m.json: not found .*calibrate@m"):
        load_calibrators(["m"])
    folder = tmp_path / "data/models/calibrator"
    folder.mkdir(parents=True)
    (folder / "m.json").write_text('{"method": "temperature", "num_classes": 20}')
    with pytest.raises(PipelineError, match="m.json: calibrator state: missing key"):
        load_calibrators(["m"])
    (folder / "m.json").write_text(json.dumps(TemperatureScaling(K, 1.5).to_dict()))
    (folder / "stale.json").write_text("left by a model no longer listed")
    assert load_calibrators(["m"])["m"].temperature == 1.5


def test_the_committed_report_renders_from_the_committed_tree() -> None:
    """reports/report.md renders on GitHub and in a fresh clone: every image it links is a
    file committed beside it (not a git-ignored or DVC-cached output)."""
    import re
    import subprocess

    tracked = set(
        subprocess.run(
            ["git", "ls-files", "reports"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    )
    report = (ROOT / "reports/report.md").read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", report)
    assert links and all(link.startswith("figures/") for link in links), links
    missing = [link for link in links if f"reports/{link}" not in tracked]
    assert not missing, f"linked by reports/report.md but not committed: {missing}"
