"""The linear bag-of-tokens model (``wide``): fit, predict, save and load.

One implementation serves the ``wide`` stage and the served model: the bag features and
TF-IDF of :mod:`pipeline.bag` (the IDF learnt on the train split), scored by a
one-vs-rest ``LinearSVC`` (squared hinge, L2). The saved model is plain arrays
(safetensors + JSON), never a pickle: :meth:`WideModel.load` rebuilds the transformer
from the stored IDF, so serving computes exactly the features the stage computed.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from pipeline.bag import count_matrix, tfidf
from pipeline.errors import PipelineError

WEIGHTS_FILE = "wide.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class WideModel:
    """A fitted bag model: ``logits = tfidf(counts) @ coef.T + intercept``."""

    vocab_size: int
    bigram_buckets: int
    idf: np.ndarray  # (F,) float64, F = vocab_size + bigram_buckets
    coef: np.ndarray  # (K, F) float32: half the size on disk, no measurable change
    intercept: np.ndarray  # (K,) float64

    @classmethod
    def fit(
        cls,
        docs: Sequence[np.ndarray],
        labels: np.ndarray,
        n_classes: int,
        *,
        vocab_size: int,
        bigram_buckets: int,
        C: float,
        max_iter: int,
        seed: int,
    ) -> tuple[WideModel, dict[str, object]]:
        """Fit the IDF and the LinearSVC on the train documents; (model, fit info)."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.svm import LinearSVC

        present = np.unique(labels)
        if len(present) != n_classes:
            raise PipelineError(
                f"wide: the train split has {len(present)} of the {n_classes} classes; "
                "a linear model needs every class"
            )
        counts = count_matrix(docs, vocab_size, bigram_buckets)
        transformer = tfidf().fit(counts)
        svm = LinearSVC(C=C, max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            svm.fit(transformer.transform(counts), labels)
        model = cls(
            vocab_size,
            bigram_buckets,
            transformer.idf_.astype(np.float64),
            svm.coef_.astype(np.float32),
            svm.intercept_.astype(np.float64),
        )
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        info = {
            "features": int(counts.shape[1]),
            "features_seen_in_train": int((counts.getnnz(axis=0) > 0).sum()),
            "iterations": int(np.max(svm.n_iter_)),
            "converged": converged,
        }
        return model, info

    def features(self, docs: Sequence[np.ndarray]) -> sp.csr_matrix:
        """The TF-IDF rows the linear model scores."""
        return tfidf(self.idf).transform(count_matrix(docs, self.vocab_size, self.bigram_buckets))

    def logits(self, docs: Sequence[np.ndarray]) -> np.ndarray:
        """(n, K) float64 decision values (margins) for token id sequences."""
        return np.asarray(self.features(docs) @ self.coef.T.astype(np.float64)) + self.intercept

    def save(self, directory: Path) -> None:
        from safetensors.numpy import save_file

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
            "n_classes": int(self.coef.shape[0]),
            "weighting": "sklearn TfidfTransformer(sublinear_tf=True, smooth_idf=True, norm=l2)",
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", "utf-8")

    @classmethod
    def load(cls, directory: Path) -> WideModel:
        from safetensors.numpy import load_file

        try:
            config = json.loads((directory / CONFIG_FILE).read_text("utf-8"))
            arrays = load_file(str(directory / WEIGHTS_FILE))
        except FileNotFoundError as exc:
            raise PipelineError(
                f"{directory}: {Path(exc.filename).name} not found (run the wide stage)"
            ) from None
        n_features = config["vocab_size"] + config["bigram_buckets"]
        shapes = {"idf": (n_features,), "coef": (config["n_classes"], n_features)}
        for key, shape in shapes.items():
            if arrays[key].shape != shape:
                raise PipelineError(
                    f"{directory}: {key} has shape {arrays[key].shape}, not {shape}"
                )
        return cls(
            config["vocab_size"],
            config["bigram_buckets"],
            arrays["idf"],
            arrays["coef"],
            arrays["intercept"],
        )
