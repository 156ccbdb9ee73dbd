"""The served model: raw text in, calibrated newsgroup probabilities out (an MLflow pyfunc).

The served model is the pipeline's ``blend``: the ``finetune`` encoder and the ``wide``
linear bag model, each scoring the text, combined with the ``blend`` stage's weights and
calibrated by the blend's ``calibrate`` calibrator. One artifact set holds everything
prediction needs, so a registered version answers on its own: the ``tokenize``
tokenizer, the classifier (weights + ``config.json``), the wide model (IDF + weights),
``blend.json``, the calibrator (JSON) and ``serving.json`` (class names, the long-document
settings the classifier was trained with). A text is tokenized whole without special
tokens, then chunked by the fine-tuning collator
(:class:`pipeline.encoder.collate.ClassifyCollator`) and scored by the loop that wrote the
``finetune`` predictions (:func:`pipeline.encoder.inference.predict_logits`), and bagged
exactly like the ``wide`` stage does (:class:`pipeline.wide_model.WideModel`), so served
logits equal the pipeline's ``blend`` logits. A request with the inference param
``set_level`` also gets each text's conformal prediction set (:mod:`pipeline.served_sets`).

Serving imports neither Lightning, pandera nor torchmetrics (training and validation
tools): the registered model's requirements are derived from what it imports
(:mod:`pipeline.served_requirements`), so every such import would be one more dependency
to install wherever the model is served.

The model is logged as code (:mod:`pipeline.served_model`, MLflow "models from code"),
never as a pickle. The pure pieces (:func:`validate_texts`, :class:`Scorer`,
:func:`predictions_frame`) need no MLflow; :class:`NewsgroupsClassifier` only wires them
into ``mlflow.pyfunc``. Bad input is a ``ValueError`` with one line in the pure pieces and
an ``MlflowException`` (INVALID_PARAMETER_VALUE, HTTP 400 without a stack trace) from the
pyfunc model.
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
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import AnyType, ColSpec, Schema

from pipeline.domain import GROUPS, special_token_mismatch
from pipeline.errors import PipelineError
from pipeline.served_sets import SET_COLUMN, ServedSets, check_served, requested_level

if TYPE_CHECKING:  # torch and scikit-learn load only when a model does
    from pipeline.calibration import Calibrator
    from pipeline.encoder.collate import ClassifyCollator
    from pipeline.encoder.model import Classifier
    from pipeline.wide_model import WideModel

TEXT_COLUMN = "text"
SERVING_FILE = "serving.json"
# Keys of the artifacts dict given to mlflow.pyfunc.log_model.
ARTIFACT_TOKENIZER = "tokenizer"
ARTIFACT_CLASSIFIER = "classifier"
ARTIFACT_WIDE = "wide"
ARTIFACT_BLEND = "blend"
ARTIFACT_CALIBRATOR = "calibrator"
ARTIFACT_SERVING = "serving"
SERVED_MODELS = ("transformer", "wide")  # the blend inputs a served model can compute
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
        found = (
            f" (found columns: {', '.join(map(str, frame.columns))})" if len(frame.columns) else ""
        )
        raise ValueError(f"missing column '{column}'{found}")
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


def serving_config(
    classifier_config: dict[str, Any],
    batch_size: int,
    set_method: str | None = None,
    set_variant: str | None = None,
) -> dict[str, Any]:
    """``serving.json``: class names, how long documents are split and which prediction
    sets are served (none without ``set_method`` and ``set_variant``), frozen at logging."""
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
        **({"set_method": set_method, "set_variant": set_variant} if set_method else {}),
    }


@dataclass(frozen=True)
class ServedFiles:
    """Where the served model's parts are (the pipeline's outputs, or the artifacts)."""

    tokenizer: Path
    classifier: Path
    wide: Path
    blend: Path
    calibrator: Path


def read_blend(path: Path) -> dict[str, float]:
    """The blend's weights by model, checked to be models a served model can compute."""
    try:
        state = json.loads(Path(path).read_text("utf-8"))
        weights = dict(zip(state["models"], state["weights"], strict=True))
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found (run the blend stage)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"{path}: not a blend state ({exc})") from None
    unknown = sorted(set(weights) - set(SERVED_MODELS))
    if unknown or not weights:
        raise PipelineError(
            f"{path}: a served blend can combine {list(SERVED_MODELS)}, not {unknown or 'nothing'}"
            " (set blend.models accordingly)"
        )
    return {m: float(w) for m, w in weights.items()}


@dataclass
class Scorer:
    """Texts -> calibrated probabilities with the pipeline's tokenizer, models, blend
    weights and calibrator."""

    tokenizer: Any  # tokenizers.Tokenizer
    weights: dict[str, float]
    encoder: Classifier | None
    collate: ClassifyCollator | None
    wide: WideModel | None
    calibrator: Calibrator
    groups: tuple[str, ...]
    batch_size: int = 32
    sets: ServedSets | None = None

    @classmethod
    def load(cls, files: ServedFiles, config: dict) -> Scorer:
        """Rebuild the scorer from the files the pipeline stages wrote."""
        # torch, scikit-learn and tokenizers load only when a model does
        from tokenizers import Tokenizer

        from pipeline.calibration import Calibrator
        from pipeline.encoder.collate import ClassifyCollator
        from pipeline.encoder.model import Classifier, ModelParams, load_model_files
        from pipeline.wide_model import WideModel

        tokenizer = Tokenizer.from_file(str(files.tokenizer))
        mismatch = special_token_mismatch(tokenizer)
        if mismatch:
            raise PipelineError(f"{files.tokenizer}: {mismatch}")
        vocab = tokenizer.get_vocab_size()
        groups = tuple(config["groups"])
        weights = read_blend(files.blend)
        encoder = collate = wide = None
        if "transformer" in weights:
            model_config, state = load_model_files(files.classifier)
            if model_config.get("vocab_size") != vocab:
                raise PipelineError(
                    f"{files.classifier}: vocabulary {model_config.get('vocab_size')} does not "
                    f"match the tokenizer's {vocab}"
                )
            encoder = Classifier(
                ModelParams(**model_config["model"]),
                model_config["vocab_size"],
                len(groups),
                pooling=model_config["pooling"],
                chunk_pooling=model_config["chunk_pooling"],
            )
            encoder.load_state_dict(state, strict=True)
            encoder.eval()
            collate = ClassifyCollator(
                config["max_len"], config["long_doc"], config["max_chunks"], config["head_fraction"]
            )
        if "wide" in weights:
            wide = WideModel.load(files.wide)
            if wide.vocab_size != vocab:
                raise PipelineError(
                    f"{files.wide}: vocabulary {wide.vocab_size} does not match the tokenizer's "
                    f"{vocab}"
                )
        calibrator_state = json.loads(Path(files.calibrator).read_text("utf-8"))
        calibrator = Calibrator.from_dict(calibrator_state)
        if calibrator.num_classes != len(groups):
            raise PipelineError(
                f"{files.calibrator}: calibrator for {calibrator.num_classes} classes"
            )
        try:
            sets = ServedSets.load(calibrator_state, config)
        except PipelineError as exc:
            raise PipelineError(f"{files.calibrator}: {exc}") from None
        batch = int(config["batch_size"])
        return cls(tokenizer, weights, encoder, collate, wide, calibrator, groups, batch, sets)

    def token_ids(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Whole documents, no special tokens: what the ``tokenize`` stage stores."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def encoder_logits(self, tokens: list[np.ndarray]) -> np.ndarray:
        """The ``transformer`` model's float64 logits, batched like ``finetune`` predicts
        and computed by the same loop."""
        # torch loads only when a model does
        from pipeline.encoder.collate import Example
        from pipeline.encoder.inference import predict_logits

        assert self.encoder is not None and self.collate is not None
        examples = [Example(i, t, 0) for i, t in enumerate(tokens)]
        batches = (
            self.collate(examples[start : start + self.batch_size])
            for start in range(0, len(examples), self.batch_size)
        )
        _, logits = predict_logits(self.encoder, batches)
        return logits

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """Uncalibrated float64 blend logits (n, k): ``sum_m w_m * logits_m``."""
        tokens = self.token_ids(texts)
        parts = {}
        if self.encoder is not None:
            parts["transformer"] = self.encoder_logits(tokens)
        if self.wide is not None:
            parts["wide"] = self.wide.logits(tokens, texts)
        return sum(w * parts[m] for m, w in self.weights.items())

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """Calibrated probabilities (n, k), rows summing to 1."""
        return self.calibrator.predict_proba(self.logits(texts))


def predictions_frame(
    probs: np.ndarray, groups: Sequence[str], sets: list[list[str]] | None = None
) -> pd.DataFrame:
    """The served answer: label, id, confidence and one probability column per class, then
    :data:`SET_COLUMN` (each row's prediction set, class names) when ``sets`` is given."""
    ids = probs.argmax(axis=1)
    frame = pd.DataFrame(
        {
            "predicted_label": pd.Series([groups[i] for i in ids], dtype=object),
            "predicted_id": ids.astype(np.int64),
            "confidence": probs.max(axis=1).astype(np.float64),
        }
    )
    columns = pd.DataFrame(probs.astype(np.float64), columns=[prob_column(g) for g in groups])
    frame = pd.concat([frame, columns], axis=1)
    if sets is not None:
        frame[SET_COLUMN] = pd.Series(sets, dtype=object)
    return frame


def input_example() -> pd.DataFrame:
    """The example stored with the model (and shown by the registry UI)."""
    return pd.DataFrame({TEXT_COLUMN: pd.Series(list(EXAMPLE_TEXTS), dtype=object)})


def input_signature() -> Schema:
    """The served input schema: a ``text`` column of type *any*, checked by the model.

    Declaring it ``string`` would let MLflow's JSON parser cast before the model sees the
    values (``null`` -> ``"None"``, ``5`` -> ``"5"``) and score them; with ``any`` every
    input format reaches :func:`validate_texts` as sent, which answers 400 for them. It is
    not ``required`` for the same reason: a missing column gets our one-line message.
    """
    return Schema([ColSpec(AnyType(), TEXT_COLUMN, required=False)])


def as_frame(model_input: Any) -> Any:
    """The request as a table of texts. With an ``any`` column MLflow hands the column
    formats (``{"inputs": {"text": [...]}}``, ``{"inputs": [...]}``) over as one row
    holding the whole list: spread it into rows. Anything else is returned as it is."""
    if (
        isinstance(model_input, pd.DataFrame)
        and len(model_input) == 1
        and list(model_input.columns) == [TEXT_COLUMN]
        and isinstance(model_input[TEXT_COLUMN].iloc[0], list | tuple | np.ndarray)
    ):
        values = list(model_input[TEXT_COLUMN].iloc[0])
        return pd.DataFrame({TEXT_COLUMN: pd.Series(values, dtype=object)})
    return model_input


def bad_input(message: str) -> MlflowException:
    """An HTTP 400 whose body is our one line: MLflow's scoring server prefixes the message
    of any exception from ``predict`` with the whole input (``Failed to predict data
    '...'``), which repeats the request back and spreads it over several lines."""

    class BadInput(MlflowException):
        @property
        def message(self) -> str:
            return self._line

        @message.setter
        def message(self, value: str) -> None:
            if not hasattr(self, "_line"):  # keep the first message: ours
                self._line = value

    return BadInput(message, error_code=INVALID_PARAMETER_VALUE)


class NewsgroupsClassifier(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: a DataFrame with a ``text`` column -> predictions_frame(); the
    inference param ``set_level`` adds the prediction sets at that level."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        paths = context.artifacts
        config = json.loads(Path(paths[ARTIFACT_SERVING]).read_text("utf-8"))
        files = ServedFiles(
            tokenizer=Path(paths[ARTIFACT_TOKENIZER]),
            classifier=Path(paths[ARTIFACT_CLASSIFIER]),
            wide=Path(paths[ARTIFACT_WIDE]),
            blend=Path(paths[ARTIFACT_BLEND]),
            calibrator=Path(paths[ARTIFACT_CALIBRATOR]),
        )
        self.scorer = Scorer.load(files, config)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        try:
            texts = validate_texts(as_frame(model_input))
            level = requested_level(params)
            sets = None if level is None else check_served(self.scorer.sets, level)
        except ValueError as exc:  # a 400 with this message, not a 500 with a traceback
            raise bad_input(str(exc)) from None
        probs = self.scorer.probabilities(texts)
        labels = None if sets is None else sets.labels(probs, level, self.scorer.groups)
        return predictions_frame(probs, self.scorer.groups, labels)
