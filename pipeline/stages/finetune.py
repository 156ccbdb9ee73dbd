"""Stage `finetune`: the 20-class classifier, from the pretrained encoder or from scratch.

Reads ``data/tokenized`` (train to learn, validation to select, test only to predict),
``data/tokenizer/tokenizer.json`` and, with ``finetune.init: pretrained``,
``data/models/pretrained/``. Early stopping and the choice of the kept weights look at the
validation split only; after training, global rank 0 predicts validation and test once, in
one process, with the kept weights.

Outputs (atomic, rank 0): ``data/models/classifier/`` (``model.safetensors`` +
``config.json``), the logits table ``data/predictions/transformer/predictions.parquet``
(:class:`pipeline.schemas.Predictions`), ``reports/finetune.json`` (validation metrics of
the kept weights) and ``reports/finetune/{train,validation}.csv`` (curves for DVC plots).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as L
import pandas as pd
from pydantic import Field

from pipeline import paths
from pipeline.domain import NUM_CLASSES
from pipeline.encoder.callbacks import BestWeights, EpochSeed, LossCurve
from pipeline.encoder.checkpoints import discard_checkpoints
from pipeline.encoder.collate import ClassifyCollator, LongDoc
from pipeline.encoder.model import (
    ChunkPooling,
    Classifier,
    ModelParams,
    TokenPooling,
    encoder_config,
    format_parameter_counts,
    load_pretrained_encoder,
    parameter_counts,
)
from pipeline.encoder.modules import ClassifierModule, refuse_frozen_encoder_under_ddp
from pipeline.encoder.params import TrainerParams, TrainParams
from pipeline.encoder.predict import logits_table
from pipeline.encoder.tokens import load_splits, load_vocab_size
from pipeline.encoder.trainer import FitOptions, fit_module, say
from pipeline.encoder.training_stage import (
    FinetunePaths,
    stage_datamodule,
    training_stage_main,
    training_summary,
    write_training_outputs,
)
from pipeline.errors import run_stage
from pipeline.predictions import split_scores

CONFIG_KEYS = ("pooling", "chunk_pooling", "long_doc", "max_chunks", "head_fraction")
"""The ``finetune`` keys in the classifier's ``config.json``, which the served model reads."""


class FinetuneParams(TrainParams):
    """Section ``finetune``: TrainParams plus how the classifier is built and trained."""

    init: Literal["pretrained", "scratch"] = Field(
        description="pretrained: the encoder of the pretrain stage (same model section); "
        "scratch: random weights."
    )
    dropout: float = Field(ge=0.0, lt=1.0, description="Dropout before the classification head.")
    encoder_dropout: float | None = Field(
        ge=0.0,
        lt=1.0,
        description="Dropout inside the encoder while fine-tuning (null: model.dropout).",
    )
    pooling: TokenPooling = Field(
        description="Token pooling within a sequence: mean or max (over non-pad tokens), or cls."
    )
    long_doc: LongDoc = Field(
        description="How a long document is seen: chunk (consecutive model.max_len chunks), "
        "head_tail (start and end) or head (first tokens only)."
    )
    max_chunks: int = Field(ge=1, description="long_doc=chunk: most chunks per document.")
    chunk_pooling: ChunkPooling = Field(
        description="long_doc=chunk: how the chunks' vectors are pooled, mean or max."
    )
    head_fraction: float = Field(
        ge=0.0,
        le=1.0,
        description="long_doc=head_tail: share of the token budget taken from the start.",
    )
    freeze_epochs: int = Field(
        ge=0, description="Epochs during which the encoder is frozen and only the head learns."
    )
    layer_lr_decay: float = Field(
        gt=0.0,
        le=1.0,
        description="Layer-wise LR decay: layer i of n gets lr x decay^(n + 1 - i); 1.0 is off.",
    )
    label_smoothing: float = Field(
        ge=0.0,
        lt=1.0,
        description="Label smoothing of the loss; it changes the logits that "
        "calibrate and evaluate read.",
    )
    monitor: Literal["val_loss", "val_acc"] = Field(
        description="Validation metric that picks the kept weights and drives early stopping."
    )


def build_classifier(
    model_params: ModelParams, params: FinetuneParams, vocab_size: int, pretrained: Path
) -> Classifier:
    """A classifier whose encoder is fresh or loaded (and checked) from ``pretrained``."""
    if params.encoder_dropout is not None:
        model_params = model_params.model_copy(update={"dropout": params.encoder_dropout})
    head = {key: getattr(params, key) for key in ("pooling", "chunk_pooling", "dropout")}
    model = Classifier(model_params, vocab_size, NUM_CLASSES, **head)
    if params.init == "pretrained":
        load_pretrained_encoder(model, model_params, vocab_size, pretrained)
    return model


def selection_report(
    table: pd.DataFrame, params: FinetuneParams, step: int, summary: dict[str, Any]
) -> dict[str, Any]:
    """The stage's report: validation scores of the kept weights (those of ``step``) and
    how they were chosen, then the report keys every training stage has."""
    scores = split_scores(table, "validation")
    return {
        "validation_accuracy": scores["accuracy"],  # of the kept weights, the encoder alone
        "validation_nll": scores["nll"],
        "selected_step": step,
        "selected_by": params.monitor,
        "init": params.init,
        "long_doc": params.long_doc,
        **summary,
    }


def train_classifier(
    model_params: ModelParams,
    params: FinetuneParams,
    trainer_params: TrainerParams,
    seed: int,
    files: FinetunePaths | None = None,
    options: FitOptions | None = None,
) -> dict[str, Any] | None:
    """Fine-tune, predict and write the outputs to ``files`` (default: the pipeline's
    paths); returns the report on global rank 0, None on the other ranks. Raises
    PipelineError for ``freeze_epochs`` under plain DDP or a pretrained encoder of another
    shape."""
    files, options = files or FinetunePaths(), options or FitOptions()
    refuse_frozen_encoder_under_ddp(params.freeze_epochs, trainer_params.strategy)
    L.seed_everything(seed, workers=True, verbose=False)
    vocab_size = load_vocab_size(files.tokenizer)
    splits = load_splits(files.tokenized, vocab_size, NUM_CLASSES)
    model = build_classifier(model_params, params, vocab_size, files.pretrained)
    counts = parameter_counts(model)
    say(f"finetune: classifier ({params.init} encoder) with {format_parameter_counts(counts)}")
    collate = ClassifyCollator(
        model_params.max_len, params.long_doc, params.max_chunks, params.head_fraction
    )
    data = stage_datamodule(splits, params, trainer_params, seed, collate, collate)
    module = ClassifierModule(
        model,
        params,
        n_classes=NUM_CLASSES,
        label_smoothing=params.label_smoothing,
        freeze_epochs=params.freeze_epochs,
        layer_lr_decay=params.layer_lr_decay,
    )
    best = BestWeights(params.monitor, "min" if params.monitor == "val_loss" else "max")
    curve = LossCurve(every=trainer_params.log_every_n_steps, val_keys=("val_loss", "val_acc"))
    fitted = fit_module(module, data, [best, curve, EpochSeed(seed)], trainer_params, options)
    if not fitted.trainer.is_global_zero:
        return None
    if best.state is not None:  # otherwise no validation ran: keep the final weights
        model.load_state_dict(best.state)
    device = fitted.trainer.strategy.root_device
    table = logits_table(model, data, splits, device, trainer_params.precision)
    step = best.best_step if best.best_step is not None else fitted.trainer.global_step
    result = selection_report(table, params, step, training_summary(fitted, module, counts))
    head = {key: getattr(params, key) for key in CONFIG_KEYS}
    config = encoder_config(
        model_params, vocab_size, architecture="Classifier", n_classes=NUM_CLASSES, **head
    )
    write_training_outputs(model, config, curve, result, files, table)
    discard_checkpoints(options.checkpoints)
    say(
        f"finetune: validation accuracy {result['validation_accuracy']:.4f}, NLL "
        f"{result['validation_nll']:.4f} (weights of step {result['selected_step']}); weights in "
        f"{files.model}/, logits in {files.predictions / paths.PREDICTIONS_FILE}, metrics in "
        f"{files.report}, curves in {files.curves}/"
    )
    return result


def main() -> None:
    training_stage_main("finetune", FinetuneParams, train_classifier, FinetunePaths())


if __name__ == "__main__":
    run_stage(main)
