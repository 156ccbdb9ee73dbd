"""Stage `wide`: a linear model over BPE tokens, hashed token bigrams, words and char n-grams.

Reads ``data/tokenized`` (the same tokens the transformer sees, whole documents) and the
raw text of ``data/raw/documents.parquet`` (for the words and character n-grams), and fits
:class:`pipeline.wide_model.WideModel` (sublinear TF-IDF per block with the IDF of the
train split, then a one-vs-rest LinearSVC) on the train split, and predicts validation
with it: those held-out rows are what ``blend`` and ``calibrate`` fit on. With
``wide.refit`` the LinearSVC is then refitted on train + validation, and that model
predicts test and is saved (and served), as a model chosen on validation is refitted on
all its data; the features (vocabularies, IDF) stay train's. It memorises rare, telling
tokens and words (senders, organisations, product names) that a small encoder learns
slowly; changing its params never retrains the encoder.

Logits are the SVM's margins, far from calibrated: ``calibrate`` and ``blend`` rescale
them. Outputs: ``data/models/wide/`` (IDF, weights, config, vocabularies; no
pickle), ``data/predictions/wide/predictions.parquet`` (the predictions contract) and
``reports/wide.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import Field

from pipeline import paths
from pipeline.config import Section, load_section, load_seed
from pipeline.domain import GROUPS, PREDICTION_SPLITS
from pipeline.encoder.tokens import load_splits, load_vocab_size
from pipeline.errors import run_stage
from pipeline.predictions import (
    make_table,
    predictions_path,
    read_documents,
    split_scores,
    write_model_outputs,
)
from pipeline.schemas import Predictions, validate
from pipeline.tracking import StageRun
from pipeline.wide_model import WideModel

MODEL = "wide"


class WideParams(Section):
    """Section ``wide`` of params.yaml."""

    C: float = Field(gt=0.0, description="Inverse L2 regularisation strength of the LinearSVC.")
    bigram_buckets: int = Field(
        ge=0,
        le=1 << 26,
        description="Hash buckets for neighbouring-token pairs (0: single tokens only).",
    )
    word_min_df: int | None = Field(
        ge=1,
        description="Adds the bag of words of the raw text: words in at least this many train "
        "posts (null: no word block).",
    )
    char_min_df: int | None = Field(
        ge=1,
        description="Adds character 2- to 5-grams within words of the raw text: those in at "
        "least this many train posts (null: no character block).",
    )
    max_iter: int = Field(ge=1, description="liblinear iterations.")
    refit: bool = Field(
        description="After predicting validation with the model fitted on train, refit the "
        "LinearSVC on train + validation (vocabularies and IDF stay train's): the test rows "
        "and the saved, served model come from the refit."
    )


def read_texts(path: Path = paths.DOCUMENTS) -> dict[str, str]:
    """Each document's raw text by id (the input of the word and character blocks)."""
    docs = read_documents(path, columns=("id", "text"))
    return dict(zip(docs["id"], docs["text"], strict=True))


def refit(
    model: WideModel,
    features: tuple[sp.csr_matrix, sp.csr_matrix],
    labels: tuple[np.ndarray, np.ndarray],
    svm: dict[str, Any],
) -> tuple[WideModel, dict[str, Any]]:
    """Refit the LinearSVC of ``model`` on the rows of train and validation (features fixed).

    Args:
        model: The model fitted on train.
        features: The train and validation feature rows.
        labels: Their labels.
        svm: LinearSVC settings (``C``, ``max_iter``, ``seed``).

    Returns:
        The refitted model, and its fit info under ``refit_*`` keys.
    """
    start = time.perf_counter()
    rows = sp.vstack(list(features), format="csr")
    y = np.concatenate(list(labels))
    model, info = model.fit_classifier(rows, y, len(GROUPS), **svm)
    return model, {
        "refit_documents": rows.shape[0],
        **{f"refit_{k}": v for k, v in info.items()},
        "refit_seconds": round(time.perf_counter() - start, 1),
    }


def run(
    params: WideParams,
    seed: int,
    tokenized: Path = paths.TOKENIZED,
    tokenizer: Path = paths.TOKENIZER,
    documents: Path = paths.DOCUMENTS,
) -> tuple[WideModel, pd.DataFrame, dict[str, Any]]:
    """Fit on train and predict validation; with ``params.refit``, refit the LinearSVC on
    train + validation; predict test with the model kept.

    Returns:
        The model kept, the predictions table and the stage report.
    """
    vocab_size = load_vocab_size(tokenizer)
    splits = load_splits(tokenized, vocab_size, len(GROUPS))
    text = read_texts(documents)

    def inputs(split: str) -> tuple[list, list[str]]:
        return [ex.tokens for ex in splits[split]], [text[i] for i in splits[split].ids]

    train, val = splits["train"], splits["validation"]
    svm = {"C": params.C, "max_iter": params.max_iter, "seed": seed}
    start = time.perf_counter()
    model, x_train, info = WideModel.fit_features(
        *inputs("train"),
        vocab_size=vocab_size,
        bigram_buckets=params.bigram_buckets,
        word_min_df=params.word_min_df,
        char_min_df=params.char_min_df,
    )
    model, svm_info = model.fit_classifier(x_train, train.labels, len(GROUPS), **svm)
    info |= svm_info | {"fit_seconds": round(time.perf_counter() - start, 1)}
    x_val = model.features(*inputs("validation"))
    parts = {"validation": model.score(x_val)}  # held out: what blend and calibrate fit on
    if params.refit:
        model, refit_info = refit(model, (x_train, x_val), (train.labels, val.labels), svm)
        info |= refit_info
    parts["test"] = model.logits(*inputs("test"))
    table = pd.concat(
        [
            make_table(splits[s].ids, [s] * len(splits[s]), splits[s].labels, parts[s])
            for s in PREDICTION_SPLITS
        ],
        ignore_index=True,
    )
    table = validate(table, Predictions, "wide predictions")
    scores = split_scores(table, "validation")
    report = {
        "model": " + ".join(["bag of BPE tokens + hashed bigrams", *model.vocabularies])
        + ", sublinear TF-IDF per block + LinearSVC",
        "train_documents": len(train),
        "refit": params.refit,
        **info,
        "validation_documents": len(val),
        "validation_accuracy": scores["accuracy"],
        "validation_nll": scores["nll"],
    }
    return model, table, report


def main() -> None:
    params = load_section("wide", WideParams)
    seed = load_seed()
    tracking = StageRun("wide")
    model, table, report = run(params, seed)
    for key in ("converged", "refit_converged"):
        if not report.get(key, True):
            print(f"wide: warning: LinearSVC ({key}) not converged in max_iter={params.max_iter}")
    write_model_outputs(MODEL, table, report, lambda out: model.save(out.dir(paths.WIDE)))
    print(
        f"wide: {report['token_features_seen_in_train']} token features seen in train, "
        f"{', '.join(f'{report[b]} {b}' for b in model.vocabularies)}, "
        f"{report['fit_seconds']:.1f}s; validation accuracy {report['validation_accuracy']:.4f}"
        + (f"; refitted on {report['refit_documents']} posts" if params.refit else "")
        + f" -> {paths.WIDE}, {predictions_path(MODEL)}, "
        f"{paths.stage_report(MODEL)}"
    )
    headline = {"validation_accuracy": "val_accuracy", "validation_nll": "val_nll"}
    tracking.finish_model_stage(report, headline)


if __name__ == "__main__":
    run_stage(main)
