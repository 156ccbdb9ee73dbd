"""Error analysis of the test predictions: confident mistakes and model disagreements.

The report lists the test documents one model gets wrong with the highest confidence and
those the models disagree on most, each with its Usenet ``Subject:`` header.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import paths
from pipeline.domain import GROUPS
from pipeline.predictions import read_documents
from pipeline.sources.bydate import subject_of

ERROR_ROWS = 10  # rows of each error-analysis table


def subject_line(text: str) -> str:
    """The post's ``Subject:`` header, stripped ('' when the headers were removed or it has
    none)."""
    return (subject_of(text) or "").strip()


def confident_mistakes(
    ids: Sequence[str], labels: np.ndarray, probs: np.ndarray, k: int = ERROR_ROWS
) -> list[dict[str, Any]]:
    """The ``k`` wrong predictions made with the highest confidence (ties: by id order)."""
    confidence = probs.max(axis=1)
    predicted = probs.argmax(axis=1)
    order = np.argsort(-confidence, kind="stable")
    wrong = [i for i in order if predicted[i] != labels[i]][:k]
    return [
        {
            "id": str(ids[i]),
            "true": GROUPS[labels[i]],
            "predicted": GROUPS[predicted[i]],
            "confidence": float(confidence[i]),
        }
        for i in wrong
    ]


def disagreement(probs_by_model: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per document, the mean total-variation distance between two models' probabilities,
    over every pair of models: 0 when all agree exactly, 1 when no two overlap."""
    stacked = list(probs_by_model.values())
    pairs = list(itertools.combinations(range(len(stacked)), 2))
    if not pairs:
        return np.zeros(len(stacked[0]) if stacked else 0)
    return np.mean([0.5 * np.abs(stacked[a] - stacked[b]).sum(axis=1) for a, b in pairs], axis=0)


def disagreements(
    ids: Sequence[str],
    labels: np.ndarray,
    probs_by_model: Mapping[str, np.ndarray],
    k: int = ERROR_ROWS,
) -> list[dict[str, Any]]:
    """The ``k`` documents the models disagree on most, with each model's answer."""
    score = disagreement(probs_by_model)
    order = np.argsort(-score, kind="stable")[:k]
    return [
        {
            "id": str(ids[i]),
            "true": GROUPS[labels[i]],
            "disagreement": float(score[i]),
            "answers": {
                m: {"predicted": GROUPS[int(p[i].argmax())], "confidence": float(p[i].max())}
                for m, p in probs_by_model.items()
            },
        }
        for i in order
    ]


def read_subjects(ids: set[str], path: Path = paths.DOCUMENTS) -> dict[str, str]:
    """``id -> Subject`` for the documents the error analysis shows."""
    docs = read_documents(path, columns=("id", "text"))
    docs = docs[docs["id"].isin(ids)]
    return {i: subject_line(t) for i, t in zip(docs["id"], docs["text"], strict=True)}


def error_model(metrics: Mapping[str, Any], models: Sequence[str]) -> str:
    """Whose mistakes to list: the served blend, else the most accurate model."""
    if "blend" in models:
        return "blend"
    return max(models, key=lambda m: metrics[m]["calibrated"]["accuracy"])


def analyse_errors(
    ids: Sequence[str],
    labels: np.ndarray,
    probs_by_model: Mapping[str, np.ndarray],
    focus: str,
    path: Path = paths.DOCUMENTS,
) -> dict[str, Any]:
    """The error analysis :func:`pipeline.report.render_errors` renders.

    Args:
        ids: The test documents, in the row order of every model's probabilities.
        labels: Their true classes.
        probs_by_model: Each model's calibrated test probabilities.
        focus: The model whose confident mistakes are listed (:func:`error_model`).
        path: The documents table the Subject lines are read from.

    Returns:
        ``model`` (``focus``), ``mistakes`` (:func:`confident_mistakes`),
        ``disagreements`` (:func:`disagreements`) and ``subjects`` (id -> Subject of
        every document listed).
    """
    errors: dict[str, Any] = {
        "model": focus,
        "mistakes": confident_mistakes(ids, labels, probs_by_model[focus]),
        "disagreements": disagreements(ids, labels, probs_by_model),
    }
    shown = {r["id"] for r in errors["mistakes"]} | {r["id"] for r in errors["disagreements"]}
    errors["subjects"] = read_subjects(shown, path)
    return errors
