"""``make promote``: move the ``champion`` alias to the candidate when it is no worse.

``register`` moves ``candidate`` (``register.alias``) to every new version. This compares
the candidate's test metrics (its version tags ``test_accuracy``, ``test_ece``,
``test_nll``: the calibrated served model) with the champion's through the regression
gate's tolerances (``gate`` in params.yaml, :mod:`pipeline.tools.gate`) and moves
``champion`` only when every check passes; the first version becomes champion. The
decision is recorded as the candidate version's tag ``promotion`` and printed. Versions
whose runs logged different datasets (digests of :mod:`pipeline.mlflow_datasets`) were
evaluated on different data: they are refused in one ``error:`` line, never compared.

    python -m pipeline.tools.promote          # exit 0: promoted (or already champion)
                                              # exit 1: refused
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.config import PARAMS_FILE, load_section, read_params
from pipeline.errors import PipelineError, first_line, run_stage
from pipeline.mlflow_datasets import logged_digests
from pipeline.registry import SERVED, registered_name
from pipeline.tools.gate import GateParams, compare, format_table, verdict
from pipeline.tracking import TrackingParams, resolve_uri

CHAMPION = "champion"
DECISION_TAG = "promotion"
METRICS = ("accuracy", "ece", "nll")


def version_metrics(version: Any) -> dict[str, Any]:
    """A version's test metrics shaped like ``reports/metrics.json`` for the gate."""
    values = {m: float(version.tags[f"test_{m}"]) for m in METRICS if f"test_{m}" in version.tags}
    return {SERVED: {"calibrated": values}}


def alias_version(client: MlflowClient, name: str, alias: str) -> Any | None:
    """The version behind ``alias`` (None when the alias is not set)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def check_same_data(client: MlflowClient, candidate: Any, champion: Any) -> None:
    """Refuse versions whose runs logged different datasets.

    Raises:
        PipelineError: The dataset digests differ (or a version logged none).
    """
    ours = logged_digests(client.get_run(candidate.run_id))
    theirs = logged_digests(client.get_run(champion.run_id))
    if not ours or ours != theirs:
        changed = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        raise PipelineError(
            f"refused: version {candidate.version} and champion version {champion.version} "
            f"were evaluated on different data (dataset digests differ: "
            f"{', '.join(changed) or 'none logged'}); compare them on the same data"
        )


def decide(client: MlflowClient, name: str, candidate: Any, params: GateParams) -> bool:
    """Compare, move the alias if the gate passes, record and print the decision."""
    champion = alias_version(client, name, CHAMPION)
    if champion is not None and champion.version == candidate.version:
        print(f"promote: {name} version {candidate.version} is already {CHAMPION}")
        return True
    if champion is None:
        decision, passed = f"{CHAMPION} (first version of {name})", True
    else:
        check_same_data(client, candidate, champion)
        gate = params.model_copy(update={"models": [SERVED], "variant": "calibrated"})
        checks = compare(version_metrics(champion), version_metrics(candidate), gate)
        print(f"promote: {name} candidate v{candidate.version} vs champion v{champion.version}")
        print(format_table(checks))
        print(verdict(checks))
        passed = all(c.passed for c in checks)
        outcome = "gate passed" if passed else "refused, gate failed"
        decision = f"{CHAMPION if passed else 'not promoted'} ({outcome} vs v{champion.version})"
    if passed:
        client.set_registered_model_alias(name, CHAMPION, candidate.version)
    client.set_model_version_tag(name, candidate.version, DECISION_TAG, decision)
    print(f"promote: {name} version {candidate.version}: {decision}")
    return passed


def main(argv: list[str] | None = None) -> int:
    """Promote the candidate; returns the exit code (0 promoted, 1 refused)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--name", help="registered model (default: the one register uses)")
    args = parser.parse_args(argv)
    config = read_params(args.params)
    tracking = load_section("tracking", TrackingParams, args.params)
    register = config["register"]
    name = args.name or registered_name(
        register["model_name"], register["production"], tracking.config
    )
    uri = resolve_uri(tracking.uri, os.environ, Path.cwd())
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        candidate = alias_version(client, name, register["alias"])
    except MlflowException as exc:
        raise PipelineError(f"MLflow registry {uri}: {first_line(exc)}") from None
    if candidate is None:
        raise PipelineError(
            f"{name}@{register['alias']}: no such version in {uri} (run the register stage)"
        )
    return (
        0 if decide(client, name, candidate, load_section("gate", GateParams, args.params)) else 1
    )


if __name__ == "__main__":
    run_stage(lambda: sys.exit(main()))
