"""Where MLflow runs go, what they are called, and how stage values become MLflow keys.

Pure helpers of :mod:`pipeline.tracking` (no MLflow client, no run state): the tracking
URI and project root (also from inside a ``dvc exp run --temp`` copy), run names, the
``pipeline_run`` id shared by the stages of one execution, MLflow's standard source tags,
and the flattening of nested params and reports into MLflow params and metrics.
"""

from __future__ import annotations

import getpass
import hashlib
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param's value


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
    """The output of ``git <args>`` in ``cwd``, '' when git fails."""
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def git_commit(cwd: Path) -> str:
    """The commit checked out in ``cwd`` (``unknown`` outside a git repository)."""
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
    # Deferred: mlflow is slow to import, and a stage with tracking off never needs it.
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
    """The current time in milliseconds, MLflow's timestamp unit."""
    return int(time.time() * 1000)
