"""MLflow tracking for every stage: params, metrics, reports and tags, one run per stage.

Where runs go, in order: ``MLFLOW_TRACKING_URI``, the ``tracking.uri`` param, or a SQLite
store in the project (``sqlite:///<project>/mlflow.db``, artifacts in
``<project>/mlartifacts``). Runs started by ``dvc exp run --temp`` / ``--queue`` execute in
a copy under ``<project>/.dvc/tmp/exps/``; they still log to the project's store.

Tracking never changes DVC outputs: a stage logs only after its outputs are in place, and
``tracking`` is deliberately not a DVC param of any stage (switching it reruns nothing).
An unreachable tracking server stops the stage before it does any work.

The stages of one pipeline execution share a ``pipeline_run`` tag (git commit, params and
experiment name), so the UI can group them; the ``evaluate`` run also carries every param.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline.config import PARAMS_FILE, Section, load_section, read_params
from pipeline.errors import PipelineError

EXPERIMENT = "newsgroups-pipeline"


class TrackingParams(Section):
    """Section ``tracking`` of params.yaml (read by every stage, a DVC dep of none)."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = Field(default=EXPERIMENT, min_length=1)


def project_root(cwd: Path, env: Mapping[str, str]) -> Path:
    """The user's project folder, also from inside a `dvc exp run --temp/--queue` copy."""
    root = Path(env.get("DVC_ROOT") or cwd).resolve()
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def resolve_uri(params: TrackingParams, env: Mapping[str, str], cwd: Path) -> str:
    """Tracking URI: environment, then param, then the project's SQLite store."""
    if env.get("MLFLOW_TRACKING_URI"):
        return env["MLFLOW_TRACKING_URI"]
    if params.uri:
        return params.uri
    return f"sqlite:///{project_root(cwd, env) / 'mlflow.db'}"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params/metrics as dotted keys, the way the MLflow UI compares them."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def mlflow_key(key: str) -> str:
    """MLflow allows only alphanumerics, ``_ - . : /`` and spaces in names."""
    return re.sub(r"[^\w\-. :/]", "_", key)


def numeric_metrics(data: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a report, flattened (MLflow metrics must be numeric)."""
    return {
        mlflow_key(k): float(v)
        for k, v in flatten(data).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def git_commit(cwd: Path) -> str:
    proc = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=False
    )
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def pipeline_run_id(commit: str, params_text: str, exp_name: str) -> str:
    """Same for every stage of one execution of the pipeline on one commit and config."""
    return hashlib.sha256(f"{commit}\n{exp_name}\n{params_text}".encode()).hexdigest()[:16]


class StageRun:
    """One MLflow run for one stage; a no-op when tracking is disabled."""

    def __init__(self, stage: str, params_path: Path = PARAMS_FILE) -> None:
        self.stage = stage
        self.params = load_section("tracking", TrackingParams, params_path)
        self.enabled = self.params.enabled
        self.params_path = Path(params_path)
        if not self.enabled:
            return
        env = dict(os.environ)
        self.uri = resolve_uri(self.params, env, Path.cwd())
        self.root = project_root(Path.cwd(), env)
        self._client = self._connect()
        self.run_id: str | None = None

    def _connect(self):  # -> MlflowClient
        """Fail now, before any work, when the store cannot be reached."""
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        try:
            experiment = client.get_experiment_by_name(self.params.experiment)
            if experiment is None:
                location = None
                if self.uri.startswith("sqlite:///") and not self.params.uri:
                    location = (self.root / "mlartifacts").as_uri()
                self.experiment_id = client.create_experiment(
                    self.params.experiment, artifact_location=location
                )
            else:
                self.experiment_id = experiment.experiment_id
        except Exception as exc:  # mlflow raises many types for an unreachable store
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PipelineError(
                f"MLflow tracking store {self.uri} is unreachable ({first[:200]}); "
                "start it, point MLFLOW_TRACKING_URI elsewhere, or set tracking.enabled=false"
            ) from None
        return client

    def tags(self, inputs: Mapping[str, str]) -> dict[str, str]:
        commit = git_commit(Path.cwd())
        exp_name = os.environ.get("DVC_EXP_NAME", "")
        params_text = self.params_path.read_text(encoding="utf-8")
        tags = {
            "stage": self.stage,
            "git_commit": commit,
            "pipeline_run": pipeline_run_id(commit, params_text, exp_name),
        }
        if exp_name:
            tags["dvc_exp_name"] = exp_name
        tags.update({f"input.{name}": digest for name, digest in inputs.items()})
        return tags

    def _create_run(self, model: str | None = None, inputs: Mapping[str, str] | None = None):
        exp_name = os.environ.get("DVC_EXP_NAME")
        tags = self.tags(inputs or {}) | ({"model": model} if model else {})
        name = f"{self.stage}/{model}" if model else self.stage
        run = self._client.create_run(
            self.experiment_id, tags=tags, run_name=f"{name} ({exp_name})" if exp_name else name
        )
        return run.info.run_id

    def lightning_logger(self):  # -> MLFlowLogger | None
        """Lightning's MLFlowLogger writing the training curves into this stage's run.

        The run is created now, before training; :meth:`log` completes it. Only the
        launching process (rank 0) tracks: DDP workers started by Lightning get ``None``.
        """
        if not self.enabled or os.environ.get("LOCAL_RANK", "0") != "0":
            return None
        from lightning.pytorch.loggers import MLFlowLogger

        self.run_id = self._create_run()
        return MLFlowLogger(
            experiment_name=self.params.experiment,
            tracking_uri=self.uri,  # its default is file:./mlruns, never the project store
            run_id=self.run_id,
            log_model=False,
        )

    def log(
        self,
        sections: list[str],
        metrics: Mapping[str, Any],
        artifacts: list[Path] = (),  # type: ignore[assignment]
        inputs: Mapping[str, str] | None = None,
        all_params: bool = False,
        model: str | None = None,
    ) -> str | None:
        """Record the finished stage: its params sections, metrics, reports and tags.

        ``model`` names the model a run is about (one evaluate run per model, so the UI's
        runs table has one comparable row per model).
        """
        if not self.enabled:
            return None
        params = read_params(self.params_path)
        logged = params if all_params else {s: params[s] for s in sections if s in params}
        if self.run_id is not None:  # created for the Lightning logger
            run_id = self.run_id
            for key, value in self.tags(inputs or {}).items():
                self._client.set_tag(run_id, key, value)
        else:
            run_id = self._create_run(model, inputs)
        from mlflow.entities import Metric, Param

        flat = [Param(mlflow_key(k), str(v)[:6000]) for k, v in flatten(logged).items()]
        values = [Metric(k, v, 0, 0) for k, v in numeric_metrics(metrics).items()]
        for i in range(0, max(len(flat), len(values), 1), 100):  # the API's batch limit
            self._client.log_batch(run_id, metrics=values[i : i + 100], params=flat[i : i + 100])
        for path in artifacts:
            path = Path(path)
            if path.is_dir():
                self._client.log_artifacts(run_id, str(path), path.name)
            elif path.is_file():
                self._client.log_artifact(run_id, str(path))
        self._client.set_terminated(run_id)
        print(f"{self.stage}: logged MLflow run {run_id} to {self.uri}")
        return run_id
