"""Stage `pretrain`: language-model pretraining of the encoder on the train split.

Reads ``data/tokenized`` (train to learn, validation for a held-out loss; test is never
read) and ``data/tokenizer/tokenizer.json`` (vocabulary size). Each training document
contributes a random window of ``model.max_len - 2`` tokens per epoch. ``objective``:
``mlm`` predicts dynamically masked tokens with bidirectional attention; ``clm`` predicts
every next token with causal attention. Validation uses fixed windows (and masks) so its
loss is comparable across steps. Before training, ``embedding_init: lsa`` sets the token
embedding from a truncated SVD of the train split's TF-IDF
(:mod:`pipeline.encoder.embedding_init`).

Outputs (all written atomically after training, by global rank 0 only):
``data/models/pretrained/`` (``model.safetensors`` with the encoder and MLM head,
``config.json``), ``reports/pretrain.json`` (final validation loss and perplexity, steps,
throughput) and ``reports/pretrain/{train,validation}.csv`` (loss curves for DVC plots).
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as L
from pydantic import Field

from pipeline.domain import GROUPS
from pipeline.encoder.callbacks import EpochSeed, LossCurve
from pipeline.encoder.checkpoints import discard_checkpoints
from pipeline.encoder.data import LMCollator
from pipeline.encoder.embedding_init import EmbeddingInit, init_embedding
from pipeline.encoder.model import (
    LanguageModel,
    ModelParams,
    Objective,
    encoder_config,
    format_parameter_counts,
    parameter_counts,
)
from pipeline.encoder.modules import LMModule
from pipeline.encoder.params import TrainerParams, TrainParams
from pipeline.encoder.tokens import DocumentTokens, load_splits, load_vocab_size
from pipeline.encoder.trainer import FitOptions, fit_module, say
from pipeline.encoder.training_stage import (
    PretrainPaths,
    stage_datamodule,
    training_stage_main,
    training_summary,
    write_training_outputs,
)
from pipeline.errors import run_stage


class PretrainParams(TrainParams):
    """Section ``pretrain``: the optimizer/budget fields of TrainParams plus the objective."""

    objective: Objective = Field(
        description="mlm: predict masked tokens (bidirectional, BERT-style); clm: predict the "
        "next token (causal, GPT-style). finetune loads the encoder either way."
    )
    mask_rate: float = Field(
        gt=0.0,
        lt=1.0,
        description="mlm: share of content tokens chosen for prediction (80% [MASK], 10% "
        "random, 10% kept).",
    )
    embedding_init: EmbeddingInit = Field(
        description="Token embedding before training: lsa (rows of a truncated SVD of the "
        "train TF-IDF matrix) or none (random rows)."
    )
    embedding_std: float = Field(
        gt=0.0, le=1.0, description="lsa: entry std the rows are rescaled to (the random init's)."
    )
    embedding_power: float = Field(
        ge=0.0, le=1.0, description="lsa: the rows are V S^embedding_power of the SVD (0: V alone)."
    )


def initial_model(
    model_params: ModelParams,
    params: PretrainParams,
    vocab_size: int,
    train: DocumentTokens,
    seed: int,
) -> LanguageModel:
    """The language model before training: seeded random weights, then the token
    embedding set from the train documents as ``params.embedding_init`` says."""
    model = LanguageModel(model_params, vocab_size, params.objective)
    if params.embedding_init != "none":
        start = time.perf_counter()
        init_embedding(
            model.encoder.tok_emb,
            [ex.tokens for ex in train],
            params.embedding_init,
            seed=seed,
            std=params.embedding_std,
            power=params.embedding_power,
        )
        seconds = time.perf_counter() - start
        say(f"pretrain: {params.embedding_init} token embedding from train in {seconds:.1f} s")
    return model


def pretrain_lm(
    model_params: ModelParams,
    params: PretrainParams,
    trainer_params: TrainerParams,
    seed: int,
    files: PretrainPaths | None = None,
    options: FitOptions | None = None,
) -> dict[str, Any] | None:
    """Pretrain and write the outputs to ``files`` (default: the pipeline's paths); returns
    the report on global rank 0, None on the other ranks."""
    files, options = files or PretrainPaths(), options or FitOptions()
    L.seed_everything(seed, workers=True, verbose=False)
    vocab_size = load_vocab_size(files.tokenizer)
    splits = load_splits(files.tokenized, vocab_size, len(GROUPS), ("train", "validation"))
    model = initial_model(model_params, params, vocab_size, splits["train"], seed)
    counts = parameter_counts(model)
    kind = {"mlm": "masked", "clm": "causal"}[params.objective]
    say(f"pretrain: {kind} LM with {format_parameter_counts(counts)}")
    train_collate, eval_collate = (  # random windows and masks; seeded for validation
        LMCollator(model_params.max_len, vocab_size, params.mask_rate, s, params.objective)
        for s in (None, seed)
    )
    data = stage_datamodule(splits, params, trainer_params, seed, train_collate, eval_collate)
    module = LMModule(model, params)
    curve = LossCurve(every=trainer_params.log_every_n_steps)
    fitted = fit_module(module, data, [curve, EpochSeed(seed)], trainer_params, options)
    # A final held-out pass on the final weights (the last scheduled validation may be
    # steps behind them); every rank takes part, rank 0 writes.
    final = fitted.trainer.validate(module, datamodule=data, verbose=False)[0]
    if not fitted.trainer.is_global_zero:
        return None
    val_loss = float(final["val_loss"])
    result = {
        "val_loss": round(val_loss, 6),
        "val_perplexity": round(math.exp(min(val_loss, 700.0)), 4),
        "objective": params.objective,
        **training_summary(fitted, module, counts),
    }
    config = encoder_config(
        model_params, vocab_size, architecture="LanguageModel", objective=params.objective
    )
    write_training_outputs(model, config, curve, result, files)
    discard_checkpoints(options.checkpoints)
    say(
        f"pretrain: val loss {val_loss:.4f} (perplexity {result['val_perplexity']}) after "
        f"{result['steps']} steps; weights in {files.model}/, metrics in {files.report}, "
        f"curves in {files.curves}/"
    )
    return result


def main() -> None:
    training_stage_main("pretrain", PretrainParams, pretrain_lm, PretrainPaths())


if __name__ == "__main__":
    run_stage(main)
