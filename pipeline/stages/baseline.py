"""Stage `baseline`: TF-IDF + logistic regression, the classical model to beat.

Fitted on the train split of ``data/raw/documents.parquet`` only (the vectoriser's
vocabulary and idf too); the validation split is predicted for ``calibrate`` and the test
split for ``evaluate``.

Logits are the multinomial model's decision function ``X @ coef.T + intercept``, whose
softmax is exactly ``predict_proba``, so calibration and evaluation treat this model like
any other.

Outputs: ``data/predictions/baseline/predictions.parquet`` (see
:mod:`pipeline.predictions`) and ``reports/baseline.json`` (vocabulary size, solver
iterations, fit time, validation accuracy).
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from pipeline import paths
from pipeline.config import Section, load_section, load_seed
from pipeline.domain import GROUPS, PREDICTION_SPLITS
from pipeline.errors import PipelineError, run_stage
from pipeline.io import sha256_file
from pipeline.predictions import (
    make_table,
    predictions_path,
    read_documents,
    split_scores,
    write_model_outputs,
)
from pipeline.schemas import Documents, Predictions, validate
from pipeline.tracking import StageRun

if TYPE_CHECKING:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

MODEL = "baseline"


class BaselineParams(Section):
    """Section ``baseline`` of params.yaml: TfidfVectorizer, then LogisticRegression."""

    lowercase: bool = Field(description="Lowercase the text before counting terms.")
    sublinear_tf: bool = Field(description="Use 1 + log(tf) instead of raw term counts.")
    min_df: int = Field(ge=1, description="Ignore terms in fewer than this many train documents.")
    max_df: float = Field(
        gt=0.0, le=1.0, description="Ignore terms in more than this share of train documents."
    )
    ngram_max: int = Field(ge=1, le=3, description="Word n-grams from 1 to ngram_max.")
    max_features: int | None = Field(
        ge=1, description="Keep only the most frequent terms (null: all)."
    )
    C: float = Field(
        gt=0.0, description="Inverse L2 regularisation strength of the logistic regression."
    )
    solver: Literal["lbfgs", "newton-cg", "saga", "sag"] = Field(
        description="scikit-learn LogisticRegression solver."
    )
    max_iter: int = Field(ge=1, description="Solver iterations.")
    tol: float = Field(gt=0.0, description="Solver stopping tolerance.")


def fit(
    texts: list[str], labels: np.ndarray, params: BaselineParams, seed: int
) -> tuple[TfidfVectorizer, LogisticRegression, dict[str, Any]]:
    """Fit the vectoriser and the classifier on train texts.

    Returns:
        The vectoriser, the classifier and fit info (features, iterations, converged).

    Raises:
        PipelineError: TF-IDF leaves no terms (e.g. ``min_df`` above every term's count).
    """
    # scikit-learn loads only to fit: importing the stage for its params stays light
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(
        lowercase=params.lowercase,
        sublinear_tf=params.sublinear_tf,
        min_df=params.min_df,
        max_df=params.max_df,
        ngram_range=(1, params.ngram_max),
        max_features=params.max_features,
        dtype=np.float64,
    )
    try:
        x = vectorizer.fit_transform(texts)
    except ValueError as exc:  # e.g. "After pruning, no terms remain"
        raise PipelineError(f"baseline: TF-IDF on the train split failed: {exc}") from None
    model = LogisticRegression(
        C=params.C,
        solver=params.solver,
        max_iter=params.max_iter,
        tol=params.tol,
        random_state=seed,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, labels)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    info = {
        "features": int(x.shape[1]),
        "iterations": int(np.max(model.n_iter_)),
        "converged": converged,
    }
    return vectorizer, model, info


def logits_for(
    vectorizer: TfidfVectorizer, model: LogisticRegression, texts: list[str]
) -> np.ndarray:
    """Float64 logits (n, K) of ``texts``: the classifier's decision function."""
    z = np.asarray(model.decision_function(vectorizer.transform(texts)), dtype=np.float64)
    return z


def main() -> None:
    params = load_section("baseline", BaselineParams)
    seed = load_seed()
    tracking = StageRun("baseline")
    docs = validate(read_documents(columns=None), Documents, str(paths.DOCUMENTS))
    train = docs[docs["split"] == "train"]
    classes = sorted(set(train["label"]))
    if classes != list(range(len(GROUPS))):
        raise PipelineError(
            f"{paths.DOCUMENTS}: the train split must hold every one of the {len(GROUPS)} classes "
            f"(it has {len(classes)})"
        )
    start = time.perf_counter()
    vectorizer, model, info = fit(train["text"].tolist(), train["label"].to_numpy(), params, seed)
    fit_seconds = time.perf_counter() - start
    if not info["converged"]:
        print(
            f"baseline: warning: {params.solver} did not converge in max_iter={params.max_iter}",
            flush=True,
        )
    parts = []
    for split in PREDICTION_SPLITS:
        part = docs[docs["split"] == split]
        logits = logits_for(vectorizer, model, part["text"].tolist())
        parts.append(make_table(part["id"], part["split"], part["label"], logits))
    table = validate(
        pd.concat(parts, ignore_index=True),
        Predictions,
        str(predictions_path(MODEL)),
    )
    scores = split_scores(table, "validation")
    report = {
        "model": "tfidf+logistic_regression",
        "train_documents": len(train),
        **info,
        "fit_seconds": round(fit_seconds, 1),
        "validation_documents": int((table["split"] == "validation").sum()),
        "validation_accuracy": scores["accuracy"],
        "validation_nll": scores["nll"],
    }
    write_model_outputs(MODEL, table, report)
    print(
        f"baseline: {info['features']} features, {info['iterations']} iterations, "
        f"{fit_seconds:.1f}s; validation accuracy {report['validation_accuracy']:.4f} "
        f"-> {predictions_path(MODEL)}, {paths.stage_report(MODEL)}"
    )
    headline = {"validation_accuracy": "val_accuracy", "validation_nll": "val_nll"}
    tracking.finish_model_stage(
        report, headline, inputs={"documents": sha256_file(paths.DOCUMENTS)}
    )


if __name__ == "__main__":
    run_stage(main)
