"""The linear bag model (``wide``): fit, predict, save and load.

One implementation serves the ``wide`` stage and the served model. Up to three blocks of
features, each weighted by the sublinear TF-IDF of :func:`pipeline.bag.tfidf` with the IDF
of the train split:

- ``tokens``: the bag of BPE token ids plus hashed neighbouring pairs
  (:func:`pipeline.bag.count_matrix`), the tokens the encoder reads;
- ``words``: the words of the raw text (scikit-learn's ``CountVectorizer``, lowercased,
  its default token pattern), those of at least ``word_min_df`` train posts. Whole words
  carry what BPE pieces split (names, addresses, rare terms);
- ``chars``: character 2- to 5-grams inside word boundaries (``analyzer="char_wb"``), those
  of at least ``char_min_df`` train posts: spelling variants, inflections, code and
  numbers that neither tokens nor words share.

The L2-normalised blocks are joined and normalised again (each counts the same), then
scored by a one-vs-rest ``LinearSVC`` (squared hinge, L2). The saved model is plain arrays
(safetensors) and JSON (config, vocabularies), never a pickle: :meth:`WideModel.load`
rebuilds every weighting from the stored IDF, so serving computes exactly the features
the stage computed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from safetensors.numpy import load_file, save_file

from pipeline.bag import count_matrix, tfidf
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from sklearn.feature_extraction.text import CountVectorizer

WEIGHTS_FILE = "wide.safetensors"
CONFIG_FILE = "config.json"
VOCABULARIES_FILE = "vocabularies.json"
TEXT_BLOCKS = {  # block -> CountVectorizer analyzer settings, the same at fit and serving
    "words": {"analyzer": "word", "ngram_range": (1, 1)},
    "chars": {"analyzer": "char_wb", "ngram_range": (2, 5)},
}


def _vectorizer(
    block: str, min_df: int = 1, vocabulary: Sequence[str] | None = None
) -> CountVectorizer:
    """The one analyzer of a text block (a CountVectorizer; lowercased raw text)."""
    # scikit-learn loads on first use: importing the wide stage for its params stays light
    from sklearn.feature_extraction.text import CountVectorizer

    return CountVectorizer(
        lowercase=True,
        min_df=min_df,
        vocabulary=list(vocabulary) if vocabulary is not None else None,
        dtype=np.float64,
        **TEXT_BLOCKS[block],
    )


def _join(blocks: list[sp.csr_matrix]) -> sp.csr_matrix:
    """Side by side, rows L2-normalised again so each block weighs the same."""
    # scikit-learn loads on first use: importing the wide stage for its params stays light
    from sklearn.preprocessing import normalize

    if len(blocks) == 1:
        return blocks[0]
    return normalize(sp.hstack(blocks, format="csr"))


@dataclass(frozen=True, eq=False)
class WideModel:
    """A fitted bag model: ``logits = features(tokens, texts) @ coef.T + intercept``."""

    vocab_size: int
    bigram_buckets: int
    vocabularies: dict[str, tuple[str, ...]]  # text block -> its columns in order
    idf: np.ndarray  # (F,) float64: the token block's, then each text block's
    coef: np.ndarray  # (K, F) float32: half the size on disk, no measurable change
    intercept: np.ndarray  # (K,) float64

    @classmethod
    def fit_features(
        cls,
        docs: Sequence[np.ndarray],
        texts: Sequence[str],
        *,
        vocab_size: int,
        bigram_buckets: int,
        word_min_df: int | None,
        char_min_df: int | None,
    ) -> tuple[WideModel, sp.csr_matrix, dict[str, object]]:
        """The vocabularies and IDFs of these documents (token ids and their raw text, in the
        same order; a text block whose ``min_df`` is ``None`` is left out) and their feature
        rows, kept so the classifier can be fitted (and refitted with more rows) without
        computing them again. The model scores no class yet: :meth:`fit_classifier` gives it
        its LinearSVC. Returns (model, feature rows, fit info)."""
        counts = [count_matrix(docs, vocab_size, bigram_buckets)]
        vocabularies: dict[str, tuple[str, ...]] = {}
        for block, min_df in (("words", word_min_df), ("chars", char_min_df)):
            if min_df is not None:
                vectorizer = _vectorizer(block, min_df=min_df)
                counts.append(vectorizer.fit_transform(texts).tocsr())
                vocabularies[block] = tuple(vectorizer.get_feature_names_out())
        weightings = [tfidf().fit(c) for c in counts]
        features = _join([w.transform(c) for w, c in zip(weightings, counts, strict=True)])
        n_features = int(features.shape[1])
        model = cls(
            vocab_size,
            bigram_buckets,
            vocabularies,
            np.concatenate([w.idf_ for w in weightings]).astype(np.float64),
            np.zeros((0, n_features), dtype=np.float32),
            np.zeros(0, dtype=np.float64),
        )
        info = {
            "features": n_features,
            "token_features_seen_in_train": int((counts[0].getnnz(axis=0) > 0).sum()),
            **{block: len(v) for block, v in vocabularies.items()},
        }
        return model, features, info

    def fit_classifier(
        self,
        features: sp.csr_matrix,
        labels: np.ndarray,
        n_classes: int,
        *,
        C: float,
        max_iter: int,
        seed: int,
    ) -> tuple[WideModel, dict[str, object]]:
        """This model's features with a one-vs-rest LinearSVC fitted on ``features`` (rows
        of :meth:`features`, one per label). Returns (new model, fit info)."""
        # scikit-learn loads on first use: importing the wide stage for its params stays light
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.svm import LinearSVC

        present = np.unique(labels)
        if len(present) != n_classes:
            raise PipelineError(
                f"wide: the documents fitted have {len(present)} of the {n_classes} classes; "
                "a linear model needs every class"
            )
        svm = LinearSVC(C=C, max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            svm.fit(features, labels)
        model = dataclasses.replace(
            self, coef=svm.coef_.astype(np.float32), intercept=svm.intercept_.astype(np.float64)
        )
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        return model, {"iterations": int(np.max(svm.n_iter_)), "converged": converged}

    @functools.cached_property
    def _weightings(self) -> list[tuple[Any, Any]]:
        """(vectorizer or None for the token block, TF-IDF) per block, built once: indexing a
        large n-gram vocabulary is slow, so it is not redone per call."""
        n_tokens = self.vocab_size + self.bigram_buckets
        found = [(None, tfidf(self.idf[:n_tokens]))]
        start = n_tokens
        for block, vocabulary in self.vocabularies.items():
            vectorizer = _vectorizer(block, vocabulary=vocabulary)
            found.append((vectorizer, tfidf(self.idf[start : start + len(vocabulary)])))
            start += len(vocabulary)
        return found

    def features(self, docs: Sequence[np.ndarray], texts: Sequence[str]) -> sp.csr_matrix:
        """The TF-IDF rows the linear model scores (token ids and raw text per document)."""
        blocks = []
        for vectorizer, weighting in self._weightings:
            if vectorizer is None:
                counts = count_matrix(docs, self.vocab_size, self.bigram_buckets)
            else:
                counts = vectorizer.transform(texts).tocsr()
            blocks.append(weighting.transform(counts))
        return _join(blocks)

    def logits(self, docs: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
        """(n, K) float64 decision values (margins)."""
        return self.score(self.features(docs, texts))

    def score(self, features: sp.csr_matrix) -> np.ndarray:
        """(n, K) float64 decision values of feature rows from :meth:`features`."""
        return np.asarray(features @ self.coef.T.astype(np.float64)) + self.intercept

    def save(self, directory: Path) -> None:
        """Write the weights (safetensors), config and vocabularies (JSON) to ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {"idf": self.idf, "coef": self.coef, "intercept": self.intercept}
        # C order: safetensors writes the raw buffer, and liblinear's coef_ is Fortran-ordered
        save_file(
            {k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(directory / WEIGHTS_FILE)
        )
        config = {
            "architecture": "WideModel",
            "vocab_size": self.vocab_size,
            "bigram_buckets": self.bigram_buckets,
            "vocabularies": {block: len(v) for block, v in self.vocabularies.items()},
            "n_classes": int(self.coef.shape[0]),
            "weighting": "per block sklearn TfidfTransformer(sublinear_tf=True, smooth_idf=True, "
            "norm=l2), blocks joined and L2-normalised",
            "text_blocks": {
                b: f"sklearn CountVectorizer(lowercase=True, {s})"
                for b, s in TEXT_BLOCKS.items()
                if b in self.vocabularies
            },
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", "utf-8")
        vocabularies = {block: list(v) for block, v in self.vocabularies.items()}
        (directory / VOCABULARIES_FILE).write_text(json.dumps(vocabularies) + "\n", "utf-8")

    @classmethod
    def load(cls, directory: Path) -> WideModel:
        """The model :meth:`save` wrote to ``directory``.

        Raises:
            PipelineError: The folder is missing, incomplete or not a wide model.
        """
        try:
            config = json.loads((directory / CONFIG_FILE).read_text("utf-8"))
            stored = json.loads((directory / VOCABULARIES_FILE).read_text("utf-8"))
            arrays = load_file(str(directory / WEIGHTS_FILE))
        except FileNotFoundError as exc:
            raise PipelineError(
                f"{directory}: {Path(exc.filename).name} not found (run the wide stage)"
            ) from None
        vocabularies = {block: tuple(v) for block, v in stored.items()}
        sizes = {block: len(v) for block, v in vocabularies.items()}
        if sizes != config["vocabularies"] or not set(sizes) <= set(TEXT_BLOCKS):
            raise PipelineError(
                f"{directory}: {VOCABULARIES_FILE} holds {sizes}, config.json says "
                f"{config['vocabularies']}"
            )
        n_features = config["vocab_size"] + config["bigram_buckets"] + sum(sizes.values())
        shapes = {"idf": (n_features,), "coef": (config["n_classes"], n_features)}
        for key, shape in shapes.items():
            if arrays[key].shape != shape:
                raise PipelineError(
                    f"{directory}: {key} has shape {arrays[key].shape}, not {shape}"
                )
        return cls(
            config["vocab_size"],
            config["bigram_buckets"],
            vocabularies,
            arrays["idf"],
            arrays["coef"],
            arrays["intercept"],
        )
