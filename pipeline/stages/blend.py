"""Stage `blend`: combine models' logits with a few weights fitted on validation NLL.

Reads the predictions of the models listed in ``blend.models`` (the predictions contract
of :mod:`pipeline.predictions`; default the encoder and the linear bag model) and fits one
weight per model, ``logits = sum_m w_m * z_m``, by minimising the validation NLL
(:mod:`pipeline.blending`). The models are trained apart and their logits have different
scales (SVM margins, encoder logits), so a convex fit of a handful of weights decides how
much each counts; it never reads test rows to fit.

Validation rows are cross-fitted: the rows of fold f get weights fitted on the other
folds, so ``calibrate`` (which fits on validation) never sees rows that chose the blend's
weights. Test rows use the weights fitted on all of validation, which are the saved ones.

Outputs: ``data/models/blend/blend.json`` (models and weights), ``data/predictions/blend/``
(the predictions contract) and ``reports/blend.json`` (weights, per-fold weights, and the
validation accuracy and NLL of every input and of the blend).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from pipeline import paths
from pipeline.blending import blended, cross_fit, fit_weights
from pipeline.config import Section, load_section, load_seed
from pipeline.errors import run_stage
from pipeline.io import write_json
from pipeline.predictions import (
    MODEL_NAME,
    check_listed_in_dvc_yaml,
    load_predictions,
    make_table,
    predictions_path,
    read_documents,
    split_arrays,
    split_scores,
    write_model_outputs,
)
from pipeline.schemas import Predictions, validate
from pipeline.tracking import StageRun

MODEL = "blend"


class BlendParams(Section):
    """Section ``blend`` of params.yaml."""

    models: list[str] = Field(
        min_length=2,
        description="Models blended: any model stage's (their data/predictions/<model>/ are "
        "all deps of blend); register serves blends of transformer and wide only.",
    )
    folds: int = Field(
        ge=2,
        le=100,
        description="Cross-fitting folds over the validation rows, so calibrate never fits on "
        "rows that chose the weights.",
    )
    max_iter: int = Field(ge=1, description="L-BFGS iterations per fit.")

    @field_validator("models")
    @classmethod
    def _names(cls, models: list[str]) -> list[str]:
        bad = [m for m in models if not MODEL_NAME.match(m) or m == MODEL]
        if bad:
            raise ValueError(f"model names must match {MODEL_NAME.pattern} and not be 'blend'")
        if len(set(models)) != len(models):
            raise ValueError("model names must be unique")
        return models


def run(params: BlendParams, seed: int) -> tuple[dict, pd.DataFrame, dict]:
    """Fit the blend on the models' validation logits and blend validation and test.

    Returns:
        The saved state (models, weights), the predictions table and the stage report.
    """
    docs = read_documents()
    tables = {m: load_predictions(m, docs) for m in params.models}
    arrays = {m: {s: split_arrays(t, s) for s in ("validation", "test")} for m, t in tables.items()}
    first = arrays[params.models[0]]  # rows align: every table matches the documents
    val_ids, _, val_labels = first["validation"]
    test_ids, _, test_labels = first["test"]
    val_parts = np.stack([arrays[m]["validation"][1] for m in params.models])
    test_parts = np.stack([arrays[m]["test"][1] for m in params.models])
    weights = fit_weights(val_parts, val_labels, params.max_iter)
    val_logits, per_fold = cross_fit(val_parts, val_labels, params.folds, seed, params.max_iter)
    table = pd.concat(
        [
            make_table(val_ids, ["validation"] * len(val_ids), val_labels, val_logits),
            make_table(
                test_ids, ["test"] * len(test_ids), test_labels, blended(weights, test_parts)
            ),
        ],
        ignore_index=True,
    )
    table = validate(table, Predictions, str(predictions_path(MODEL)))
    in_sample = make_table(
        val_ids, ["validation"] * len(val_ids), val_labels, blended(weights, val_parts)
    )
    state = {"models": params.models, "weights": [float(w) for w in weights]}
    report = {
        "models": params.models,
        "weights": {m: round(float(w), 6) for m, w in zip(params.models, weights, strict=True)},
        "folds": params.folds,
        "fold_weights": per_fold,
        "validation_documents": len(val_ids),
        "validation": {
            **{m: split_scores(tables[m], "validation") for m in params.models},
            "blend": split_scores(table, "validation"),  # cross-fitted: what calibrate sees
            "blend_in_sample": split_scores(in_sample, "validation"),
        },
    }
    return state, table, report


def main() -> None:
    params = load_section("blend", BlendParams)
    check_listed_in_dvc_yaml("blend", params.models, "blend.models")
    seed = load_seed()
    tracking = StageRun("blend")
    state, table, report = run(params, seed)
    write_model_outputs(
        MODEL,
        table,
        report,
        lambda out: write_json(out.dir(paths.BLEND) / paths.BLEND_FILE.name, state),
    )
    weights = " + ".join(f"{w:.3f} x {m}" for m, w in report["weights"].items())
    scores = report["validation"]["blend"]
    print(
        f"blend: {weights}; cross-fitted validation accuracy {scores['accuracy']:.4f}, "
        f"NLL {scores['nll']:.4f} -> {paths.BLEND / paths.BLEND_FILE.name}, "
        f"{predictions_path(MODEL)}"
    )
    headline = {"validation.blend.accuracy": "val_accuracy", "validation.blend.nll": "val_nll"}
    tracking.finish_model_stage(report, headline, artifacts=[paths.BLEND])


if __name__ == "__main__":
    run_stage(main)
