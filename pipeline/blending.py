"""Blend weights: one weight per model over their logits, fitted by NLL and cross-fitted.

A blend's logits are ``sum_m w_m * z_m`` over the models' logits ``z_m`` (shape (M, n, K)
stacked). The weights minimise the NLL of the blend's softmax (L-BFGS, float64). Cross-fitting
gives every row logits from weights fitted on the other folds, so a later fit on those rows
(calibration) never sees rows that chose the weights.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError


def fold_ids(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A seeded fold number per row, stratified by label.

    Rows are dealt round-robin to the folds class by class in a random order, so every fold
    gets its share of each class and fold sizes differ by at most one (also when a class
    has fewer rows than folds).

    Raises:
        PipelineError: Fewer rows than folds.
    """
    if len(labels) < folds:
        raise PipelineError(f"blend: {len(labels)} validation rows cannot fill {folds} folds")
    order = np.random.default_rng(seed).permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    ids = np.empty(len(labels), dtype=np.int64)
    ids[order] = np.arange(len(labels)) % folds
    return ids


def blended(weights: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """``sum_m w_m * parts[m]`` for parts of shape (M, n, K)."""
    return np.einsum("m,mnk->nk", np.asarray(weights, dtype=np.float64), parts)


def fit_weights(parts: np.ndarray, labels: np.ndarray, max_iter: int) -> np.ndarray:
    """The weights (M,) minimising the NLL of ``softmax(sum_m w_m z_m)`` (L-BFGS, float64)."""
    # torch loads only to fit: importing the blend stage for its params section stays light
    import torch
    import torch.nn.functional as F

    from pipeline.calibration.optim import lbfgs

    z = torch.tensor(parts, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.long)
    w = torch.ones(len(parts), dtype=torch.float64, requires_grad=True)
    lbfgs([w], lambda: F.cross_entropy(torch.einsum("m,mnk->nk", w, z), y), max_iter)
    return w.detach().numpy().copy()


def cross_fit(
    parts: np.ndarray, labels: np.ndarray, folds: int, seed: int, max_iter: int
) -> tuple[np.ndarray, list[list[float]]]:
    """Out-of-fold blend logits for every row, and each fold's weights (rounded to 6 places)."""
    fold = fold_ids(labels, folds, seed)
    out = np.empty(parts.shape[1:], dtype=np.float64)
    per_fold = []
    for f in range(folds):
        held = fold == f
        w = fit_weights(parts[:, ~held], labels[~held], max_iter)
        out[held] = blended(w, parts[:, held])
        per_fold.append([round(float(v), 6) for v in w])
    return out, per_fold
