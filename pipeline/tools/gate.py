"""Regression gate: compare ``reports/metrics.json`` with the committed baseline on ``main``.

CI runs it after ``dvc repro`` and a person can run it the same way (``make gate``)::

    python -m pipeline.tools.gate                              # baseline: main:reports/metrics.json
    python -m pipeline.tools.gate --baseline v1.2              # any git revision
    python -m pipeline.tools.gate --baseline old-metrics.json  # or a file

Tolerances come from the ``gate`` section of params.yaml (not a dependency of any stage, so
changing them reruns nothing). It prints one row per model and metric and exits 1 when
accuracy drops or ECE / NLL rise by more than allowed, when a metric is missing or not a
finite number on either side, or (one ``error:`` line) when a file cannot be read.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipeline import paths
from pipeline.config import PARAMS_FILE, Section, load_section
from pipeline.errors import PipelineError, run_stage

DEFAULT_BASELINE = "main"
# Float noise (e.g. 0.85 - 0.84 = 0.010000000000000009) must not fail a change equal to
# its tolerance.
EPS = 1e-9


class GateParams(Section):
    """Section ``gate`` of params.yaml: what is compared and how much worse is allowed."""

    models: list[str] = Field(
        min_length=1, description="Models of reports/metrics.json the gate checks."
    )
    variant: Literal["calibrated", "uncalibrated"] = Field(
        description="Which metrics of each model are compared."
    )
    max_accuracy_drop: float = Field(
        ge=0.0, description="Largest allowed accuracy drop (a fraction: 0.01 = 1 point)."
    )
    max_ece_rise: float = Field(
        ge=0.0, description="Largest allowed ECE rise (a fraction: 0.01 = 1 point)."
    )
    max_nll_rise: float = Field(ge=0.0, description="Largest allowed NLL rise (nats).")


@dataclass(frozen=True)
class Rule:
    """One gated metric: +1 if higher is better (accuracy), -1 if lower is (ECE, NLL)."""

    metric: str
    direction: int
    tolerance: float


@dataclass(frozen=True)
class Check:
    """The outcome for one model and metric; ``problem`` is None when it passed."""

    model: str
    metric: str
    baseline: float | None
    current: float | None
    tolerance: float
    direction: int
    problem: str | None

    @property
    def passed(self) -> bool:
        return self.problem is None

    @property
    def change(self) -> float | None:
        if self.baseline is None or self.current is None:
            return None
        return self.current - self.baseline


def rules(params: GateParams) -> list[Rule]:
    """The gated metrics in table order."""
    return [
        Rule("accuracy", +1, params.max_accuracy_drop),
        Rule("ece", -1, params.max_ece_rise),
        Rule("nll", -1, params.max_nll_rise),
    ]


def lookup(metrics: dict[str, Any], model: str, variant: str, metric: str) -> float | str:
    """The finite value of one metric, or a string saying why there is none."""
    node: Any = metrics
    for key in (model, variant, metric):
        if not isinstance(node, dict) or key not in node:
            return "missing"
        node = node[key]
    if isinstance(node, bool) or not isinstance(node, int | float):
        return f"not a number ({json.dumps(node)[:30]})"
    if not math.isfinite(node):
        return f"not finite ({node})"
    return float(node)


def compare(baseline: dict[str, Any], current: dict[str, Any], params: GateParams) -> list[Check]:
    """Check every gated metric of every model; pure, so it is tested without files."""
    checks = []
    for model in params.models:
        for rule in rules(params):
            base = lookup(baseline, model, params.variant, rule.metric)
            cur = lookup(current, model, params.variant, rule.metric)
            sides = (("baseline", base), ("current", cur))
            problems = [f"{side} {v}" for side, v in sides if isinstance(v, str)]
            problem = "; ".join(problems) or None
            b = base if isinstance(base, float) else None
            c = cur if isinstance(cur, float) else None
            if b is not None and c is not None:
                worse = (b - c) * rule.direction  # > 0: got worse
                if worse > rule.tolerance + EPS:
                    verb = "dropped" if rule.direction > 0 else "rose"
                    problem = f"{verb} by {worse:.4f} (allowed {rule.tolerance:.4f})"
            checks.append(Check(model, rule.metric, b, c, rule.tolerance, rule.direction, problem))
    return checks


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def rows(checks: list[Check]) -> list[list[str]]:
    """Table cells: the allowed change carries the sign of 'worse' for its metric."""
    header = ["model", "metric", "baseline", "current", "change", "tolerance", "status"]
    body = [
        [
            c.model,
            c.metric,
            _num(c.baseline),
            _num(c.current),
            _num(c.change, signed=True),
            _num(-c.direction * c.tolerance, signed=True),
            "ok" if c.passed else f"FAIL: {c.problem}",
        ]
        for c in checks
    ]
    return [header, *body]


def format_table(checks: list[Check]) -> str:
    """A plain-text table for terminals and CI logs."""
    table = rows(checks)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in table]
    return "\n".join(line.rstrip() for line in lines)


def format_markdown(checks: list[Check]) -> str:
    """The same table in Markdown, for the GitHub job summary."""
    header, *body = rows(checks)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def verdict(checks: list[Check]) -> str:
    failed = [c for c in checks if not c.passed]
    if not failed:
        return f"gate passed: {len(checks)} checks within tolerance"
    names = ", ".join(f"{c.model} {c.metric}" for c in failed)
    return f"gate FAILED: {len(failed)} of {len(checks)} checks ({names})"


def parse_metrics(text: str, name: str) -> dict[str, Any]:
    """Parse a metrics file; malformed content is one error naming the file."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{name}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{name}: expected a JSON object, got {type(data).__name__}")
    return data


def read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found (run `dvc repro` first?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: cannot read ({exc})") from None
    return parse_metrics(text, str(path))


def read_baseline(spec: str) -> tuple[dict[str, Any], str]:
    """A file path if one exists, else a git revision holding the committed metrics file."""
    if Path(spec).is_file():
        return read_file(Path(spec)), spec
    name = spec if ":" in spec else f"{spec}:{paths.METRICS.as_posix()}"
    proc = subprocess.run(["git", "show", name], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["git show failed"])[-1]
        raise PipelineError(
            f"baseline {name}: not a file and not in git ({reason}); "
            "in a shallow CI checkout fetch the branch, e.g. `git fetch origin main:main`"
        )
    return parse_metrics(proc.stdout, name), name


def main(argv: list[str] | None = None) -> int:
    """Compare, print the table, return the exit code (0 passed, 1 failed)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--baseline",
        default=DEFAULT_BASELINE,
        help="metrics file, git revision (its reports/metrics.json) or REV:PATH; default main",
    )
    parser.add_argument("--current", type=Path, default=paths.METRICS)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="tolerances (gate:)")
    parser.add_argument("--summary", type=Path, help="also append a Markdown table to this file")
    args = parser.parse_args(argv)

    params = load_section("gate", GateParams, args.params)
    current = read_file(args.current)
    baseline, baseline_name = read_baseline(args.baseline)
    checks = compare(baseline, current, params)
    title = f"{args.current} vs {baseline_name} ({params.variant})"
    print(f"regression gate: {title}")
    print(format_table(checks))
    print(verdict(checks))
    if args.summary:
        with args.summary.open("a", encoding="utf-8") as out:
            out.write(f"### Regression gate: {title}\n\n{format_markdown(checks)}\n\n")
            out.write(f"**{verdict(checks)}**\n\n")
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    run_stage(lambda: sys.exit(main()))
