"""The prediction-table contract between model stages and `calibrate` / `evaluate`.

A model stage writes ``data/predictions/<model>/predictions.parquet`` (schema
:class:`pipeline.schemas.Predictions`): ``id``, ``split`` (validation or test), ``label``
and ``logit_0`` .. ``logit_19``, one row for every validation and every test document of
``data/raw/documents.parquet``. Readers check the table against that documents table
(same ids per split, same labels), so predictions made on stale or different data fail
loudly instead of being scored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pipeline import paths
from pipeline.domain import LOGIT_COLUMNS, NAME_PATTERN, PREDICTION_SPLITS, PROB_COLUMNS
from pipeline.errors import PipelineError
from pipeline.io import Outputs, atomic_outputs, write_json
from pipeline.schemas import Predictions, Probabilities, validate

MODEL_NAME = re.compile(NAME_PATTERN)


def predictions_path(model: str) -> Path:
    return paths.predictions_dir(model) / paths.PREDICTIONS_FILE


def write_predictions(out: Outputs, model: str, table: pd.DataFrame) -> Path:
    """Write a model's table inside an :func:`pipeline.io.atomic_outputs` block; returns
    where it will be once the block commits."""
    table.to_parquet(out.dir(paths.predictions_dir(model)) / paths.PREDICTIONS_FILE, index=False)
    return predictions_path(model)


def write_model_outputs(
    model: str,
    table: pd.DataFrame,
    report: dict[str, Any],
    extra: Callable[[Outputs], None] | None = None,
) -> None:
    """A model stage's outputs, all or nothing: what ``extra`` writes into the block (its
    fitted weights), the predictions table and ``reports/<model>.json``."""
    with atomic_outputs() as out:
        if extra is not None:
            extra(out)
        write_predictions(out, model, table)
        write_json(out.file(paths.stage_report(model)), report)


def check_listed_in_dvc_yaml(stage: str, models: Sequence[str], key: str) -> None:
    """Fail when stage ``stage`` of ./dvc.yaml reads a model whose predictions it does not
    list in its deps.

    DVC cannot template a params list into ``deps``, so a model added to ``key`` (for
    example ``dvc exp run -S blend.models=[...]``) but not to dvc.yaml would be read
    without being a dependency, and the stage's outputs would go stale silently when that
    model changes. Outside a DVC project (no ./dvc.yaml, or no such stage) nothing is checked.
    """
    dvc_file = Path("dvc.yaml")
    if not dvc_file.is_file():
        return
    stage_def = (yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}).get("stages", {})
    if stage not in stage_def:
        return
    deps = {str(d) for d in stage_def[stage].get("deps", [])}
    missing = [
        paths.predictions_dir(m).as_posix()
        for m in models
        if paths.predictions_dir(m).as_posix() not in deps
    ]
    if missing:
        raise PipelineError(
            f"dvc.yaml: stage {stage} reads {', '.join(missing)} ({key}) but does not list "
            "it in deps: add it there so DVC reruns the stage when that model changes"
        )


def make_table(ids, splits, labels, logits: np.ndarray) -> pd.DataFrame:
    """Assemble a predictions table in the contract's column order and dtypes."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != len(LOGIT_COLUMNS):
        raise PipelineError(
            f"expected logits of shape (n, {len(LOGIT_COLUMNS)}), got {logits.shape}"
        )
    head = pd.DataFrame(
        {
            "id": pd.Series(list(ids), dtype="str"),
            "split": pd.Series(list(splits), dtype="str"),
            "label": pd.Series(np.asarray(labels), dtype="int64"),
        }
    )
    return pd.concat([head, pd.DataFrame(logits, columns=list(LOGIT_COLUMNS))], axis=1)


def read_documents(
    path: Path = paths.DOCUMENTS, columns: Sequence[str] | None = ("id", "split", "label")
) -> pd.DataFrame:
    """Columns of the documents table (by default no text: it is most of the bytes; None:
    every column)."""
    if not path.is_file():
        raise PipelineError(f"{path}: not found (run `dvc repro fetch` first)")
    return pd.read_parquet(path, columns=None if columns is None else list(columns))


def check_against_documents(pred: pd.DataFrame, docs: pd.DataFrame, where: str) -> None:
    """Every validation and test document predicted exactly once, with its true label."""
    for split in PREDICTION_SPLITS:
        want = docs.loc[docs["split"] == split, ["id", "label"]]
        got = pred.loc[pred["split"] == split, ["id", "label"]]
        missing = sorted(set(want["id"]) - set(got["id"]))
        extra = sorted(set(got["id"]) - set(want["id"]))
        if missing or extra:
            detail = []
            if missing:
                detail.append(f"{len(missing)} {split} document(s) missing, e.g. {missing[0]!r}")
            if extra:
                detail.append(f"{len(extra)} unknown {split} id(s), e.g. {extra[0]!r}")
            raise PipelineError(
                f"{where}: ids do not match {paths.DOCUMENTS}: {'; '.join(detail)} "
                "(predictions made on other data? rerun the model stage)"
            )
        merged = got.merge(want, on="id", suffixes=("", "_true"))
        wrong = merged[merged["label"] != merged["label_true"]]
        if len(wrong):
            first = wrong.iloc[0]
            raise PipelineError(
                f"{where}: {len(wrong)} {split} label(s) differ from {paths.DOCUMENTS}, e.g. "
                f"{first['id']!r} has {first['label']} instead of {first['label_true']}"
            )


def load_predictions(model: str, docs: pd.DataFrame) -> pd.DataFrame:
    """Read, validate and cross-check one model's predictions, sorted by split and id."""
    if not MODEL_NAME.match(model):
        raise PipelineError(f"model name {model!r}: use letters, digits, '_', '-', '.' only")
    path = predictions_path(model)
    if not path.is_file():
        raise PipelineError(
            f"{path}: not found (run the stage that predicts with model '{model}' first, "
            f"e.g. `dvc repro {model}`)"
        )
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise PipelineError(f"{path}: not a readable parquet file ({exc})") from None
    df = validate(df, Predictions, str(path))
    check_against_documents(df, docs, str(path))
    return df.sort_values(["split", "id"], kind="stable").reset_index(drop=True)


def split_arrays(df: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, logits (n, k) float64, labels (n,) int64)`` of one split."""
    part = df[df["split"] == split]
    # Copies: pandas may hand out read-only views, which torch.from_numpy warns about.
    return (
        part["id"].to_numpy(dtype=object, copy=True),
        part[list(LOGIT_COLUMNS)].to_numpy(dtype=np.float64, copy=True),
        part["label"].to_numpy(dtype=np.int64, copy=True),
    )


def validate_probabilities(ids, labels, probs: np.ndarray, where: str) -> None:
    """pandera check of a probability table: values in [0, 1], rows summing to 1."""
    table = pd.concat(
        [
            pd.DataFrame(
                {
                    "id": pd.Series(list(ids), dtype="str"),
                    "label": pd.Series(labels, dtype="int64"),
                }
            ),
            pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=list(PROB_COLUMNS)),
        ],
        axis=1,
    )
    validate(table, Probabilities, where)


def split_scores(table: pd.DataFrame, split: str = "validation") -> dict[str, float]:
    """Accuracy and mean NLL (nats) of one split of a predictions table (softmax of its
    logits): the one place stages compute the validation scores they report."""
    from scipy.special import log_softmax

    part = table[table["split"] == split]
    logits = part[list(LOGIT_COLUMNS)].to_numpy(dtype=np.float64)
    labels = part["label"].to_numpy(dtype=np.int64)
    logp = log_softmax(logits, axis=1)
    return {
        "accuracy": round(float(np.mean(logits.argmax(axis=1) == labels)), 6),
        "nll": round(float(-logp[np.arange(len(labels)), labels].mean()), 6),
    }
