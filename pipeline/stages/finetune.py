"""Stage `finetune`: the 20-class classifier, from the pretrained encoder or from scratch.

Reads ``data/tokenized`` (train to learn, validation to select, test only to predict),
``data/tokenizer/tokenizer.json`` and, with ``finetune.init: pretrained``,
``data/models/pretrained/``. Long documents are handled as ``finetune.long_doc`` says
(see :mod:`pipeline.encoder.model`). Early stopping and the choice of the weights to keep
look at the validation split only; after training, global rank 0 predicts validation
and test once, in one process, with the selected weights.

Outputs (atomic, rank 0): ``data/models/classifier/`` (``model.safetensors`` +
``config.json``), ``data/predictions/transformer/predictions.parquet`` (the logits table,
schema :class:`pipeline.schemas.Predictions`), ``reports/finetune.json`` (validation
metrics of the kept weights) and ``reports/finetune/{train,validation}.csv`` (curves for
DVC plots).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as L
import numpy as np
import pandas as pd
from pydantic import Field

from pipeline import paths
from pipeline.domain import NUM_CLASSES, PREDICTION_SPLITS
from pipeline.encoder.collate import ClassifyCollator, LongDoc
from pipeline.encoder.data import TokenizedDataModule
from pipeline.encoder.model import (
    ChunkPooling,
    Classifier,
    ModelParams,
    TokenPooling,
    encoder_config,
    format_parameter_counts,
    load_model_files,
    parameter_counts,
)
from pipeline.encoder.tokens import DocumentTokens, load_splits, load_vocab_size
from pipeline.encoder.training import (
    BestWeights,
    ClassifierModule,
    EpochSeed,
    LossCurve,
    TrainerParams,
    TrainParams,
    discard_checkpoints,
    fit_module,
    predict_logits,
    run_summary,
    say,
    training_stage_main,
    write_training_outputs,
)
from pipeline.errors import PipelineError, run_stage
from pipeline.io import atomic_outputs
from pipeline.predictions import make_table, split_scores
from pipeline.schemas import Predictions, validate


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
    """A classifier whose encoder is fresh or loaded from ``pretrained``, with checks
    that the pretrained encoder has the shape the ``model`` section describes."""
    if params.encoder_dropout is not None:
        model_params = model_params.model_copy(update={"dropout": params.encoder_dropout})
    model = Classifier(
        model_params,
        vocab_size,
        NUM_CLASSES,
        pooling=params.pooling,
        chunk_pooling=params.chunk_pooling,
        dropout=params.dropout,
    )
    if params.init == "scratch":
        return model
    config, state = load_model_files(pretrained)
    theirs = {k: v for k, v in config.get("model", {}).items() if k != "dropout"}
    ours = {k: v for k, v in model_params.model_dump().items() if k != "dropout"}
    if theirs != ours or config.get("vocab_size") != vocab_size:
        raise PipelineError(
            f"{pretrained}: pretrained encoder {theirs} (vocab {config.get('vocab_size')}) "
            f"does not match the model section {ours} (vocab {vocab_size}); rerun pretrain "
            "or set finetune.init=scratch"
        )
    encoder_state = {k.removeprefix("encoder."): v for k, v in state.items() if k[:8] == "encoder."}
    model.encoder.load_state_dict(encoder_state, strict=True)
    return model


def predictions_table(
    splits: dict[str, DocumentTokens], logits: dict[str, tuple[np.ndarray, np.ndarray]]
) -> pd.DataFrame:
    """The validated logits table (:class:`pipeline.schemas.Predictions`), split by split."""
    ids, split_names, labels, values = [], [], [], []
    for split, (index, split_logits) in logits.items():
        data = splits[split]
        ids += [data.ids[i] for i in index]
        split_names += [split] * len(index)
        labels.append(data.labels[index])
        values.append(split_logits)
    table = make_table(ids, split_names, np.concatenate(labels), np.concatenate(values))
    return validate(table, Predictions, "finetune predictions")


def run(
    model_params: ModelParams,
    params: FinetuneParams,
    trainer_params: TrainerParams,
    seed: int,
    *,
    tokenized: Path = paths.TOKENIZED,
    tokenizer: Path = paths.TOKENIZER,
    pretrained: Path = paths.PRETRAINED,
    out_model: Path = paths.CLASSIFIER,
    out_predictions: Path = paths.predictions_dir("transformer"),
    report: Path = paths.stage_report("finetune"),
    curves: Path = paths.curves_dir("finetune"),
    checkpoints: Path | None = None,
    **trainer_overrides: Any,
) -> dict[str, Any] | None:
    """Fine-tune, predict and write the outputs; returns the report on rank 0."""
    if params.freeze_epochs and trainer_params.strategy in ("ddp", "ddp_spawn"):
        raise PipelineError(
            "finetune.freeze_epochs > 0 leaves encoder parameters unused, which plain DDP "
            "rejects: use trainer.strategy=ddp_find_unused_parameters_true"
        )
    L.seed_everything(seed, workers=True, verbose=False)
    vocab_size = load_vocab_size(tokenizer)
    splits = load_splits(tokenized, vocab_size, NUM_CLASSES)
    model = build_classifier(model_params, params, vocab_size, pretrained)
    counts = parameter_counts(model)
    say(f"finetune: classifier ({params.init} encoder) with {format_parameter_counts(counts)}")

    collate = ClassifyCollator(
        model_params.max_len, params.long_doc, params.max_chunks, params.head_fraction
    )
    data = TokenizedDataModule(
        splits,
        train_collate=collate,
        eval_collate=collate,
        batch_size=params.batch_size,
        eval_batch_size=params.eval_batch_size,
        num_workers=trainer_params.num_workers,
        seed=seed,
    )
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
    callbacks = [best, curve, EpochSeed(seed)]
    fitted = fit_module(module, data, callbacks, trainer_params, checkpoints, **trainer_overrides)
    trainer = fitted.trainer
    if not trainer.is_global_zero:
        return None

    if best.state is not None:  # otherwise no validation ran: keep the final weights
        model.load_state_dict(best.state)
    device = trainer.strategy.root_device
    logits = {
        split: predict_logits(model, data.eval_loader(split), device, trainer_params.precision)
        for split in PREDICTION_SPLITS
    }
    table = predictions_table(splits, logits)
    scores = split_scores(table, "validation")
    result = {
        "validation_accuracy": scores["accuracy"],  # of the kept weights, the encoder alone
        "validation_nll": scores["nll"],
        "selected_step": best.best_step if best.best_step is not None else trainer.global_step,
        "selected_by": params.monitor,
        "init": params.init,
        "long_doc": params.long_doc,
        **run_summary(fitted, module, counts),
    }
    with atomic_outputs() as out:
        config = encoder_config(
            model_params,
            vocab_size,
            architecture="Classifier",
            n_classes=NUM_CLASSES,
            pooling=params.pooling,
            chunk_pooling=params.chunk_pooling,
            long_doc=params.long_doc,
            max_chunks=params.max_chunks,
            head_fraction=params.head_fraction,
        )
        write_training_outputs(out, model, config, curve, result, out_model, curves, report)
        table.to_parquet(out.dir(out_predictions) / paths.PREDICTIONS_FILE, index=False)
    discard_checkpoints(checkpoints)
    say(
        f"finetune: validation accuracy {result['validation_accuracy']:.4f}, NLL "
        f"{result['validation_nll']:.4f} (weights of step {result['selected_step']}); weights in "
        f"{out_model}/, logits in {out_predictions / paths.PREDICTIONS_FILE}, metrics in {report}, "
        f"curves in {curves}/"
    )
    return result


def main() -> None:
    inputs = [
        paths.TOKENIZED,
        paths.TOKENIZER,
        paths.PRETRAINED,
    ]  # the pretrained encoder only when it is used
    training_stage_main(
        "finetune",
        FinetuneParams,
        run,
        paths.stage_report("finetune"),
        paths.curves_dir("finetune"),
        inputs,
    )


if __name__ == "__main__":
    run_stage(main)
