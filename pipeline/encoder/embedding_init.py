"""Spectral (LSA) initialisation of the token embedding from train-only statistics.

A truncated SVD of the train split's documents x tokens TF-IDF matrix (latent semantic
analysis) gives every token a vector that encodes which documents it occurs in: token j
gets ``V_j * S**power``, so a document's LSA vector is the TF-IDF-weighted sum of its
tokens' rows, which the encoder's mean pooling approximates. Why: a short pretraining
barely moves the random rows of rare tokens, and those rows are most of a small
encoder's parameters.

Only the documents passed in (the train split) are read, so nothing leaks from
validation or test. Special tokens (ids below ``N_SPECIAL``) and tokens absent from train
keep their random rows. The TF-IDF is :func:`pipeline.bag.tfidf` (scikit-learn's, as the
``wide`` model uses), the SVD scikit-learn's randomized ``TruncatedSVD`` with a fixed
``random_state``: same inputs and seed, same vectors on one machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from pipeline.bag import count_matrix, tfidf
from pipeline.domain import N_SPECIAL

EmbeddingInit = Literal["none", "lsa"]


def lsa_vectors(
    docs: Sequence[np.ndarray], vocab_size: int, dim: int, *, seed: int, power: float
) -> np.ndarray:
    """Token vectors ``(vocab_size, dim)``: rows of ``V * S**power`` from a rank-``dim``
    truncated SVD of the documents x tokens sublinear TF-IDF matrix."""
    from sklearn.decomposition import TruncatedSVD  # deferred: slow to import, lsa only

    x = tfidf().fit_transform(count_matrix(docs, vocab_size, bigram_buckets=0))
    if min(x.shape) <= dim:
        raise ValueError(
            f"embedding_init=lsa needs more than d_model={dim} train documents and "
            f"vocabulary entries (got {x.shape[0]} x {x.shape[1]})"
        )
    svd = TruncatedSVD(n_components=dim, algorithm="randomized", n_iter=5, random_state=seed)
    svd.fit(x)
    return (svd.components_.T * svd.singular_values_**power).astype(np.float32)


def occurring(docs: Sequence[np.ndarray], vocab_size: int) -> np.ndarray:
    """Boolean mask ``(vocab_size,)`` of content tokens (id >= N_SPECIAL) seen in ``docs``."""
    seen = np.zeros(vocab_size, dtype=bool)
    for tokens in docs:
        seen[np.asarray(tokens, dtype=np.int64)] = True
    seen[:N_SPECIAL] = False
    return seen


@torch.no_grad()
def install_vectors(
    embedding: nn.Embedding, vectors: np.ndarray, rows: np.ndarray, std: float
) -> None:
    """Replace the ``rows`` (boolean mask) of ``embedding`` by ``vectors``, centred per
    dimension (no common direction dominates) and scaled to entry standard deviation
    ``std``, the scale the random rows have; the other rows keep their values."""
    v = vectors[rows].astype(np.float64)
    v -= v.mean(0, keepdims=True)
    v *= std / max(float(v.std()), 1e-12)
    index = torch.from_numpy(np.flatnonzero(rows))
    embedding.weight[index] = torch.from_numpy(v).to(embedding.weight.dtype)


def init_embedding(
    embedding: nn.Embedding,
    docs: Sequence[np.ndarray],
    kind: EmbeddingInit,
    *,
    seed: int,
    std: float = 0.02,
    power: float = 0.5,
) -> None:
    """Initialise ``embedding`` from the token ids of ``docs`` (``kind="none"``: leave it)."""
    if kind == "none":
        return
    vocab_size, dim = embedding.weight.shape
    vectors = lsa_vectors(docs, vocab_size, dim, seed=seed, power=power)
    install_vectors(embedding, vectors, occurring(docs, vocab_size), std)
