"""Plots write real PNGs; the DVC plot rows agree with the metrics they show."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from pipeline import metrics as M
from pipeline import plots as P
from pipeline.domain import GROUPS

CLASS_NAMES = list(GROUPS)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """600 documents, 20 classes: overconfident raw probs, a softened version, labels."""
    rng = np.random.default_rng(0)
    n, k = 600, 20
    labels = rng.integers(0, k, n)
    z = rng.normal(size=(n, k))
    z[np.arange(n), labels] += 2.5
    raw = np.exp(3 * z) / np.exp(3 * z).sum(axis=1, keepdims=True)
    soft = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return raw, soft, labels


def assert_png(path: Path, min_width: int = 300) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    image = imread(path)
    assert image.shape[1] >= min_width
    # not a blank canvas: a real plot inks a fair share of its pixels
    inked = np.mean(image[..., :3].min(axis=-1) < 0.8)
    assert inked > 0.02


def test_png_plots(tmp_path: Path, case: tuple) -> None:
    raw, soft, labels = case
    preds = raw.argmax(axis=1)
    paths = [
        P.reliability_diagram(raw, soft, labels, tmp_path / "rel.png", title="transformer"),
        P.confidence_histogram(raw, soft, labels, tmp_path / "conf.png"),
        P.confusion_matrix_plot(labels, preds, CLASS_NAMES, tmp_path / "sub" / "cm.png"),
        P.per_class_bars(P.per_class_rows(labels, preds, CLASS_NAMES), tmp_path / "pc.png"),
        P.risk_coverage_plot({"raw": raw, "soft": soft}, labels, tmp_path / "rc.png"),
    ]
    for path in paths:
        assert path.parent.is_dir()
        assert_png(path)
    # 20 rotated class names need a large, readable confusion matrix
    assert imread(tmp_path / "sub" / "cm.png").shape[0] >= 1000


def test_reliability_rows_agree_with_ece(case: tuple) -> None:
    raw, _, labels = case
    rows = P.reliability_rows(raw, labels)
    assert sum(r["count"] for r in rows) == len(labels)
    assert all(r["count"] > 0 and r["lower"] < r["upper"] for r in rows)
    ece_from_rows = sum(r["count"] * abs(r["gap"]) for r in rows) / len(labels)
    assert ece_from_rows == pytest.approx(M.ece(raw, labels), abs=1e-5)
    assert json.loads(json.dumps(rows)) == rows


def test_confidence_rows_count_every_document(case: tuple) -> None:
    raw, _, labels = case
    rows = P.confidence_rows(raw, labels, n_bins=10)
    assert len(rows) == 20  # long form: a correct and a wrong row per bin
    assert {(round(r["lower"], 6), r["outcome"]) for r in rows} == {
        (round(i / 10, 6), o) for i in range(10) for o in ("correct", "wrong")
    }
    assert all(r["upper"] - r["lower"] == pytest.approx(0.1) for r in rows)
    assert sum(r["documents"] for r in rows) == len(labels)
    correct = sum(r["documents"] for r in rows if r["outcome"] == "correct")
    assert correct / len(labels) == pytest.approx(M.accuracy(raw, labels))
    confidence = raw.max(axis=1)
    top = [r for r in rows if r["lower"] == pytest.approx(0.9)]
    assert sum(r["documents"] for r in top) == np.sum(confidence >= 0.9)
    assert json.loads(json.dumps(rows)) == rows


def test_risk_coverage_rows_are_thinned_and_end_at_accuracy(case: tuple) -> None:
    raw, _, labels = case
    rows = P.risk_coverage_rows(raw, labels, points=50)
    assert len(rows) == 50
    assert rows[-1]["coverage"] == 1.0
    assert rows[-1]["accuracy"] == pytest.approx(M.accuracy(raw, labels))
    assert rows[0]["coverage"] == pytest.approx(1 / len(labels))
    coverages = [r["coverage"] for r in rows]
    assert coverages == sorted(coverages)
    assert all(r["risk"] == pytest.approx(1 - r["accuracy"]) for r in rows)
    assert json.loads(json.dumps(rows)) == rows


def test_confusion_and_per_class_rows() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2])
    preds = np.array([0, 1, 1, 2, 2, 0])
    names = ["a", "b", "c"]
    rows = P.confusion_rows(labels, preds, names)
    assert rows[1] == {"actual": "a", "predicted": "b"}
    assert len(rows) == 6
    per_class = P.per_class_rows(labels, preds, names)
    # a: predicted for rows 0 and 5, right once -> P=1/2; true rows 0, 1 -> R=1/2
    # b: predicted for rows 1, 2, right once -> P=1/2; true row 2 -> R=1
    # c: predicted for rows 3, 4, both right -> P=1; true rows 3-5 -> R=2/3
    assert [r["class"] for r in per_class] == names
    assert [r["precision"] for r in per_class] == pytest.approx([0.5, 0.5, 1.0])
    assert [r["recall"] for r in per_class] == pytest.approx([0.5, 1.0, 2 / 3])
    assert [r["support"] for r in per_class] == [2, 1, 3]
    assert json.loads(json.dumps(per_class)) == per_class
    with pytest.raises(ValueError, match="3 class names"):
        P.confusion_rows(np.array([0, 3]), np.array([0, 1]), names)
