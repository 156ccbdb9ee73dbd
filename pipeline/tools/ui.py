"""``make ui``: the MLflow UI on the project's tracking store, opened on the runs table.

MLflow 3.17's UI opens an experiment on its GenAI pages; the classic runs table is
``#/experiments/<id>/runs?workflowType=machine_learning`` and ``searchFilter=``
pre-fills its filter. This prints that URL, filtered to the parent runs (one row per
pipeline execution, with every param and ``<model>/test_accuracy``, ``<model>/test_ece``,
``<model>/test_nll``; its stage runs fold under it), and the same page in chart mode
(``compareRunsMode=CHART``: one bar chart per metric, a bar per execution, no column to
pick: the table shows metric columns only once they are added with *Columns*), then runs
``mlflow ui``. A port that is taken is one ``error:`` line and exit 1 (``mlflow ui``
itself exits 0 there); a tracking server (``MLFLOW_TRACKING_URI=http...``) is not served
again: its URL is printed.

    python -m pipeline.tools.ui --port 5001
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from urllib.parse import quote

from pipeline.config import PARAMS_FILE, load_section
from pipeline.errors import PipelineError, run_stage
from pipeline.parent_run import PARENT_STAGE
from pipeline.tracking import TrackingParams, resolve_uri

RUNS_FILTER = f'tags.stage = "{PARENT_STAGE}"'


def runs_table_url(
    base: str, experiment_id: str | None, search: str = RUNS_FILTER, charts: bool = False
) -> str:
    """The UI's runs table of one experiment, filtered, as a table or as charts (the
    experiments list when there is no experiment yet)."""
    base = base.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments"
    query = f"workflowType=machine_learning&searchFilter={quote(search, safe='')}"
    mode = "&compareRunsMode=CHART" if charts else ""
    return f"{base}/#/experiments/{experiment_id}/runs?{query}{mode}"


def check_port(host: str, port: int) -> None:
    """Refuse a port something already listens on (before starting anything)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PipelineError(
                f"port {port} on {host} is taken ({exc.strerror}): stop what uses it or pick "
                "another, e.g. make ui PORT=5001"
            ) from None


def experiment_id(uri: str, name: str) -> str | None:
    """The experiment's id in the store (None when no stage has logged there yet)."""
    # mlflow loads only when a store is read: a taken port is reported without it
    from mlflow import MlflowClient

    try:
        experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    except Exception as exc:  # mlflow raises many types for a bad store
        raise PipelineError(f"MLflow tracking store {uri}: cannot read it ({exc})") from None
    return experiment.experiment_id if experiment else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    params = load_section("tracking", TrackingParams, PARAMS_FILE)
    uri = resolve_uri(params.uri, os.environ, Path.cwd())
    if uri.startswith(("http://", "https://")):
        exp = experiment_id(uri, params.experiment)
        print(f"runs: {runs_table_url(uri, exp)}")
        print(f"charts: {runs_table_url(uri, exp, charts=True)}")
        print("(a tracking server: nothing to start here)")
        return
    check_port(args.host, args.port)
    exp = experiment_id(uri, params.experiment)
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI on {uri}")
    print(f"runs: {runs_table_url(base, exp)}")
    print(f"charts: {runs_table_url(base, exp, charts=True)}", flush=True)
    # Browsing runs needs no job runner; without one the UI starts much faster (MLflow
    # otherwise starts task-queue consumers beside the web server).
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--workers", "1"]
    os.execv(sys.executable, [*cmd, "--host", args.host, "--port", str(args.port)])


if __name__ == "__main__":
    run_stage(main)
