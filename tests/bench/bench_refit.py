"""Benchmark: what refitting the wide model on train + validation (``wide.refit``) is worth.

Run after ``dvc repro`` on the default params (``wide.refit=true``). Fits the ``wide``
stage's model again with ``refit=false`` (the LinearSVC of train alone predicts test too)
in memory, without touching the workspace, and compares it with the pipeline's outputs
on the same 7,532 test posts: the wide model, and the blend with the saved weights. The
validation rows, hence the blend's weights and both calibrators, are the same either
way (they come from the model fitted on train), so the calibrated scores use the saved
calibrators. Paired tests: exact McNemar and a bootstrap of the accuracy difference.

    python tests/bench/bench_refit.py     # about 4 minutes on 2 cores

Prints a table and writes ``reports/bench/refit.json``. Not part of the test suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from bench_pretraining import mcnemar_exact, paired_bootstrap  # the sibling script

from pipeline import paths
from pipeline.blending import blended
from pipeline.calibration import Calibrator
from pipeline.config import load_section, load_seed
from pipeline.io import write_json
from pipeline.metrics import accuracy, ece, nll
from pipeline.predictions import load_predictions, read_documents, split_arrays
from pipeline.stages.wide import WideParams, run

OUT = Path("reports/bench/refit.json")


def load_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": round(accuracy(probs, labels), 6),
        "ece": round(ece(probs, labels), 6),
        "nll": round(nll(probs, labels), 6),
    }


def main() -> None:
    params = load_section("wide", WideParams)
    if not params.refit:
        raise SystemExit("params.yaml: wide.refit is false; run this on the default params")
    docs = read_documents()
    test = {m: split_arrays(load_predictions(m, docs), "test") for m in ("wide", "transformer")}
    _, held_table, _ = run(params.model_copy(update={"refit": False}), load_seed())
    ids, held_wide, labels = split_arrays(held_table, "test")
    assert (ids == test["wide"][0]).all() and (labels == test["wide"][2]).all()

    state = load_json(paths.BLEND_FILE)
    weights = dict(zip(state["models"], state["weights"], strict=True))
    calibrators = {
        m: Calibrator.from_dict(load_json(paths.CALIBRATORS / f"{m}.json"))
        for m in ("wide", "blend")
    }

    def blend_of(wide_logits: np.ndarray) -> np.ndarray:
        parts = {"wide": wide_logits, "transformer": test["transformer"][1]}
        return blended(
            [weights[m] for m in state["models"]], np.stack([parts[m] for m in state["models"]])
        )

    logits = {
        ("wide", "refit"): test["wide"][1],
        ("wide", "train"): held_wide,
        ("blend", "refit"): blend_of(test["wide"][1]),
        ("blend", "train"): blend_of(held_wide),
    }
    result: dict = {"command": "python tests/bench/bench_refit.py", "test_documents": len(ids)}
    for model in ("wide", "blend"):
        probs = {
            arm: calibrators[model].predict_proba(logits[model, arm]) for arm in ("refit", "train")
        }
        hits = {arm: p.argmax(1) == labels for arm, p in probs.items()}
        result[model] = {
            "refit_on_train_and_validation": scores(probs["refit"], labels),
            "fitted_on_train": scores(probs["train"], labels),
            "mcnemar_p_value": round(mcnemar_exact(hits["refit"], hits["train"]), 6),
            "paired_bootstrap": paired_bootstrap(hits["refit"], hits["train"], 10000, seed=0),
        }
        refit, train = (
            result[model]["refit_on_train_and_validation"],
            result[model]["fitted_on_train"],
        )
        boot = result[model]["paired_bootstrap"]
        print(
            f"{model}: refit {refit['accuracy']:.4f} vs train only {train['accuracy']:.4f}: "
            f"{boot['difference']:+.4f} [{boot['ci_low']:+.4f}, {boot['ci_high']:+.4f}], "
            f"McNemar p = {result[model]['mcnemar_p_value']:.3g}; ECE {refit['ece']:.4f} vs "
            f"{train['ece']:.4f}, NLL {refit['nll']:.4f} vs {train['nll']:.4f}"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    write_json(OUT, result)
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
