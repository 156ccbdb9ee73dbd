"""The served model: raw text in, calibrated newsgroup probabilities out (an MLflow pyfunc).

One artifact holds everything prediction needs, so a registered version answers on its
own: the ``tokenize`` tokenizer, the ``finetune`` classifier (weights + ``config.json``),
its ``calibrate`` calibrator (JSON) and ``serving.json`` (class names and the long-document
settings the classifier was trained with). A text is tokenized whole without special
tokens and then chunked / truncated exactly like the fine-tuning collator does
(:class:`pipeline.data.ClassifyCollator`), so served logits equal the pipeline's.

The pure pieces (:func:`validate_texts`, :class:`Scorer`, :func:`predictions_frame`) need
no MLflow; :class:`NewsgroupsClassifier` only wires them into ``mlflow.pyfunc``. Bad input
is a ``ValueError`` with one line in the pure pieces and an ``MlflowException``
(INVALID_PARAMETER_VALUE, HTTP 400 without a stack trace) from the pyfunc model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.schemas import GROUPS

if TYPE_CHECKING:  # torch, lightning and scikit-learn load only when a model does
    from pipeline.calibration import Calibrator
    from pipeline.data import ClassifyCollator
    from pipeline.model import Classifier

TEXT_COLUMN = "text"
SERVING_FILE = "serving.json"
# Keys of the artifacts dict given to mlflow.pyfunc.log_model.
ARTIFACT_TOKENIZER = "tokenizer"
ARTIFACT_CLASSIFIER = "classifier"
ARTIFACT_CALIBRATOR = "calibrator"
ARTIFACT_SERVING = "serving"
LONG_DOC_KEYS = ("long_doc", "max_chunks", "head_fraction")
EXAMPLE_TEXTS = (
    "From: someone@example.edu\nSubject: Re: which graphics card for 3D rendering?\n\n"
    "I need a fast card for OpenGL and image processing.",
    "Subject: The playoffs\n\nWhat a game last night, the goalie stopped every shot.",
)


def prob_column(group: str) -> str:
    """Output column of one class's calibrated probability, e.g. ``prob_sci.space``."""
    return f"prob_{group}"


def validate_texts(frame: Any, column: str = TEXT_COLUMN) -> list[str]:
    """The texts of ``frame[column]``; a one-line ValueError for anything else.

    Rejected: not a DataFrame, no such column, no rows, a value that is not a string
    (numbers, None/NaN) and a text that is empty or only whitespace.
    """
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(
            f"expected a table with a '{column}' column of strings, got {type(frame).__name__}"
        )
    if column not in frame.columns:
        found = ", ".join(map(str, frame.columns)) or "none"
        raise ValueError(f"missing column '{column}' (found columns: {found})")
    if len(frame) == 0:
        raise ValueError(f"no rows: give at least one text in column '{column}'")
    texts = frame[column].tolist()
    for row, value in enumerate(texts):
        if not isinstance(value, str):
            shown = "missing" if value is None or value is pd.NA else repr(value)[:40]
            kind = type(value).__name__
            raise ValueError(
                f"column '{column}', row {row}: expected a string, got {shown} ({kind})"
            )
        if not value.strip():
            raise ValueError(f"column '{column}', row {row}: empty text")
    return texts


def serving_config(classifier_config: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """``serving.json``: class names and how long documents are split, frozen at logging."""
    missing = [k for k in LONG_DOC_KEYS if k not in classifier_config]
    if missing or classifier_config.get("architecture") != "Classifier":
        raise PipelineError(
            "classifier config.json is not a finetune Classifier "
            f"(missing {missing or 'architecture'})"
        )
    if classifier_config.get("n_classes") != len(GROUPS):
        raise PipelineError(
            f"classifier has {classifier_config.get('n_classes')} classes, expected {len(GROUPS)}"
        )
    return {
        "groups": list(GROUPS),
        "max_len": classifier_config["model"]["max_len"],
        **{k: classifier_config[k] for k in LONG_DOC_KEYS},
        "batch_size": batch_size,
    }


@dataclass
class Scorer:
    """Texts -> calibrated probabilities with the pipeline's tokenizer, model and calibrator."""

    tokenizer: Any  # tokenizers.Tokenizer
    model: Classifier
    calibrator: Calibrator
    collate: ClassifyCollator
    groups: tuple[str, ...]
    batch_size: int = 32

    @classmethod
    def load(
        cls, tokenizer_path: Path, classifier_dir: Path, calibrator_path: Path, config: dict
    ) -> Scorer:
        """Rebuild the scorer from the files the pipeline stages wrote."""
        from tokenizers import Tokenizer

        from pipeline.calibration import Calibrator
        from pipeline.data import SPECIAL_TOKENS, ClassifyCollator
        from pipeline.model import Classifier, ModelParams, load_model_files

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        for token, expected in SPECIAL_TOKENS.items():
            if tokenizer.token_to_id(token) != expected:
                raise PipelineError(f"{tokenizer_path}: special token {token} is not id {expected}")
        model_config, state = load_model_files(classifier_dir)
        if model_config.get("vocab_size") != tokenizer.get_vocab_size():
            raise PipelineError(
                f"{classifier_dir}: vocabulary {model_config.get('vocab_size')} does not match "
                f"the tokenizer's {tokenizer.get_vocab_size()}"
            )
        groups = tuple(config["groups"])
        model = Classifier(
            ModelParams(**model_config["model"]),
            model_config["vocab_size"],
            len(groups),
            pooling=model_config["pooling"],
            chunk_pooling=model_config["chunk_pooling"],
            bag=model_config.get("bag", False),
            bag_buckets=model_config.get("bag_buckets", 0),
        )
        model.load_state_dict(state, strict=True)
        model.eval()
        calibrator = Calibrator.from_dict(json.loads(Path(calibrator_path).read_text("utf-8")))
        if calibrator.num_classes != len(groups):
            raise PipelineError(
                f"{calibrator_path}: calibrator for {calibrator.num_classes} classes"
            )
        collate = ClassifyCollator(
            config["max_len"],
            config["long_doc"],
            config["max_chunks"],
            config["head_fraction"],
            bag=model_config.get("bag", False),
            vocab_size=model_config["vocab_size"],
            bag_buckets=model_config.get("bag_buckets", 0),
        )
        return cls(tokenizer, model, calibrator, collate, groups, int(config["batch_size"]))

    def token_ids(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Whole documents, no special tokens: what the ``tokenize`` stage stores."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """Uncalibrated float64 logits (n, k), batched like the finetune stage predicts."""
        import torch

        from pipeline.data import Example
        from pipeline.model import model_inputs

        tokens = self.token_ids(texts)
        out = []
        with torch.inference_mode():
            for start in range(0, len(tokens), self.batch_size):
                part = tokens[start : start + self.batch_size]
                batch = self.collate([Example(i, t, 0) for i, t in enumerate(part)])
                logits = self.model(**model_inputs(batch))
                out.append(logits.double().numpy())
        return np.concatenate(out)

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """Calibrated probabilities (n, k), rows summing to 1."""
        return self.calibrator.predict_proba(self.logits(texts))


def predictions_frame(probs: np.ndarray, groups: Sequence[str]) -> pd.DataFrame:
    """The served answer: label, id, confidence and one probability column per class."""
    ids = probs.argmax(axis=1)
    frame = pd.DataFrame(
        {
            "predicted_label": pd.Series([groups[i] for i in ids], dtype=object),
            "predicted_id": ids.astype(np.int64),
            "confidence": probs.max(axis=1).astype(np.float64),
        }
    )
    columns = pd.DataFrame(probs.astype(np.float64), columns=[prob_column(g) for g in groups])
    return pd.concat([frame, columns], axis=1)


def input_example() -> pd.DataFrame:
    """The example stored with the model (and shown by the registry UI)."""
    return pd.DataFrame({TEXT_COLUMN: pd.Series(list(EXAMPLE_TEXTS), dtype=object)})


class NewsgroupsClassifier(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: a DataFrame with a ``text`` column -> predictions_frame()."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        paths = context.artifacts
        config = json.loads(Path(paths[ARTIFACT_SERVING]).read_text("utf-8"))
        self.scorer = Scorer.load(
            Path(paths[ARTIFACT_TOKENIZER]),
            Path(paths[ARTIFACT_CLASSIFIER]),
            Path(paths[ARTIFACT_CALIBRATOR]),
            config,
        )

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException

        try:
            texts = validate_texts(model_input)
        except ValueError as exc:  # a 400 with this message, not a 500 with a traceback
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        return predictions_frame(self.scorer.probabilities(texts), self.scorer.groups)
