"""The parent MLflow run of one pipeline execution, shared by its stage runs.

One parent per ``pipeline_run`` key (commit, DVC experiment, ``params.yaml``): the first
stage of an execution creates it with every param of ``params.yaml``; a stage that reruns
alone finds it by the key. Its status follows its children: the latest run of each stage
(and model) decides, FAILED if one failed, RUNNING while one runs, FINISHED otherwise.

Queue workers (``dvc queue start -j 2``) write one SQLite store at once: experiment
creation races (two workers both see none and both create) and writes can find the
database locked. Every store call here is retried on any error until a deadline, with a
growing, jittered pause; two stages that create the same parent at once both keep the
oldest (start time, then run id) and delete their own.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pipeline.run_keys import now_ms

T = TypeVar("T")

PARENT_STAGE = "pipeline"  # the `stage` tag of parent runs (child runs carry their stage)
DEADLINE_S = 120.0  # how long a store call is retried before its error is raised
PAUSE_S = (0.05, 2.0)  # first and longest pause between tries
BATCH = 100  # log_batch takes at most 100 params per call


def retry(call: Callable[[], T], deadline_s: float = DEADLINE_S) -> T:
    """``call()``, tried again on any error until ``deadline_s`` has passed.

    Raises:
        Exception: The last error, once the deadline has passed.
    """
    end = time.monotonic() + deadline_s
    pause = PAUSE_S[0]
    while True:
        try:
            return call()
        except Exception:  # mlflow and SQLAlchemy raise many types for a busy store
            if time.monotonic() + pause > end:
                raise
        time.sleep(pause * random.uniform(0.5, 1.5))
        pause = min(pause * 2, PAUSE_S[1])


def ensure_experiment(
    client: Any, name: str, artifact_location: str | None, deadline_s: float = DEADLINE_S
) -> str:
    """The id of experiment ``name``, created if missing (by this process or a rival);
    store errors are retried for ``deadline_s`` seconds."""

    def get_or_create() -> str:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        return client.create_experiment(name, artifact_location=artifact_location)

    return retry(get_or_create, deadline_s)


def _parents(client: Any, experiment: str, key: str) -> list[Any]:
    """The live parent runs of ``key``, oldest first (start time, then run id)."""
    query = f"tags.stage = '{PARENT_STAGE}' and tags.pipeline_run = '{key}'"
    runs = retry(lambda: client.search_runs([experiment], query, max_results=100))
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def attach(
    client: Any,
    experiment: str,
    key: str,
    tags: Mapping[str, str],
    params: Mapping[str, str],
) -> str:
    """The parent run of ``key``: found, or created with ``tags`` and ``params``.

    Args:
        client: An ``MlflowClient``.
        experiment: The experiment's id.
        key: The ``pipeline_run`` key.
        tags: Tags of a new parent (``mlflow.runName`` names it; ``stage`` and
            ``pipeline_run`` are how it is found).
        params: Params of a new parent (every param of ``params.yaml``, flattened).

    Returns:
        The parent's run id, set RUNNING (a stage of it starts now).
    """
    found = _parents(client, experiment, key)
    if found:
        parent = found[0].info.run_id
        retry(lambda: client.update_run(parent, status="RUNNING"))
        return parent
    # Deferred: mlflow is slow to import, and a stage with tracking off never needs it.
    from mlflow.entities import Param

    run = retry(lambda: client.create_run(experiment, start_time=now_ms(), tags=dict(tags)))
    mine = run.info.run_id
    param_list = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(param_list), BATCH):
        retry(lambda i=i: client.log_batch(mine, params=param_list[i : i + BATCH]))
    winner = _parents(client, experiment, key)[0].info.run_id
    if winner != mine:  # a rival created the same parent first: keep one
        retry(lambda: client.delete_run(mine))
        retry(lambda: client.update_run(winner, status="RUNNING"))
    return winner


def children_status(client: Any, experiment: str, parent: str) -> str:
    """FAILED if the latest run of a stage (and model) failed, else RUNNING while one runs,
    else FINISHED."""
    query = f"tags.`mlflow.parentRunId` = '{parent}'"
    runs = retry(lambda: client.search_runs([experiment], query, max_results=1000))
    latest: dict[tuple[str, str], str] = {}
    for run in sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id)):
        tags = run.data.tags
        latest[(tags.get("stage", ""), tags.get("model", ""))] = run.info.status
    statuses = set(latest.values())
    if statuses & {"FAILED", "KILLED"}:
        return "FAILED"
    return "RUNNING" if "RUNNING" in statuses else "FINISHED"


def settle(client: Any, experiment: str, parent: str) -> str:
    """Set the parent's status from its children's (a child has just ended); returns it."""
    status = children_status(client, experiment, parent)
    if status == "RUNNING":
        retry(lambda: client.update_run(parent, status="RUNNING"))
    else:
        retry(lambda: client.set_terminated(parent, status, end_time=now_ms()))
    return status


def model_metrics(metrics: Mapping[str, float], model: str | None) -> dict[str, float]:
    """A stage's headline metrics as the parent logs them: a model run's unprefixed
    names under the model (``test_accuracy`` of ``blend``: ``blend/test_accuracy``),
    stage-prefixed names (``wide/val_accuracy``) as they are."""
    return {(f"{model}/{k}" if model and "/" not in k else k): v for k, v in metrics.items()}
