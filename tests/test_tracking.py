"""MLflow tracking with real stores: a SQLite file, and a real `mlflow server`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from pipeline.output_digests import dir_md5, file_md5
from pipeline.run_keys import (
    finite_metrics,
    flatten,
    pipeline_run_id,
    project_root,
    resolve_uri,
    run_name,
    scalar_params,
    split_report,
)
from pipeline.tools.ui import runs_table_url
from tests.helpers import (
    GIT_ENV,
    ROOT,
    archive_overrides,
    read_json,
    run,
    run_stage,
    stage_env,
    wait_for_http,
    write_params,
)


def test_project_root_sees_through_dvc_temp_experiments(tmp_path: Path) -> None:
    temp_copy = tmp_path / "proj/.dvc/tmp/exps/tmpab12cd"
    assert project_root(temp_copy, {}) == tmp_path / "proj"
    assert project_root(tmp_path, {"DVC_ROOT": str(temp_copy)}) == tmp_path / "proj"
    assert project_root(tmp_path / "proj", {}) == tmp_path / "proj"


def test_uri_precedence(tmp_path: Path) -> None:
    uri = "http://tracking.example:5000"
    env = {"MLFLOW_TRACKING_URI": "sqlite:////elsewhere.db"}
    assert resolve_uri(uri, env, tmp_path) == "sqlite:////elsewhere.db"
    assert resolve_uri(uri, {}, tmp_path) == "http://tracking.example:5000"
    assert resolve_uri(None, {}, tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"


def test_reports_split_into_headline_metrics_and_params() -> None:
    report = {
        "documents": {"train": 3, "test": 2},
        "per_class": {"a": {"train": 1}},
        "archive": "x",
        "ok": True,
        "validation": {"blend": {"accuracy": 0.5, "nll": 1.2}},
        "fold_weights": [[1.0, 2.0]],
    }
    assert flatten(report)["documents.train"] == 3
    metrics, rest = split_report("blend", report, {"validation.blend.accuracy": "val_accuracy"})
    assert metrics == {"blend/val_accuracy": 0.5}  # stage-prefixed, nothing else
    assert "validation.blend.accuracy" not in rest and rest["validation.blend.nll"] == 1.2
    _, rest = split_report("fetch", report, {}, skip=("per_class",))
    assert not any(k.startswith("per_class") for k in rest)
    params = scalar_params(rest, "report.")
    assert params["report.documents.test"] == "2" and params["report.ok"] == "True"
    assert "report.fold_weights" not in params  # tables stay in the report artifact
    assert finite_metrics({"a": 1, "b": True, "c": None, "d": 0.5}) == {"a": 1.0, "d": 0.5}
    assert pipeline_run_id("c", "p", "") == pipeline_run_id("c", "p", "")
    assert pipeline_run_id("c", "p", "") != pipeline_run_id("c", "p2", "")


def test_run_names_carry_the_config_and_the_dvc_experiment() -> None:
    assert run_name("evaluate", "blend", "smoke", "") == "evaluate/blend (smoke)"
    assert run_name("fetch", None, "default", "bushy-tins") == "fetch (default, bushy-tins)"


@pytest.fixture
def workdir(tmp_path: Path, tiny_archive) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    write_params(work / "params.yaml", "experiment=smoke", *archive_overrides(*tiny_archive))
    return work


def test_stages_log_params_metrics_tags_and_artifacts(workdir: Path, tiny_archive) -> None:
    uri = f"sqlite:///{workdir.parent}/store.db"
    shutil.copy2(ROOT / "dvc.yaml", workdir)  # the outputs whose hashes the parent gets
    for stage in ("fetch", "tokenize"):
        proc = run_stage(stage, workdir, MLFLOW_TRACKING_URI=uri)
        assert proc.returncode == 0, proc.stderr
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("newsgroups-pipeline")
    runs = {r.data.tags["stage"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"fetch", "tokenize", "pipeline"}
    fetch, tokenize = runs["fetch"], runs["tokenize"]
    check_parent(runs["pipeline"], [fetch, tokenize], workdir)
    assert fetch.data.params["data.validation_fraction"] == "0.1"
    assert fetch.data.params["seed"] == "42"
    assert "tokenizer.vocab_size" not in fetch.data.params  # only its own sections
    # counts are params of the run, not metrics; the per-class table stays in the artifact
    assert fetch.data.metrics == {} and tokenize.data.metrics == {}
    assert fetch.data.params["report.documents.test"] == "60"
    assert not any(k.startswith("report.per_class") for k in fetch.data.params)
    assert fetch.data.tags["input.archive"] == tiny_archive[1]
    assert tokenize.data.params["tokenizer.vocab_size"] == "800"
    assert int(tokenize.data.params["report.vocab_size"]) <= 800
    assert fetch.data.tags["pipeline_run"] == tokenize.data.tags["pipeline_run"]
    assert fetch.data.tags["mlflow.runName"] == "fetch (smoke)"
    assert fetch.data.tags["config"] == "smoke"
    assert fetch.data.tags["mlflow.source.name"] == "pipeline/stages/fetch.py"
    assert fetch.data.tags["mlflow.source.git.commit"] == "unknown"  # workdir is no git repo
    assert fetch.info.status == "FINISHED" and fetch.info.start_time < fetch.info.end_time
    artifacts = {a.path for a in client.list_artifacts(tokenize.info.run_id)}
    assert artifacts == {"tokenize.json", "tokenizer.json"}


def check_parent(parent, children: list, workdir: Path) -> None:
    """One parent for the stages of one execution: every param, the output hashes, the
    datasets of reports/data.json, and the status of its children."""
    assert parent.data.tags["mlflow.runName"] == "pipeline (smoke)"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.data.tags["pipeline_run"] == children[0].data.tags["pipeline_run"]
    assert parent.data.params["tokenizer.vocab_size"] == "800"
    assert parent.data.params["data.validation_fraction"] == "0.1"
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["output.data/raw"] == dir_md5(workdir / "data/raw")
    assert parent.data.tags["output.reports/tokenize.json"] == file_md5(
        workdir / "reports/tokenize.json"
    )
    datasets = read_json(workdir / "reports/data.json")["datasets"]
    assert set(datasets) == {"train", "validation", "test"}
    for linked in [parent, *children]:
        inputs = linked.inputs.dataset_inputs
        contexts = {i.dataset.name: i.tags[0].value for i in inputs}
        assert contexts == {e["name"]: split for split, e in datasets.items()}
        for i in inputs:
            split = contexts[i.dataset.name]
            assert i.dataset.digest == datasets[split]["digest"] and len(i.dataset.digest) == 36
            assert json.loads(i.dataset.profile)["num_rows"] == datasets[split]["rows"] > 0
            assert "text" in i.dataset.schema


def test_a_failed_stage_ends_its_run_as_failed(workdir: Path) -> None:
    """The run opens when the stage starts; a stage that stops says so in the UI."""
    uri = f"sqlite:///{workdir.parent}/failed.db"
    proc = run_stage("baseline", workdir, MLFLOW_TRACKING_URI=uri)  # no documents yet
    assert proc.returncode == 1 and "documents.parquet: not found" in proc.stderr
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("newsgroups-pipeline")
    (failed,) = client.search_runs([experiment.experiment_id], "tags.stage = 'baseline'")
    assert failed.data.tags["stage"] == "baseline"
    assert failed.info.status == "FAILED" and failed.info.end_time >= failed.info.start_time
    parent = client.get_run(failed.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"  # no parent is left RUNNING


def test_git_source_tags(workdir: Path, tmp_path: Path) -> None:
    run(["git", "init", "-q", "-b", "topic"], workdir)
    run(["git", "remote", "add", "origin", "https://example.com/repo.git"], workdir)
    run(["git", "add", "params.yaml"], workdir)
    run(["git", "commit", "-q", "-m", "x"], workdir, {**GIT_ENV, "PATH": "/usr/bin:/bin"})
    commit = run(["git", "rev-parse", "HEAD"], workdir).stdout.strip()
    uri = f"sqlite:///{tmp_path}/git.db"
    proc = run_stage("fetch", workdir, MLFLOW_TRACKING_URI=uri, DVC_EXP_NAME="bushy-tins")
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("newsgroups-pipeline")
    (fetch,) = client.search_runs([experiment.experiment_id], "tags.stage = 'fetch'")
    tags = fetch.data.tags
    assert tags["mlflow.source.git.commit"] == commit
    assert tags["mlflow.source.git.branch"] == "topic"
    assert tags["mlflow.source.git.repoURL"] == "https://example.com/repo.git"
    assert tags["mlflow.source.type"] in ("LOCAL", "JOB") and tags["mlflow.user"]
    assert tags["dvc_exp_name"] == "bushy-tins"
    assert tags["mlflow.runName"] == "fetch (smoke, bushy-tins)"
    parent = client.get_run(tags["mlflow.parentRunId"]).data.tags
    assert parent["mlflow.runName"] == "pipeline (smoke, bushy-tins)"
    assert parent["dvc_exp_name"] == "bushy-tins"
    assert parent["mlflow.source.git.commit"] == commit


@pytest.mark.slow
def test_tracking_never_changes_outputs(workdir: Path, tmp_path: Path) -> None:
    def outputs() -> dict[str, bytes]:
        files = [p for p in sorted(workdir.rglob("*")) if p.is_file()]
        return {str(p.relative_to(workdir)): p.read_bytes() for p in files}

    uri = f"sqlite:///{tmp_path}/on.db"
    assert run_stage("fetch", workdir, MLFLOW_TRACKING_URI=uri).returncode == 0
    with_tracking = outputs()
    params = (workdir / "params.yaml").read_text()
    (workdir / "params.yaml").write_text(params.replace("enabled: true", "enabled: false"))
    proc = run_stage("fetch", workdir, MLFLOW_TRACKING_URI="sqlite:////nonexistent/x.db")
    assert proc.returncode == 0, proc.stderr
    without = outputs()
    with_tracking.pop("params.yaml"), without.pop("params.yaml")
    assert without == with_tracking and "data/raw/documents.parquet" in without


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_fails_before_work(workdir: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    proc = run_stage("fetch", workdir, MLFLOW_TRACKING_URI=uri)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: MLflow tracking store {uri} is unreachable"), last
    assert not (workdir / "data").exists() and not (workdir / "reports").exists()
    assert time.monotonic() - start < 60


@pytest.fixture
def mlflow_server(tmp_path: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{tmp_path}/server.db",
        "--default-artifact-root",
        (tmp_path / "server-artifacts").as_uri(),
    ]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    # its own process group: the uvicorn workers and job runners it starts stop with it
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"{url}/health", server, tmp_path / "server.log")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.mark.slow
def test_stage_logs_to_a_real_tracking_server(workdir: Path, mlflow_server: str) -> None:
    proc = run_stage("fetch", workdir, MLFLOW_TRACKING_URI=mlflow_server)
    assert proc.returncode == 0, proc.stderr
    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = requests.get(
        f"{api}/experiments/get-by-name",
        params={"experiment_name": "newsgroups-pipeline"},
        timeout=10,
    ).json()["experiment"]

    def search(stage: str) -> list[dict]:
        body = {
            "experiment_ids": [experiment["experiment_id"]],
            "filter": f"tags.stage = '{stage}'",
        }
        return requests.post(f"{api}/runs/search", json=body, timeout=10).json()["runs"]

    runs, parents = search("fetch"), search("pipeline")
    assert len(runs) == 1 and len(parents) == 1
    parent_id = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}["mlflow.parentRunId"]
    assert parent_id == parents[0]["info"]["run_id"]
    tags = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}
    params = {p["key"]: p["value"] for p in runs[0]["data"]["params"]}
    assert tags["stage"] == "fetch" and params["report.documents.total"] == "180"
    assert runs[0]["info"]["status"] == "FINISHED"


def read_curve(path: Path) -> list[dict[str, float]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, map(float, line.split(",")), strict=True)) for line in lines[1:]]


@pytest.mark.slow
def test_training_curves_in_mlflow_are_the_dvc_curves(workdir: Path, tmp_path: Path) -> None:
    """The stage's run holds the rows of reports/pretrain/*.csv under pretrain/ names, at
    the same steps with the same values, then the final numbers at the last step."""
    uri = f"sqlite:///{tmp_path}/train.db"
    for stage in ("fetch", "tokenize", "pretrain"):
        proc = run_stage(stage, workdir, MLFLOW_TRACKING_URI=uri)
        assert proc.returncode == 0, proc.stderr
    # quiet logs: none of Lightning's chatter, no model summary, no LeafSpec warning
    for noise in ("GPU available", "Tip:", "Total FLOPs", "LeafSpec", "weights_only"):
        assert noise not in proc.stdout + proc.stderr, noise
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("newsgroups-pipeline")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'pretrain'")
    assert len(runs) == 1
    run = runs[0]
    run_id = run.info.run_id
    assert "system/cpu_utilization_percentage" in run.data.metrics  # MLflow's sampler
    assert {k for k in run.data.metrics if not k.startswith("system/")} == {
        "pretrain/train_loss",
        "pretrain/val_loss",
        "pretrain/val_perplexity",
        "pretrain/train_tokens_per_second",
        "pretrain/train_minutes",
    }
    for key, csv, column in (
        ("pretrain/train_loss", "train.csv", "loss"),
        ("pretrain/val_loss", "validation.csv", "loss"),
    ):
        history = client.get_metric_history(run_id, key)
        latest = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
        rows = read_curve(workdir / "reports/pretrain" / csv)
        assert len(rows) >= 2
        assert sorted(latest) == [int(r["step"]) for r in rows], key
        for row in rows:
            assert latest[int(row["step"])] == pytest.approx(row[column], rel=1e-5), key
        # logged while training ran, inside the run's lifetime, never at time 0
        assert all(run.info.start_time <= m.timestamp <= run.info.end_time for m in history)
    final = client.get_metric_history(run_id, "pretrain/val_perplexity")
    assert [m.step for m in final] == [20]  # pretrain.max_steps of the smoke config
    assert run.data.params["pretrain.max_steps"] == "20"
    assert run.data.params["report.steps"] == "20"
    assert "trainer.progress_bar" not in run.data.params  # display only
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"pretrain.json", "pretrain"}


# ------------------------------------------------------------------------- make ui


def test_ui_url_opens_the_runs_table_filtered_to_pipeline_runs() -> None:
    assert runs_table_url("http://127.0.0.1:5001/", "3") == (
        "http://127.0.0.1:5001/#/experiments/3/runs?workflowType=machine_learning"
        "&searchFilter=tags.stage%20%3D%20%22pipeline%22"
    )
    assert runs_table_url("http://h:1", "3", charts=True).endswith("&compareRunsMode=CHART")
    assert runs_table_url("http://h:1", None) == "http://h:1/#/experiments"


def test_ui_refuses_a_taken_port_in_one_line(workdir: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/ui.db"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run(
            [sys.executable, "-m", "pipeline.tools.ui", "--port", str(port)],
            workdir,
            stage_env(MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(ROOT)),
            check=False,
        )
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stderr.startswith(f"error: port {port} on 127.0.0.1 is taken")
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
        bin_dir = f"BIN={Path(sys.executable).parent}"
        make = run(
            ["make", "-o", ".venv/.installed-stamp", bin_dir, "ui", f"PORT={port}"],
            ROOT,
            stage_env(MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(ROOT)),
            check=False,
        )
        assert make.returncode != 0 and f"error: port {port} on 127.0.0.1 is taken" in make.stderr


@pytest.mark.slow
def test_ui_serves_the_store_and_prints_its_runs_table(workdir: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/ui.db"
    assert run_stage("fetch", workdir, MLFLOW_TRACKING_URI=uri).returncode == 0
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name("newsgroups-pipeline")
    port = free_port()
    log_path = tmp_path / "ui.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.tools.ui", "--port", str(port)],
            cwd=workdir,
            env=stage_env(MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(ROOT)),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # mlflow ui's workers stop with their group
        )
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health", proc, log_path)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    lines = log_path.read_text().splitlines()
    base = f"http://127.0.0.1:{port}"
    assert f"runs: {runs_table_url(base, experiment.experiment_id)}" in lines
    assert f"charts: {runs_table_url(base, experiment.experiment_id, charts=True)}" in lines
