"""Experiments at scale, real parts: a DVC queue sweep logging one MLflow parent run per
experiment, and `promote` refusing a regression and accepting an improvement."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag

from pipeline.errors import PipelineError
from pipeline.tools import promote
from tests.helpers import dvc, ran, run, stage_env

SWEEP = (0.5, 2.0)  # wide.C values: each experiment reruns wide and what reads it
MODELS = ("baseline", "transformer", "wide", "blend")
QUEUE_DEADLINE_S = 600.0


def wait_for_queue(repo: Path, deadline_s: float = QUEUE_DEADLINE_S) -> str:
    """Poll `dvc queue status` until no task is queued or running; returns the status."""
    end = time.monotonic() + deadline_s
    while True:
        status = dvc(repo, "queue", "status")
        if not any(word in status for word in ("Queued", "Running")):
            return status
        assert time.monotonic() < end, f"queue still busy after {deadline_s:.0f} s:\n{status}"
        time.sleep(2)


def experiment_refs(repo: Path) -> dict[str, str]:
    """DVC experiment name -> its git ref (refs/exps/<2 hex>/<baseline rest>/<name>)."""
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout.split()
    parts = [ref.split("/") for ref in refs]
    return {p[-1]: "/".join(p) for p in parts if len(p) == 5 and p[2] not in ("celery", "exec")}


def committed(repo: Path, ref: str, path: str) -> str:
    return run(["git", "show", f"{ref}:{path}"], repo).stdout


@pytest.mark.slow
def test_a_queued_sweep_logs_one_parent_run_per_experiment(smoke, monkeypatch) -> None:
    """The README's sweep: `dvc exp run --queue -S 'wide.C=...'`, `dvc queue start -j 2`."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    repo = smoke.repo
    sets = [f"-S={o}" for o in smoke.overrides]
    values = ",".join(str(c) for c in SWEEP)
    dvc(repo, "exp", "run", "--queue", *sets, f"-S=wide.C={values}")
    dvc(repo, "queue", "start", "-j", "2")
    status = wait_for_queue(repo)
    assert status.count("Success") == len(SWEEP), status
    refs = experiment_refs(repo)
    assert len(refs) == len(SWEEP), refs

    client = MlflowClient()
    experiment = client.get_experiment_by_name("newsgroups-pipeline")
    for name, ref in refs.items():
        query = f"tags.stage = 'pipeline' and tags.dvc_exp_name = '{name}'"
        (parent,) = client.search_runs([experiment.experiment_id], query)
        assert parent.info.status == "FINISHED"
        assert parent.data.params["wide.C"] in {str(c) for c in SWEEP}
        metrics = json.loads(committed(repo, ref, "reports/metrics.json"))
        for model in MODELS:
            for key in ("accuracy", "ece", "nll"):
                logged = parent.data.metrics[f"{model}/test_{key}"]
                assert logged == pytest.approx(metrics[model]["calibrated"][key], abs=1e-12)
        children = client.search_runs(
            [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
        stages = ran(dvc(repo, "queue", "logs", name))
        assert {c.data.tags["stage"] for c in children} == {s.split("@")[0] for s in stages}
        assert "wide" in stages and "fetch" not in stages  # only what wide.C touches
        assert all(c.info.status == "FINISHED" for c in children)
        # the stage's output hashes, as dvc.lock recorded them after it exited
        lock = yaml.safe_load(committed(repo, ref, "dvc.lock"))["stages"]
        (wide_model,) = [o for o in lock["wide"]["outs"] if o["path"] == "data/models/wide"]
        assert parent.data.tags["output.data/models/wide"] == wide_model["md5"]
        # one dataset input per split, with its context
        data = json.loads(committed(repo, ref, "reports/data.json"))["datasets"]
        inputs = {i.dataset.name: i for i in parent.inputs.dataset_inputs}
        assert set(inputs) == {e["name"] for e in data.values()}
        for split, entry in data.items():
            assert inputs[entry["name"]].dataset.digest == entry["digest"]
            assert inputs[entry["name"]].tags[0].value == split
        # system metrics on a training stage and on the parent
        (wide,) = [c for c in children if c.data.tags["stage"] == "wide"]
        assert "system/cpu_utilization_percentage" in wide.data.metrics
        assert "system/system_memory_usage_megabytes" in parent.data.metrics
    # no parent of any execution is left RUNNING
    running = "tags.stage = 'pipeline' and attributes.status = 'RUNNING'"
    assert client.search_runs([experiment.experiment_id], running) == []


def add_version(client: MlflowClient, name: str, base, run_id: str | None = None, **test):
    """A new version of ``name`` made from version ``base``'s model, with test metrics
    changed by ``test`` (e.g. ``accuracy=-0.05``), moved behind ``candidate``."""
    version = client.create_model_version(name, base.source, run_id or base.run_id)
    for key in ("accuracy", "ece", "nll"):
        value = float(base.tags[f"test_{key}"]) + test.get(key, 0.0)
        client.set_model_version_tag(name, version.version, f"test_{key}", f"{value:.4f}")
    client.set_registered_model_alias(name, "candidate", version.version)
    return version


def champion(client: MlflowClient, name: str) -> str:
    return client.get_model_version_by_alias(name, "champion").version


@pytest.mark.slow
def test_promote_refuses_a_regression_and_accepts_an_improvement(smoke) -> None:
    params = smoke.repo / "params.yaml"
    name = json.loads((smoke.repo / "reports/register.json").read_text())["model_name"]
    client = MlflowClient()
    first = client.get_model_version_by_alias(name, "candidate")

    assert promote.main(["--params", str(params)]) == 0  # the first version becomes champion
    assert champion(client, name) == first.version
    assert client.get_model_version(name, first.version).tags["promotion"].startswith("champion")

    worse = add_version(client, name, first, accuracy=-0.05)
    assert promote.main(["--params", str(params)]) == 1
    assert champion(client, name) == first.version
    tag = client.get_model_version(name, worse.version).tags["promotion"]
    assert tag == f"not promoted (refused, gate failed vs v{first.version})"

    better = add_version(client, name, first, accuracy=+0.02, ece=-0.005)
    assert promote.main(["--params", str(params)]) == 0
    assert champion(client, name) == better.version

    # a version whose run read other data is never compared
    run_id = client.create_run(client.get_run(first.run_id).info.experiment_id).info.run_id
    other = Dataset("newsgroups-test", "0" * 36, "local", json.dumps({"uri": "x"}))
    client.log_inputs(run_id, [DatasetInput(other, [InputTag("mlflow.data.context", "test")])])
    add_version(client, name, first, run_id=run_id, accuracy=+0.05)
    with pytest.raises(PipelineError, match="evaluated on different data"):
        promote.main(["--params", str(params)])
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.tools.promote"],
        cwd=smoke.repo,
        env=stage_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: refused:") and "dataset digests differ" in line
    assert champion(client, name) == better.version
