"""MLflow tracking with real stores: a SQLite file, and a real `mlflow server`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from pipeline.tracking import (
    TrackingParams,
    flatten,
    numeric_metrics,
    pipeline_run_id,
    project_root,
    resolve_uri,
)
from tests.helpers import archive_overrides, run_stage, wait_for_http, write_params


def test_project_root_sees_through_dvc_temp_experiments(tmp_path: Path) -> None:
    temp_copy = tmp_path / "proj/.dvc/tmp/exps/tmpab12cd"
    assert project_root(temp_copy, {}) == tmp_path / "proj"
    assert project_root(tmp_path, {"DVC_ROOT": str(temp_copy)}) == tmp_path / "proj"
    assert project_root(tmp_path / "proj", {}) == tmp_path / "proj"


def test_uri_precedence(tmp_path: Path) -> None:
    params = TrackingParams(uri="http://tracking.example:5000")
    env = {"MLFLOW_TRACKING_URI": "sqlite:////elsewhere.db"}
    assert resolve_uri(params, env, tmp_path) == "sqlite:////elsewhere.db"
    assert resolve_uri(params, {}, tmp_path) == "http://tracking.example:5000"
    assert resolve_uri(TrackingParams(), {}, tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"


def test_flatten_and_numeric_metrics() -> None:
    report = {"documents": {"train": 3, "test": 2}, "archive": "x", "ok": True, "rate": 0.5}
    assert flatten(report)["documents.train"] == 3
    assert numeric_metrics(report) == {"documents.train": 3.0, "documents.test": 2.0, "rate": 0.5}
    assert pipeline_run_id("c", "p", "") == pipeline_run_id("c", "p", "")
    assert pipeline_run_id("c", "p", "") != pipeline_run_id("c", "p2", "")


@pytest.fixture
def workdir(tmp_path: Path, tiny_archive) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    write_params(work / "params.yaml", "experiment=smoke", *archive_overrides(*tiny_archive))
    return work


def test_stages_log_params_metrics_tags_and_artifacts(workdir: Path, tiny_archive) -> None:
    uri = f"sqlite:///{workdir.parent}/store.db"
    for stage in ("fetch", "tokenize"):
        proc = run_stage(stage, workdir, MLFLOW_TRACKING_URI=uri)
        assert proc.returncode == 0, proc.stderr
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("newsgroups-pipeline")
    runs = {r.data.tags["stage"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"fetch", "tokenize"}
    fetch, tokenize = runs["fetch"], runs["tokenize"]
    assert fetch.data.params["data.validation_fraction"] == "0.1"
    assert fetch.data.params["seed"] == "42"
    assert "tokenizer.vocab_size" not in fetch.data.params  # only its own sections
    assert fetch.data.metrics["documents.test"] == 60
    assert fetch.data.tags["input.archive"] == tiny_archive[1]
    assert tokenize.data.params["tokenizer.vocab_size"] == "800"
    assert tokenize.data.metrics["vocab_size"] <= 800
    assert fetch.data.tags["pipeline_run"] == tokenize.data.tags["pipeline_run"]
    artifacts = {a.path for a in client.list_artifacts(tokenize.info.run_id)}
    assert artifacts == {"tokenize.json", "tokenizer.json"}


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


def test_stage_logs_to_a_real_tracking_server(workdir: Path, mlflow_server: str) -> None:
    proc = run_stage("fetch", workdir, MLFLOW_TRACKING_URI=mlflow_server)
    assert proc.returncode == 0, proc.stderr
    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = requests.get(
        f"{api}/experiments/get-by-name",
        params={"experiment_name": "newsgroups-pipeline"},
        timeout=10,
    ).json()["experiment"]
    runs = requests.post(
        f"{api}/runs/search", json={"experiment_ids": [experiment["experiment_id"]]}, timeout=10
    ).json()["runs"]
    assert len(runs) == 1
    tags = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}
    metrics = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
    assert tags["stage"] == "fetch" and metrics["documents.total"] == 180


def test_training_stage_logs_curves_through_lightning(workdir: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/train.db"
    for stage in ("fetch", "tokenize", "pretrain"):
        proc = run_stage(stage, workdir, MLFLOW_TRACKING_URI=uri)
        assert proc.returncode == 0, proc.stderr
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("newsgroups-pipeline")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'pretrain'")
    assert len(runs) == 1  # the logger's run and the stage's run are one
    run = runs[0]
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(history) >= 2 and len({m.step for m in history}) == len(history)
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) >= 2
    assert run.data.params["pretrain.max_steps"] == "20" and "perplexity" in str(run.data.metrics)
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"pretrain.json", "pretrain"}
