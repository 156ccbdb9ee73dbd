"""Metric functions against hand-computed cases and independent implementations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import brier_score_loss
from torchmetrics.functional.classification import binary_calibration_error

from pipeline import metrics as M

# Four documents, three classes. Top-label confidences 0.90, 0.92, 0.55, 0.45 (none on a
# 1/15 bin edge). Predictions 0, 0, 1, 2 against labels 0, 1, 1, 0: rows 0 and 2 correct.
HAND_PROBS = np.array(
    [
        [0.90, 0.05, 0.05],
        [0.92, 0.05, 0.03],
        [0.30, 0.55, 0.15],
        [0.25, 0.30, 0.45],
    ]
)
HAND_LABELS = np.array([0, 1, 1, 0])


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sample_labels(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """Draw one label per row from the row's distribution (inverse CDF)."""
    u = rng.random(len(probs))[:, None]
    return np.minimum((u > np.cumsum(probs, axis=1)).sum(axis=1), probs.shape[1] - 1)


def random_case(n: int = 3000, k: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Overconfident synthetic predictions: labels drawn from softmax(z / 2), probs softmax(z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 2.5
    return softmax(z), sample_labels(rng, softmax(z / 2))


def test_hand_accuracy_and_macro_f1() -> None:
    assert M.accuracy(HAND_PROBS, HAND_LABELS) == pytest.approx(0.5)
    # class 0: P=1/2, R=1/2, F1=1/2; class 1: P=1, R=1/2, F1=2/3; class 2: no true rows, one
    # wrong prediction -> F1=0. Macro over the three classes seen: (1/2 + 2/3 + 0) / 3.
    assert M.macro_f1(HAND_PROBS, HAND_LABELS) == pytest.approx((0.5 + 2 / 3) / 3)


def test_hand_nll_and_brier() -> None:
    expected_nll = -(math.log(0.90) + math.log(0.05) + math.log(0.55) + math.log(0.25)) / 4
    assert M.nll(HAND_PROBS, HAND_LABELS) == pytest.approx(expected_nll, rel=1e-12)
    # Per row sum of squared errors against the one-hot label:
    # 0.01+0.0025+0.0025 | 0.8464+0.9025+0.0009 | 0.09+0.2025+0.0225 | 0.5625+0.09+0.2025
    expected_brier = (0.015 + 1.7498 + 0.315 + 0.855) / 4
    assert M.brier(HAND_PROBS, HAND_LABELS) == pytest.approx(expected_brier, rel=1e-12)


def test_hand_ece_mce_and_bins() -> None:
    # 15 bins of width 1/15: 0.90 and 0.92 share bin 13 [0.867, 0.933): accuracy 1/2, mean
    # confidence 0.91, gap 0.41. 0.55 is alone in bin 8 (correct, gap 0.45); 0.45 alone in
    # bin 6 (wrong, gap 0.45). ECE = 2/4 * 0.41 + 1/4 * 0.45 + 1/4 * 0.45 = 0.43; MCE = 0.45.
    assert M.ece(HAND_PROBS, HAND_LABELS) == pytest.approx(0.43, abs=1e-6)
    assert M.mce(HAND_PROBS, HAND_LABELS) == pytest.approx(0.45, abs=1e-6)
    bins = M.reliability_bins(HAND_PROBS, HAND_LABELS)
    assert bins.count.tolist() == [0] * 6 + [1, 0, 1, 0, 0, 0, 0, 2, 0]
    assert bins.confidence[13] == pytest.approx(0.91)
    assert bins.accuracy[[6, 8, 13]].tolist() == [0.0, 1.0, 0.5]
    assert bins.lower[13] == pytest.approx(13 / 15)
    assert bins.upper[13] == pytest.approx(14 / 15)
    assert bins.gap_weighted() == pytest.approx(0.43, abs=1e-12)


def test_hand_debiased_ece() -> None:
    # Ten rows at confidence 0.95 (bin 14), five correct: gap 0.45, plug-in ECE 0.45. The
    # squared gap 0.2025 loses the bin's variance 0.5 * 0.5 / 9: sqrt(0.2025 - 1/36).
    probs = np.tile([0.95, 0.05], (10, 1))
    labels = np.array([0] * 5 + [1] * 5)
    assert M.ece(probs, labels) == pytest.approx(0.45, abs=1e-6)
    assert M.ece_debiased(probs, labels) == pytest.approx(np.sqrt(0.2025 - 1 / 36))
    # HAND_PROBS: the only bin with 2 rows has gap 0.41 and variance 0.25: clipped at 0.
    assert M.ece_debiased(HAND_PROBS, HAND_LABELS) == 0.0


def test_debiased_ece_removes_the_sampling_floor() -> None:
    """Calibrated predictions: the plug-in ECE is all noise, the debiased one near 0."""
    plain, debiased = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        probs = softmax(rng.normal(size=(2000, 20)) * 2)
        labels = sample_labels(rng, probs)  # calibrated by construction
        plain.append(M.ece(probs, labels))
        debiased.append(M.ece_debiased(probs, labels))
    assert np.mean(plain) > 0.02  # the floor at n = 2000
    assert np.mean(debiased) < np.mean(plain) / 2
    assert np.median(debiased) < np.median(plain) / 4


def test_debiased_ece_agrees_with_ece_on_miscalibrated_data() -> None:
    """Every bin 10 points overconfident: both estimate 0.10 (debiasing removes only noise)."""
    rng = np.random.default_rng(11)
    n, k = 5000, 5
    conf = rng.uniform(0.4, 0.95, n)
    top = rng.integers(0, k, n)
    probs = np.repeat(((1 - conf) / (k - 1))[:, None], k, axis=1)
    probs[np.arange(n), top] = conf
    correct = rng.random(n) < conf - 0.10
    labels = np.where(correct, top, (top + rng.integers(1, k, n)) % k)
    assert M.ece(probs, labels) == pytest.approx(0.10, abs=0.015)
    assert M.ece_debiased(probs, labels) == pytest.approx(M.ece(probs, labels), abs=0.01)


def test_hand_adaptive_and_classwise_ece() -> None:
    # Two equal-mass bins over sorted confidences 0.45(wrong) 0.55(right) | 0.90(right)
    # 0.92(wrong): gaps |0.5-0.5| = 0 and |0.5-0.91| = 0.41 -> (2*0 + 2*0.41) / 4 = 0.205.
    assert M.adaptive_ece(HAND_PROBS, HAND_LABELS, n_bins=2) == pytest.approx(0.205)
    # Classwise, 15 bins per class, n=4:
    # class 0 p=[.90 .92 .30 .25] y=[1 0 0 1]: bin13 2*|.5-.91| + |0-.30| + |1-.25| = 1.87
    # class 1 p=[.05 .05 .55 .30] y=[0 1 1 0]: bin0 2*|.5-.05| + |1-.55| + |0-.30| = 1.65
    # class 2 p=[.05 .03 .15 .45] y=[0 0 0 0]: bin0 2*|0-.04| + .15 + .45           = 0.68
    # -> (1.87 + 1.65 + 0.68) / 4 / 3 = 0.35
    assert M.classwise_ece(HAND_PROBS, HAND_LABELS) == pytest.approx(0.35)


def test_hand_risk_coverage() -> None:
    # Most confident first: 0.92 wrong, 0.90 right, 0.55 right, 0.45 wrong.
    coverage, acc = M.risk_coverage(HAND_PROBS, HAND_LABELS)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(acc, [0.0, 0.5, 2 / 3, 0.5])
    assert M.aurc(HAND_PROBS, HAND_LABELS) == pytest.approx((1 + 0.5 + 1 / 3 + 0.5) / 4)


def test_nll_and_brier_match_independent_formulas() -> None:
    probs, labels = random_case()
    direct_nll = -np.mean(np.log(probs[np.arange(len(labels)), labels]))
    assert M.nll(probs, labels) == pytest.approx(direct_nll, rel=1e-9)
    ovr = sum(brier_score_loss(labels == j, probs[:, j]) for j in range(probs.shape[1]))
    assert M.brier(probs, labels) == pytest.approx(ovr, rel=1e-9)


def test_ece_and_mce_match_own_bins() -> None:
    """torchmetrics (float32) and the numpy bins behind the plots give the same numbers."""
    probs, labels = random_case()
    bins = M.reliability_bins(probs, labels)
    assert bins.count.sum() == len(labels)
    assert M.ece(probs, labels) == pytest.approx(bins.gap_weighted(), abs=1e-5)
    nonempty = bins.count > 0
    max_gap = np.max(np.abs(bins.accuracy - bins.confidence)[nonempty])
    assert M.mce(probs, labels) == pytest.approx(max_gap, abs=1e-5)


def test_classwise_ece_matches_torchmetrics_binary() -> None:
    probs, labels = random_case(k=5)
    per_class = [
        float(
            binary_calibration_error(
                torch.from_numpy(np.ascontiguousarray(probs[:, j])),
                torch.from_numpy((labels == j).astype(np.int64)),
            )
        )
        for j in range(5)
    ]
    assert M.classwise_ece(probs, labels) == pytest.approx(np.mean(per_class), abs=1e-5)


def test_adaptive_ece_limits() -> None:
    """One bin: |accuracy - mean confidence|. One row per bin: mean |correct - confidence|."""
    probs, labels = random_case(n=500)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    assert M.adaptive_ece(probs, labels, n_bins=1) == pytest.approx(
        abs(correct.mean() - conf.mean())
    )
    per_row = np.mean(np.abs(correct - conf))
    assert M.adaptive_ece(probs, labels, n_bins=500) == pytest.approx(per_row)


def test_adaptive_ece_sorts_into_equal_mass_bins() -> None:
    # Calibrated labels, so bins are over- and under-confident: the gaps' signs differ and
    # the result depends on which rows share a bin (an all-overconfident case would not).
    rng = np.random.default_rng(2)
    probs = softmax(rng.normal(size=(500, 5)) * 2)
    labels = sample_labels(rng, probs)
    order = np.argsort(probs.max(axis=1))
    conf = probs.max(axis=1)[order].reshape(10, 50)  # 10 bins of exactly 50 rows
    correct = (probs.argmax(axis=1) == labels)[order].reshape(10, 50)
    expected = np.mean(np.abs(correct.mean(axis=1) - conf.mean(axis=1)))
    assert M.adaptive_ece(probs, labels, n_bins=10) == pytest.approx(expected)
    shuffled = np.random.default_rng(1).permutation(500)
    assert M.adaptive_ece(probs[shuffled], labels[shuffled], n_bins=10) == pytest.approx(expected)


def test_ece_separates_calibrated_from_overconfident() -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(size=(20000, 6)) * 2
    probs = softmax(z)
    labels = sample_labels(rng, probs)  # calibrated by construction
    assert M.ece(probs, labels) < 0.02
    sharpened = softmax(3 * z)
    assert M.ece(sharpened, labels) > 0.15
    assert M.nll(sharpened, labels) > M.nll(probs, labels)


def test_risk_coverage_ends_at_accuracy_and_falls_when_ranking_is_perfect() -> None:
    probs, labels = random_case()
    coverage, acc = M.risk_coverage(probs, labels)
    assert coverage[-1] == 1.0
    assert acc[-1] == pytest.approx(M.accuracy(probs, labels))
    # Confidence that ranks every correct row above every wrong one: the curve never rises.
    rng = np.random.default_rng(4)
    n, k = 1000, 4
    correct = rng.random(n) < 0.7
    u = rng.random(n)
    conf = np.where(correct, 0.6 + 0.4 * u, 0.3 + 0.25 * u)  # rest share <= 0.7 / 3 < 0.3
    pred = rng.integers(0, k, n)
    ranked = np.repeat(((1 - conf) / (k - 1))[:, None], k, axis=1)
    ranked[np.arange(n), pred] = conf
    ranked_labels = np.where(correct, pred, (pred + 1) % k)
    _, acc_ranked = M.risk_coverage(ranked, ranked_labels)
    assert np.all(acc_ranked[: correct.sum()] == 1.0)
    assert np.all(np.diff(acc_ranked) <= 1e-12)
    assert acc_ranked[-1] == pytest.approx(correct.mean())


def test_bootstrap_ci_is_seeded_and_about_the_normal_width() -> None:
    probs, labels = random_case(n=2000)
    acc = M.accuracy(probs, labels)
    low, high = M.bootstrap_ci(M.accuracy, probs, labels, n_boot=400, seed=7)
    assert (low, high) == M.bootstrap_ci(M.accuracy, probs, labels, n_boot=400, seed=7)
    assert (low, high) != M.bootstrap_ci(M.accuracy, probs, labels, n_boot=400, seed=8)
    assert low < acc < high
    normal_width = 2 * 1.96 * math.sqrt(acc * (1 - acc) / len(labels))
    assert high - low == pytest.approx(normal_width, rel=0.2)
    narrow = M.bootstrap_ci(M.accuracy, probs, labels, n_boot=400, seed=7, alpha=0.5)
    assert narrow[1] - narrow[0] < (high - low) / 2


def test_summarize_matches_the_functions_and_is_json() -> None:
    probs, labels = random_case(n=1000)
    summary = M.summarize(probs, labels, n_boot=50, seed=0)
    assert summary["n"] == 1000
    for name in (
        "accuracy",
        "macro_f1",
        "nll",
        "brier",
        "ece",
        "mce",
        "adaptive_ece",
        "ece_debiased",
    ):
        assert summary[name] == pytest.approx(getattr(M, name)(probs, labels)), name
    assert summary["classwise_ece"] == pytest.approx(M.classwise_ece(probs, labels))
    assert summary["aurc"] == pytest.approx(M.aurc(probs, labels))
    assert summary["accuracy_ci_low"] < summary["accuracy"] < summary["accuracy_ci_high"]
    assert summary["ece_ci_low"] < summary["ece_ci_high"]
    assert json.loads(json.dumps(summary)) == summary


@pytest.mark.parametrize(
    ("probs", "labels", "message"),
    [
        (np.array([[2.0, -1.0], [0.0, 1.0]]), np.array([0, 1]), "in \\[0, 1\\]"),
        (np.array([[0.5, 0.4], [0.0, 1.0]]), np.array([0, 1]), "sum to 1"),
        (np.array([[0.5, 0.5], [0.0, 1.0]]), np.array([0, 2]), "labels must lie"),
        (np.array([[0.5, 0.5], [0.0, 1.0]]), np.array([0.0, 1.0]), "integers"),
        (np.array([[0.5, np.nan], [0.0, 1.0]]), np.array([0, 1]), "NaN"),
        (np.array([0.5, 0.5]), np.array([0]), "shape"),
    ],
)
def test_bad_inputs_are_refused(probs: np.ndarray, labels: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        M.ece(probs, labels)


def test_torch_single_thread_restores_the_setting() -> None:
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError), M.torch_single_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)
