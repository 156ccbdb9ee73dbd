"""Classification and calibration metrics over plain arrays.

Every function takes ``probs`` (n, k): predicted class probabilities, rows summing to 1,
and ``labels`` (n,): integer classes in ``[0, k)``. They are pure (no I/O, no global
state), so the ``evaluate`` stage, the baseline and the tests all score the same way.

Where a well-known library implements a metric we call it (scikit-learn ``log_loss`` and
``f1_score``; torchmetrics ``multiclass_calibration_error`` for ECE and MCE); the rest
(Brier, adaptive ECE, debiased ECE, classwise ECE, reliability bins, risk-coverage) are a
few lines of numpy, checked against independent implementations in ``tests/test_metrics.py``.

Binning convention (Guo et al. 2017, "On Calibration of Modern Neural Networks"): ECE uses
``N_BINS = 15`` equal-width bins over the top-label confidence ``max_j p_ij``; a bin's gap
is ``|accuracy - mean confidence|`` weighted by the fraction of samples in it. Guo et al.
write the bins as ``((m-1)/M, m/M]``; torchmetrics (and :func:`reliability_bins`) use
``[m/M, (m+1)/M)``: the two only differ for confidences lying exactly on a boundary.
torchmetrics also keeps confidences equal to exactly 1.0 (in float32) in a bin of their
own, while :func:`reliability_bins` closes the last bin at 1; this can only make the
torchmetrics ECE slightly larger and only when such saturated predictions exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import f1_score, log_loss

from pipeline.domain import PROB_ATOL

N_BINS = 15
"""Equal-width bins for ECE/MCE/classwise ECE (the Guo et al. 2017 convention)."""

MetricFn = Callable[[np.ndarray, np.ndarray], float]


@contextmanager
def torch_single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block, then restore the previous setting.

    Metric and calibration tensors are tiny (n x k), so extra intra-op threads only add
    synchronisation and slow the fits down.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_inputs(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and ranges and return float64 probs clipped to [0, 1] and int labels.

    Refusing bad input here keeps a silent mistake (logits passed as probabilities, labels
    out of range) from turning into a plausible-looking number; torchmetrics, for example,
    silently applies softmax when any value lies outside [0, 1].
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] < 2:
        raise ValueError(f"probs must have shape (n>0, k>=2), got {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must have shape ({probs.shape[0]},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    k = probs.shape[1]
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must lie in [0, {k}), got [{labels.min()}, {labels.max()}]")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contain NaN or infinite values")
    if probs.min() < -PROB_ATOL or probs.max() > 1 + PROB_ATOL:
        raise ValueError(f"probs must lie in [0, 1], got [{probs.min()}, {probs.max()}]")
    worst = float(np.max(np.abs(probs.sum(axis=1) - 1.0)))
    if worst > PROB_ATOL:
        raise ValueError(f"probs rows must sum to 1 (worst row is off by {worst:.3g})")
    return np.clip(probs, 0.0, 1.0), labels.astype(np.int64)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax (first index on ties) equals the label."""
    probs, labels = check_inputs(probs, labels)
    return float(np.mean(probs.argmax(axis=1) == labels))


def macro_f1(probs: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean F1 over the classes present in labels or predictions (scikit-learn).

    Classes absent from both are left out rather than scored 0, so a small (smoke) test
    split missing a class is not penalised for it.
    """
    probs, labels = check_inputs(probs, labels)
    return float(f1_score(labels, probs.argmax(axis=1), average="macro", zero_division=0))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (scikit-learn ``log_loss``, natural log).

    scikit-learn clips probabilities to [eps, 1 - eps] (float64 eps), so a zero on the true
    class costs ``-log(eps)`` nats instead of infinity.
    """
    probs, labels = check_inputs(probs, labels)
    return float(log_loss(labels, probs, labels=np.arange(probs.shape[1])))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multiclass Brier score: mean over rows of ``sum_j (p_ij - [y_i == j])^2``, in [0, 2].

    This is the original (Brier 1950) multiclass form, equal to the sum over classes of the
    one-vs-rest binary Brier scores; it rewards the whole distribution, not just the argmax.
    """
    probs, labels = check_inputs(probs, labels)
    onehot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def _torchmetrics_ce(probs: np.ndarray, labels: np.ndarray, n_bins: int, norm: str) -> float:
    # imported here: the served model's calibrator imports this module (nll, one torch
    # thread) and must not need torchmetrics, which only evaluation uses
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs, labels = check_inputs(probs, labels)
    value = multiclass_calibration_error(
        torch.from_numpy(probs),
        torch.from_numpy(labels),
        num_classes=probs.shape[1],
        n_bins=n_bins,
        norm=norm,
        validate_args=False,  # check_inputs already did, and kept values inside [0, 1]
    )
    return float(value)


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error: 15 equal-width bins on top-label confidence (Guo et al.).

    ``sum_b |B_b|/n * |acc(B_b) - conf(B_b)|``, computed by torchmetrics
    ``MulticlassCalibrationError(norm="l1", n_bins=15)``; see the module docstring for the
    exact bin edges.
    """
    return _torchmetrics_ce(probs, labels, n_bins, "l1")


def mce(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """Maximum calibration error: the largest ``|acc - conf|`` over non-empty bins (torchmetrics).

    Worst-case gap, useful when some confidence range matters (e.g. auto-accept thresholds);
    it is noisy because a bin with one sample counts as much as a full one.
    """
    return _torchmetrics_ce(probs, labels, n_bins, "max")


def ece_debiased(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """Top-label calibration error with the sampling bias removed (Kumar et al. 2019).

    The plug-in ECE is never 0, even for a perfectly calibrated model: a bin's observed
    accuracy scatters around its true value, and the gap ``|acc - conf|`` turns that noise
    into error, more so the fewer rows a bin holds. Kumar, Liang & Ma ("Verified
    uncertainty calibration") subtract the bin's variance ``acc (1 - acc) / (n_b - 1)``
    from its squared gap, which makes the estimate of the *squared* error unbiased; this
    returns its square root (an L2 error, clipped at 0), over the same 15 equal-width bins
    as :func:`ece`. Bins with fewer than 2 rows count as 0, as in their library.
    """
    probs, labels = check_inputs(probs, labels)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    count, conf, acc = _bin_stats(confidence, correct, n_bins)
    used = count >= 2
    n_b, conf, acc = count[used], conf[used], acc[used]
    squared = np.sum(n_b / len(labels) * ((acc - conf) ** 2 - acc * (1 - acc) / (n_b - 1)))
    return float(np.sqrt(max(squared, 0.0)))


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of a reliability diagram; empty bins have NaN confidence/accuracy."""

    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    def gap_weighted(self) -> float:
        """ECE recomputed from the bins: the count-weighted mean of ``|acc - conf|``."""
        nonempty = self.count > 0
        gaps = np.abs(self.accuracy[nonempty] - self.confidence[nonempty])
        return float(np.sum(self.count[nonempty] * gaps) / np.sum(self.count))


def bin_index(scores: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each score in [0, 1]: ``[m/M, (m+1)/M)``, the last bin closed at 1.

    The one binning rule of the project (ECE, reliability diagrams, histogram binning):
    edges from ``linspace``, so a score equal to an edge such as 0.3 lands in the bin that
    starts there for every M (``int(0.3 * 10)`` would give 2).
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, n_bins - 1)


def _bin_stats(
    scores: np.ndarray, hits: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts, mean score and mean hit rate per equal-width bin (:func:`bin_index`)."""
    idx = bin_index(scores, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=scores, minlength=n_bins) / count
        acc = np.bincount(idx, weights=hits.astype(np.float64), minlength=n_bins) / count
    return count, conf, acc


def reliability_bins(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS
) -> ReliabilityBins:
    """Equal-width bins over top-label confidence, as drawn in a reliability diagram."""
    probs, labels = check_inputs(probs, labels)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    count, conf, acc = _bin_stats(confidence, correct, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return ReliabilityBins(edges[:-1], edges[1:], count, conf, acc)


def adaptive_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE with equal-mass bins: rows sorted by confidence, split into ``n_bins`` equal parts.

    Equal-width bins put almost every prediction of a confident model in the top bin;
    equal-mass bins (Nixon et al. 2019) spend resolution where the data is. Bins differ in
    size by at most one row; tied confidences may straddle a bin edge.
    """
    probs, labels = check_inputs(probs, labels)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    order = np.argsort(confidence, kind="stable")
    total = 0.0
    for chunk in np.array_split(order, min(n_bins, len(order))):
        total += len(chunk) * abs(correct[chunk].mean() - confidence[chunk].mean())
    return float(total / len(order))


def classwise_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """Mean over classes of the one-vs-rest ECE of ``p_ij`` against ``[y_i == j]``.

    Top-label ECE only looks at the winning class; classwise ECE (Kull et al. 2019, "static
    calibration error" in Nixon et al. 2019) also checks the probabilities given to the
    other classes, in 15 equal-width bins per class.
    """
    probs, labels = check_inputs(probs, labels)
    n, k = probs.shape
    per_class = np.empty(k)
    for j in range(k):
        count, conf, acc = _bin_stats(probs[:, j], labels == j, n_bins)
        nonempty = count > 0
        per_class[j] = np.sum(count[nonempty] * np.abs(acc[nonempty] - conf[nonempty])) / n
    return float(per_class.mean())


def risk_coverage(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy when only the most confident fraction of rows is answered.

    Rows are sorted by decreasing top-label confidence (stable on ties); returns
    ``coverage[i] = (i + 1) / n`` and ``accuracy[i]`` over the ``i + 1`` most confident rows,
    so ``accuracy[-1]`` is the plain accuracy.
    """
    probs, labels = check_inputs(probs, labels)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    order = np.argsort(-confidence, kind="stable")
    answered = np.arange(1, len(order) + 1)
    return answered / len(order), np.cumsum(correct[order]) / answered


def aurc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Area under the risk-coverage curve (mean selective risk; lower is better).

    One number for how well confidence ranks errors last (Geifman & El-Yaniv 2017).
    """
    _, acc = risk_coverage(probs, labels)
    return float(np.mean(1.0 - acc))


def bootstrap_ci(
    metric_fn: MetricFn,
    probs: np.ndarray,
    labels: np.ndarray,
    n_boot: int,
    seed: int,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` interval of ``metric_fn`` over resampled rows.

    Rows are drawn with replacement ``n_boot`` times from one seeded generator, so the
    interval is reproducible; it reflects test-set sampling noise, not training noise.
    """
    probs, labels = check_inputs(probs, labels)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    n = len(labels)
    stats = np.empty(n_boot)
    with torch_single_thread():
        for b in range(n_boot):
            idx = rng.integers(0, n, size=n)
            stats[b] = metric_fn(probs[idx], labels[idx])
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def summarize(
    probs: np.ndarray, labels: np.ndarray, n_boot: int, seed: int
) -> dict[str, float | int]:
    """Every scalar metric plus bootstrap 95% intervals for accuracy and ECE, as a flat dict.

    Flat keys (``ece_ci_low`` rather than a nested list) so ``dvc metrics show/diff`` lists
    each number in its own column. ECE is biased upward on small samples, so its interval
    may sit above the point estimate; it still shows how much the test split can vary.
    """
    probs, labels = check_inputs(probs, labels)
    acc_low, acc_high = bootstrap_ci(accuracy, probs, labels, n_boot, seed)
    ece_low, ece_high = bootstrap_ci(ece, probs, labels, n_boot, seed)
    return {
        "n": len(labels),
        "accuracy": accuracy(probs, labels),
        "accuracy_ci_low": acc_low,
        "accuracy_ci_high": acc_high,
        "macro_f1": macro_f1(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "ece": ece(probs, labels),
        "ece_ci_low": ece_low,
        "ece_ci_high": ece_high,
        "ece_debiased": ece_debiased(probs, labels),
        "adaptive_ece": adaptive_ece(probs, labels),
        "mce": mce(probs, labels),
        "classwise_ece": classwise_ece(probs, labels),
        "aurc": aurc(probs, labels),
    }
