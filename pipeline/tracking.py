"""MLflow tracking for every stage: one run per stage (one per model for ``evaluate``).

Where runs go, in order: ``MLFLOW_TRACKING_URI``, the ``tracking.uri`` param, or a SQLite
store in the project (``sqlite:///<project>/mlflow.db``, artifacts in
``<project>/mlartifacts``). Runs started by ``dvc exp run --temp`` / ``--queue`` execute in
a copy under ``<project>/.dvc/tmp/exps/``; they still log to the project's store.

What a run holds, so the UI tells the truth at a glance:

- It is created when the stage starts (:class:`StageRun`) and completed by
  :meth:`StageRun.finish` when the stage's outputs are in place, so its duration is the
  stage's; a stage that fails ends its open runs as ``FAILED`` (at interpreter exit).
- Metrics are a few headline numbers under stage-prefixed names (``pretrain/val_loss``,
  ``wide/val_accuracy``; ``evaluate/<model>`` runs carry exactly ``test_accuracy``,
  ``test_ece``, ``test_nll`` and a few more ``test_*``), logged with real timestamps at the
  stage's last step. Training curves are the rows of the DVC CSV curves, logged as they
  are made (:meth:`StageRun.curve_logger`). Counts go to params (``report.*``), digests
  to tags (``input.*``), tables to artifacts.
- Tags: ``stage`` (and ``model``), ``config`` (the experiment config), ``dvc_exp_name``
  (in ``dvc exp run``), ``pipeline_run`` (shared by the stages of one execution on one
  commit and config: the UI's *Group by* groups them), and MLflow's standard source tags
  (``mlflow.source.git.commit``, ``mlflow.source.name``, ``mlflow.user``, ...). Run names
  carry the config and the DVC experiment: ``evaluate/blend (smoke, bushy-tins)``.
  Stage runs are deliberately not nested under a parent run: MLflow 3.17's runs table
  collapses a filtered list of children into their parent's row.

Tracking never changes DVC outputs: a stage logs its results only after its outputs are
in place, and ``tracking`` is not a DVC param of any stage (switching it reruns nothing).
An unreachable tracking server stops the stage before it does any work.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import hashlib
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline import paths
from pipeline.config import PARAMS_FILE, Section, load_section, read_params
from pipeline.domain import NAME_PATTERN
from pipeline.errors import PipelineError, first_line

EXPERIMENT = "newsgroups-pipeline"
PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param's value
BATCH = 100  # log_batch takes at most 1000 metrics and 100 params per call

CurveSink = Callable[[Mapping[str, float], int], None]
"""Receives one curve row: ``{name: value}`` at an optimizer step."""


class TrackingParams(Section):
    """Section ``tracking`` of params.yaml (read by every stage, a DVC dep of none)."""

    enabled: bool = Field(description="Log runs to MLflow.")
    uri: str | None = Field(
        description="Tracking URI (null: $MLFLOW_TRACKING_URI, else the project's SQLite "
        "store mlflow.db)."
    )
    experiment: str = Field(min_length=1, description="MLflow experiment the runs go to.")
    config: str = Field(
        pattern=NAME_PATTERN,
        description="Name of the experiment config params.yaml was composed from: in run "
        "names and the registry name of non-production registrations.",
    )


def project_root(cwd: Path, env: Mapping[str, str]) -> Path:
    """The user's project folder, also from inside a `dvc exp run --temp/--queue` copy."""
    root = Path(env.get("DVC_ROOT") or cwd).resolve()
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def resolve_uri(uri: str | None, env: Mapping[str, str], cwd: Path) -> str:
    """Tracking URI: environment, then ``uri`` (tracking.uri), then the project's SQLite
    store. Takes the URI alone so callers without a params file (predict) can use it."""
    if env.get("MLFLOW_TRACKING_URI"):
        return env["MLFLOW_TRACKING_URI"]
    if uri:
        return uri
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


def scalar_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The scalars of a (nested) mapping as MLflow params; lists and tables are left to
    the artifacts, values are cut to MLflow's limit."""
    return {
        mlflow_key(f"{prefix}{k}"): str(v)[:PARAM_VALUE_LIMIT]
        for k, v in flatten(data).items()
        if not isinstance(v, list | tuple)
    }


def split_report(
    prefix: str,
    report: Mapping[str, Any],
    metrics: Mapping[str, str],
    skip: Sequence[str] = (),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A stage report as (headline metrics named ``<prefix>/<name>``, the other scalars for
    ``report.*`` params). ``metrics`` maps report keys (dotted when nested) to names;
    ``skip`` drops tables such as ``per_class`` (they stay in the report artifact)."""
    flat = flatten(report)
    head = {f"{prefix}/{name}": flat[key] for key, name in metrics.items() if key in flat}

    def kept(key: str) -> bool:
        return key not in metrics and not any(key == s or key.startswith(f"{s}.") for s in skip)

    return head, {k: v for k, v in flat.items() if kept(k)}


def finite_metrics(data: Mapping[str, Any]) -> dict[str, float]:
    """``name -> float`` for the numbers of ``data`` (bools and None are not metrics)."""
    return {
        mlflow_key(k): float(v)
        for k, v in data.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def git_commit(cwd: Path) -> str:
    return _git(cwd, "rev-parse", "HEAD") or "unknown"


def pipeline_run_id(commit: str, params_text: str, exp_name: str) -> str:
    """Same for every stage of one execution of the pipeline on one commit and config."""
    return hashlib.sha256(f"{commit}\n{exp_name}\n{params_text}".encode()).hexdigest()[:16]


def run_name(stage: str, model: str | None, config: str, exp_name: str) -> str:
    """``evaluate/blend (smoke, bushy-tins)``: the stage, the model, the experiment config
    and the DVC experiment, so rows of different runs never read alike."""
    name = f"{stage}/{model}" if model else stage
    label = ", ".join(part for part in (config, exp_name) if part)
    return f"{name} ({label})"


def source_tags(stage: str, cwd: Path, env: Mapping[str, str]) -> dict[str, str]:
    """MLflow's standard source tags (what the fluent API would set), filled explicitly
    because runs are created with the client, in every process the same way."""
    from mlflow.utils.mlflow_tags import (
        MLFLOW_GIT_BRANCH,
        MLFLOW_GIT_COMMIT,
        MLFLOW_GIT_REPO_URL,
        MLFLOW_SOURCE_NAME,
        MLFLOW_SOURCE_TYPE,
        MLFLOW_USER,
    )

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = env.get("USER", "unknown")
    tags = {
        MLFLOW_SOURCE_NAME: f"pipeline/stages/{stage}.py",
        MLFLOW_SOURCE_TYPE: "JOB" if env.get("CI") else "LOCAL",
        MLFLOW_GIT_COMMIT: git_commit(cwd),
        MLFLOW_USER: user,
    }
    branch = _git(cwd, "rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags[MLFLOW_GIT_BRANCH] = branch
    remote = _git(cwd, "remote", "get-url", "origin")
    if remote:
        tags[MLFLOW_GIT_REPO_URL] = remote
    return tags


def is_rank_zero(env: Mapping[str, str]) -> bool:
    """False in the worker processes of a distributed run (only rank 0 tracks)."""
    return env.get("RANK", env.get("LOCAL_RANK", "0")) == "0"


def now_ms() -> int:
    return int(time.time() * 1000)


_OPEN: list[StageRun] = []


@atexit.register
def _fail_open_runs() -> None:
    """A stage that exits without finishing its runs failed: say so in the UI."""
    for stage_run in list(_OPEN):
        stage_run.end("FAILED")


class StageRun:
    """The MLflow run(s) of one stage, opened now; a no-op when tracking is disabled.

    ``models`` opens one run per model (``evaluate``); otherwise the stage has one run.
    """

    def __init__(
        self, stage: str, params_path: Path = PARAMS_FILE, models: Sequence[str] = ()
    ) -> None:
        self.stage = stage
        self.params = load_section("tracking", TrackingParams, params_path)
        self.params_path = Path(params_path)
        self.enabled = self.params.enabled and is_rank_zero(os.environ)
        self.run_ids: dict[str | None, str] = {}
        if not self.enabled:
            return
        env = dict(os.environ)
        self.uri = resolve_uri(self.params.uri, env, Path.cwd())
        self.root = project_root(Path.cwd(), env)
        self._client = self._connect()
        self._tags = self._stage_tags()
        start = now_ms()
        for model in list(models) or [None]:
            run = self._client.create_run(
                self.experiment_id,
                start_time=start,
                tags=self.tags() | ({"model": model} if model else {}),
                run_name=run_name(stage, model, self.params.config, env.get("DVC_EXP_NAME", "")),
            )
            self.run_ids[model] = run.info.run_id
        _OPEN.append(self)

    @property
    def run_id(self) -> str | None:
        """The stage's run (``None`` when tracking is off or runs are per model)."""
        return self.run_ids.get(None)

    def _connect(self):  # -> MlflowClient
        """Fail now, before any work, when the store cannot be reached."""
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow import MlflowClient  # configures its loggers: quieten them after

        for name in ("mlflow", "alembic"):  # "Creating initial MLflow database tables..."
            logging.getLogger(name).setLevel(logging.WARNING)

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
            raise PipelineError(
                f"MLflow tracking store {self.uri} is unreachable ({first_line(exc, 200)}); "
                "start it, point MLFLOW_TRACKING_URI elsewhere, or set tracking.enabled=false"
            ) from None
        return client

    def _stage_tags(self) -> dict[str, str]:
        env = os.environ
        exp_name = env.get("DVC_EXP_NAME", "")
        source = source_tags(self.stage, Path.cwd(), env)
        commit = source["mlflow.source.git.commit"]
        params_text = self.params_path.read_text(encoding="utf-8")
        tags = {
            "stage": self.stage,
            "config": self.params.config,
            "pipeline_run": pipeline_run_id(commit, params_text, exp_name),
            **source,
        }
        if exp_name:
            tags["dvc_exp_name"] = exp_name
        return tags

    def tags(self, inputs: Mapping[str, str] | None = None) -> dict[str, str]:
        """The tags of every run of this stage (``inputs``: digests of what it read)."""
        digests = {f"input.{name}": digest for name, digest in (inputs or {}).items()}
        return {**self._tags, **digests}

    def curve_logger(self, prefix: str) -> CurveSink | None:
        """A sink for training-curve rows: ``{"train_loss": v}`` at step s is logged as
        ``<prefix>/train_loss`` at step s, timestamped now (None when not tracking)."""
        if not self.enabled or self.run_id is None:
            return None
        from mlflow.entities import Metric

        run_id = self.run_id

        def log_row(values: Mapping[str, float], step: int) -> None:
            stamp = now_ms()
            metrics = [
                Metric(mlflow_key(f"{prefix}/{k}"), float(v), stamp, int(step))
                for k, v in values.items()
            ]
            self._client.log_batch(run_id, metrics=metrics)

        return log_row

    def finish_model_stage(
        self,
        report: Mapping[str, Any],
        headline: Mapping[str, str],
        artifacts: Sequence[Path] = (),
        inputs: Mapping[str, str] | None = None,
    ) -> None:
        """End the run of a model stage (``baseline``, ``wide``, ``blend``): its validation
        scores named by ``headline`` (report key -> metric) as metrics, the rest of its
        report as params, with its ``seed`` and own params section, report and artifacts."""
        metrics, stats = split_report(self.stage, report, headline)
        self.finish(
            ["seed", self.stage],
            metrics=metrics,
            report=stats,
            artifacts=[paths.stage_report(self.stage), *artifacts],
            inputs=inputs,
        )

    def finish(
        self,
        sections: Sequence[str] = (),
        *,
        metrics: Mapping[str, Any] | None = None,
        step: int = 0,
        report: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        artifacts: Sequence[Path] = (),
        inputs: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        all_params: bool = False,
        model: str | None = None,
    ) -> str | None:
        """Record the finished stage (or one model's run of it) and end its run.

        ``sections`` of params.yaml (or all of it) become params, flattened; ``metrics``
        are the headline numbers, logged at ``step`` (the last optimizer step of a
        training stage) with the current time; ``report`` holds counts and other scalars,
        logged as ``report.*`` params; ``params`` are further params (already resolved
        sections); ``artifacts`` are files (logged at the root) and folders (logged under
        their own name).
        """
        if not self.enabled:
            return None
        run_id = self.run_ids[model]
        config = read_params(self.params_path)
        logged = config if all_params else {s: config[s] for s in sections if s in config}
        from mlflow.entities import Metric, Param, RunTag

        flat = (
            scalar_params(logged)
            | scalar_params(params or {})
            | scalar_params(report or {}, "report.")
        )
        param_list = [Param(k, v) for k, v in flat.items()]
        stamp = now_ms()
        values = [Metric(k, v, stamp, step) for k, v in finite_metrics(metrics or {}).items()]
        digests = {f"input.{name}": digest for name, digest in (inputs or {}).items()}
        tag_list = [RunTag(k, str(v)) for k, v in {**digests, **(tags or {})}.items()]
        if tag_list:
            self._client.log_batch(run_id, tags=tag_list)
        for i in range(0, max(len(param_list), len(values), 1), BATCH):
            self._client.log_batch(
                run_id, metrics=values[i : i + BATCH], params=param_list[i : i + BATCH]
            )
        for path in map(Path, artifacts):
            if path.is_dir():
                self._client.log_artifacts(run_id, str(path), path.name)
            elif path.is_file():
                self._client.log_artifact(run_id, str(path))
        self._client.set_terminated(run_id, "FINISHED")
        del self.run_ids[model]
        if not self.run_ids and self in _OPEN:
            _OPEN.remove(self)
        print(f"{self.stage}: logged MLflow run {run_id} to {self.uri}")
        return run_id

    def end(self, status: str = "FAILED") -> None:
        """End every run still open (a failed stage); never raises, it runs at exit."""
        for run_id in list(self.run_ids.values()):
            with contextlib.suppress(Exception):  # the store may be what failed
                self._client.set_terminated(run_id, status)
        self.run_ids.clear()
        if self in _OPEN:
            _OPEN.remove(self)
