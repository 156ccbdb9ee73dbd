"""MLflow tracking for every stage: one run per stage (one per model for ``evaluate``),
each the child of one parent run per pipeline execution.

Where runs go, in order: ``MLFLOW_TRACKING_URI``, the ``tracking.uri`` param, or a SQLite
store in the project (``sqlite:///<project>/mlflow.db``, artifacts in
``<project>/mlartifacts``). Runs started by ``dvc exp run --temp`` / ``--queue`` execute in
a copy under ``<project>/.dvc/tmp/exps/``; they still log to the project's store.

What a stage run holds, so the UI tells the truth at a glance:

- It is created when the stage starts (:class:`StageRun`) and completed by
  :meth:`StageRun.finish` when the stage's outputs are in place, so its duration is the
  stage's; a stage that fails ends its open runs as ``FAILED`` (at interpreter exit).
- Metrics are a few headline numbers under stage-prefixed names (``pretrain/val_loss``,
  ``wide/val_accuracy``; ``evaluate/<model>`` runs carry exactly ``test_accuracy``,
  ``test_ece``, ``test_nll`` and a few more ``test_*``), logged with real timestamps at the
  stage's last step. Training curves are the rows of the DVC CSV curves, logged as they
  are made (:meth:`StageRun.curve_logger`). Counts go to params (``report.*``), digests
  to tags (``input.*``), tables to artifacts, the splits of the documents table to
  dataset inputs (:mod:`pipeline.mlflow_datasets`); training stages get system metrics
  (:mod:`pipeline.system_metrics`).
- Tags: ``stage`` (and ``model``), ``config`` (the experiment config), ``dvc_exp_name``
  (in ``dvc exp run``), ``pipeline_run`` (shared by the stages of one execution on one
  commit and config), ``mlflow.parentRunId`` and MLflow's standard source tags
  (``mlflow.source.git.commit``, ``mlflow.source.name``, ``mlflow.user``, ...). Run names
  carry the config and the DVC experiment: ``evaluate/blend (smoke, bushy-tins)``.

The parent run (:mod:`pipeline.parent_run`, tag ``stage=pipeline``) is the row of the
execution: every param of ``params.yaml``, each stage's headline metrics as it finishes
(``<model>/test_accuracy``, ... from ``evaluate``), the datasets, the system metrics of
every stage in turn, and each stage's output hashes as ``output.<path>`` tags
(:mod:`pipeline.output_digests`). Its status follows its children. Run names, tags and
MLflow keys are computed by :mod:`pipeline.run_keys`.

Tracking never changes DVC outputs: a stage logs its results only after its outputs are
in place, and ``tracking`` is not a DVC param of any stage (switching it reruns nothing).
An unreachable tracking server stops the stage before it does any work.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline import paths
from pipeline.config import PARAMS_FILE, Section, load_section, read_params
from pipeline.domain import NAME_PATTERN
from pipeline.errors import PipelineError, first_line
from pipeline.mlflow_datasets import dataset_inputs
from pipeline.output_digests import output_tags
from pipeline.parent_run import (
    DEADLINE_S,
    PARENT_STAGE,
    attach,
    ensure_experiment,
    model_metrics,
    retry,
    settle,
)
from pipeline.run_keys import (
    finite_metrics,
    is_rank_zero,
    mlflow_key,
    now_ms,
    pipeline_run_id,
    project_root,
    resolve_uri,
    run_name,
    scalar_params,
    source_tags,
    split_report,
)
from pipeline.system_metrics import TRAINING_STAGES, Monitors

__all__ = [  # resolve_uri and split_report are re-exported for the stages
    "CurveSink",
    "StageRun",
    "TrackingParams",
    "resolve_uri",
    "split_report",
]

EXPERIMENT = "newsgroups-pipeline"
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
        self.models = list(models)
        if not self.enabled:
            return
        env = dict(os.environ)
        self.uri = resolve_uri(self.params.uri, env, Path.cwd())
        self.root = project_root(Path.cwd(), env)
        self._client = self._connect()
        self._tags = self._stage_tags()
        self.parent_id = attach(
            self._client, self.experiment_id, self._tags["pipeline_run"], *self._parent_start()
        )
        start = now_ms()
        for model in self.models or [None]:
            run = retry(
                lambda model=model: self._client.create_run(
                    self.experiment_id,
                    start_time=start,
                    tags=self.tags()
                    | {"mlflow.parentRunId": self.parent_id}
                    | ({"model": model} if model else {}),
                    run_name=run_name(
                        stage, model, self.params.config, env.get("DVC_EXP_NAME", "")
                    ),
                )
            )
            self.run_ids[model] = run.info.run_id
        own = [self.run_ids[None]] if stage in TRAINING_STAGES else []
        self._monitors = Monitors(self.uri, own, resume=[self.parent_id])
        _OPEN.append(self)

    @property
    def run_id(self) -> str | None:
        """The stage's run (``None`` when tracking is off or runs are per model)."""
        return self.run_ids.get(None)

    def _connect(self):  # -> MlflowClient
        """Fail now, before any work, when the store cannot be reached."""
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        # Deferred: mlflow is slow to import, and a stage with tracking off never needs it.
        from mlflow import MlflowClient  # configures its loggers: quieten them after

        for name in ("mlflow", "alembic"):  # "Creating initial MLflow database tables..."
            logging.getLogger(name).setLevel(logging.WARNING)

        client = MlflowClient(tracking_uri=self.uri)
        location = None
        if self.uri.startswith("sqlite:///") and not self.params.uri:
            location = (self.root / "mlartifacts").as_uri()
        # A busy SQLite store (queue workers) is retried; a server that does not answer
        # fails now.
        deadline = DEADLINE_S if self.uri.startswith("sqlite:") else 0.0
        try:
            self.experiment_id = ensure_experiment(
                client, self.params.experiment, location, deadline
            )
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

    def _parent_start(self) -> tuple[dict[str, str], dict[str, str]]:
        """Tags and params of a new parent run: the execution's tags, every param."""
        exp_name = self._tags.get("dvc_exp_name", "")
        tags = {
            **self._tags,
            "stage": PARENT_STAGE,
            "mlflow.source.name": "dvc.yaml",
            "mlflow.runName": run_name(PARENT_STAGE, None, self.params.config, exp_name),
        }
        return tags, scalar_params(read_params(self.params_path))

    def _report_to_parent(self, metrics: list[Any], model: str | None) -> None:
        """Give the parent this run's headline metrics and datasets and, once the stage's
        last run ends, the hashes of its outputs."""
        from mlflow.entities import Metric, RunTag  # deferred: see curve_logger

        values = model_metrics({m.key: m.value for m in metrics}, model)
        stamp = now_ms()
        batch = [Metric(k, v, stamp, 0) for k, v in values.items()]
        tags = []
        if len(self.run_ids) == 1:
            item = self.models[0] if len(self.models) == 1 else None
            outputs = output_tags(Path.cwd(), self.stage, item)
            tags = [RunTag(k, v) for k, v in outputs.items()]
        if batch or tags:
            retry(lambda: self._client.log_batch(self.parent_id, metrics=batch, tags=tags))
        self._log_datasets(self.parent_id)

    def _log_datasets(self, run_id: str) -> None:
        """Link the splits of the documents table (``reports/data.json``) to a run."""
        report = paths.stage_report("data")
        entries = None
        if report.is_file():
            entries = json.loads(report.read_text(encoding="utf-8")).get("datasets")
        if entries:
            retry(lambda: self._client.log_inputs(run_id, datasets=dataset_inputs(entries)))

    def tags(self, inputs: Mapping[str, str] | None = None) -> dict[str, str]:
        """The tags of every run of this stage (``inputs``: digests of what it read)."""
        digests = {f"input.{name}": digest for name, digest in (inputs or {}).items()}
        return {**self._tags, **digests}

    def curve_logger(self, prefix: str) -> CurveSink | None:
        """A sink for training-curve rows: ``{"train_loss": v}`` at step s is logged as
        ``<prefix>/train_loss`` at step s, timestamped now (None when not tracking)."""
        if not self.enabled or self.run_id is None:
            return None
        # Deferred: mlflow is slow to import, and a stage with tracking off never needs it.
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
        # Deferred: mlflow is slow to import, and a stage with tracking off never needs it.
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
        self._monitors.stop()
        self._log(run_id, tag_list, param_list, values, artifacts)
        self._report_to_parent(values, model)
        retry(lambda: self._client.set_terminated(run_id, "FINISHED"))
        del self.run_ids[model]
        if not self.run_ids and self in _OPEN:
            _OPEN.remove(self)
        settle(self._client, self.experiment_id, self.parent_id)
        print(f"{self.stage}: logged MLflow run {run_id} to {self.uri}")
        return run_id

    def _log(
        self,
        run_id: str,
        tags: list[Any],
        params: list[Any],
        metrics: list[Any],
        artifacts: Sequence[Path],
    ) -> None:
        """Log tags, params, metrics, the datasets and artifacts (files at the root,
        folders under their own name) to a run."""
        if tags:
            retry(lambda: self._client.log_batch(run_id, tags=tags))
        for i in range(0, max(len(params), len(metrics), 1), BATCH):
            retry(
                lambda i=i: self._client.log_batch(
                    run_id, metrics=metrics[i : i + BATCH], params=params[i : i + BATCH]
                )
            )
        self._log_datasets(run_id)
        for path in map(Path, artifacts):
            if path.is_dir():
                self._client.log_artifacts(run_id, str(path), path.name)
            elif path.is_file():
                self._client.log_artifact(run_id, str(path))

    def end(self, status: str = "FAILED") -> None:
        """End every run still open (a failed stage) and settle the parent; never
        raises, it runs at exit."""
        self._monitors.stop()
        for run_id in list(self.run_ids.values()):
            with contextlib.suppress(Exception):  # the store may be what failed
                self._client.set_terminated(run_id, status)
        self.run_ids.clear()
        if self in _OPEN:
            _OPEN.remove(self)
        with contextlib.suppress(Exception):
            settle(self._client, self.experiment_id, self.parent_id)
