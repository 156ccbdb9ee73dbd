"""Bag-of-tokens features and their TF-IDF weighting, one implementation for every user.

A document's BPE token ids plus its neighbouring token pairs hashed into
``bigram_buckets`` extra features (:func:`bag_features`), counted into a sparse matrix
(:func:`count_matrix`) and weighted by scikit-learn's
:class:`~sklearn.feature_extraction.text.TfidfTransformer` (:func:`tfidf`: sublinear TF x
smooth IDF, L2-normalised rows). Used by the wide model (:mod:`pipeline.wide_model`, in
the ``wide`` stage and in serving) and by the LSA embedding of ``pretrain``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from sklearn.feature_extraction.text import TfidfTransformer

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads structured keys


def bag_features(tokens: np.ndarray, vocab_size: int, bigram_buckets: int = 0) -> np.ndarray:
    """A document's bag features: its token ids and, with ``bigram_buckets``, each pair of
    neighbouring tokens hashed to ``vocab_size + [0, bigram_buckets)``.

    Hashing keeps the bigram table a fixed size without a bigram vocabulary to build and
    ship.
    """
    ids = np.asarray(tokens).astype(np.int64)
    if not bigram_buckets or len(ids) < 2:
        return ids
    t = ids.astype(np.uint64)
    key = (t[:-1] * np.uint64(vocab_size) + t[1:]) * _GOLDEN  # wraps modulo 2**64
    bigrams = ((key >> np.uint64(24)) % np.uint64(bigram_buckets)).astype(np.int64)
    return np.concatenate((ids, vocab_size + bigrams))


def count_matrix(docs: Sequence[np.ndarray], vocab_size: int, bigram_buckets: int) -> sp.csr_matrix:
    """Bag-feature counts, one row per document (token id sequences), float64 CSR."""
    indptr, indices, values = [0], [], []
    for tokens in docs:
        ids, counts = np.unique(
            bag_features(tokens, vocab_size, bigram_buckets), return_counts=True
        )
        indices.append(ids)
        values.append(counts.astype(np.float64))
        indptr.append(indptr[-1] + len(ids))
    return sp.csr_matrix(
        (
            np.concatenate(values) if values else np.zeros(0),
            np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64),
            np.asarray(indptr),
        ),
        shape=(len(docs), vocab_size + bigram_buckets),
    )


def tfidf(idf: np.ndarray | None = None) -> TfidfTransformer:
    """scikit-learn's sublinear TF-IDF with L2 rows; fitted when ``idf`` is given."""
    # scikit-learn loads on first use: importers of this module start faster
    from sklearn.feature_extraction.text import TfidfTransformer

    transformer = TfidfTransformer(norm="l2", use_idf=True, smooth_idf=True, sublinear_tf=True)
    if idf is not None:
        transformer.idf_ = np.asarray(idf, dtype=np.float64)
    return transformer
