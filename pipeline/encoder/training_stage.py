"""What the ``pretrain`` and ``finetune`` stages share around training: their paths, their
thin ``main()`` (sections, resume folder, MLflow run), the report keys every training run
has, and the outputs written next to the weights (loss-curve CSVs, JSON report)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from pipeline import paths
from pipeline.config import Section, load_section, load_seed
from pipeline.encoder.callbacks import LossCurve
from pipeline.encoder.checkpoints import checkpoint_folder
from pipeline.encoder.collate import ClassifyCollator
from pipeline.encoder.data import LMCollator, TokenizedDataModule
from pipeline.encoder.model import ModelParams, save_model
from pipeline.encoder.modules import EncoderModule
from pipeline.encoder.params import DISPLAY_ONLY, TrainerParams, TrainParams
from pipeline.encoder.tokens import DocumentTokens
from pipeline.encoder.trainer import FitOptions, Fitted
from pipeline.io import atomic_outputs, write_json
from pipeline.tracking import StageRun, split_report

FINAL_METRICS = {
    # report key -> MLflow name (under the stage's prefix); the rest of the report's
    # scalars are params (report.*). The final validation loss is the curve's last point.
    "val_perplexity": "val_perplexity",
    "validation_accuracy": "selected_val_accuracy",  # finetune: of the kept weights
    "validation_nll": "selected_val_nll",
    "train_tokens_per_second": "train_tokens_per_second",
    "train_minutes": "train_minutes",
}


@dataclass(frozen=True)
class TrainingPaths:
    """The files a training stage reads and writes.

    Attributes:
        tokenized: The ``tokenize`` stage's splits (read).
        tokenizer: The tokenizer file, for the vocabulary size (read).
        model: Folder of the trained weights and their config (written).
        report: The stage's JSON report (written).
        curves: Folder of the ``train.csv`` and ``validation.csv`` loss curves (written).
        predictions: Folder of the logits table, for a stage that predicts (written).
    """

    tokenized: Path
    tokenizer: Path
    model: Path
    report: Path
    curves: Path
    predictions: Path | None = None

    def inputs(self) -> list[Path]:
        """The inputs whose contents key the resume checkpoint (where they exist)."""
        return [self.tokenized, self.tokenizer]


@dataclass(frozen=True)
class PretrainPaths(TrainingPaths):
    """The files of ``pretrain``; the defaults are the pipeline's."""

    tokenized: Path = paths.TOKENIZED
    tokenizer: Path = paths.TOKENIZER
    model: Path = paths.PRETRAINED
    report: Path = paths.stage_report("pretrain")
    curves: Path = paths.curves_dir("pretrain")


@dataclass(frozen=True)
class FinetunePaths(TrainingPaths):
    """The files of ``finetune`` (defaults: the pipeline's), with the ``pretrained``
    weights it reads with ``finetune.init: pretrained``."""

    tokenized: Path = paths.TOKENIZED
    tokenizer: Path = paths.TOKENIZER
    model: Path = paths.CLASSIFIER
    report: Path = paths.stage_report("finetune")
    curves: Path = paths.curves_dir("finetune")
    predictions: Path = paths.predictions_dir("transformer")
    pretrained: Path = paths.PRETRAINED

    def inputs(self) -> list[Path]:
        return [self.tokenized, self.tokenizer, self.pretrained]


TrainFunction = Callable[..., dict[str, Any] | None]
"""A stage's training function: ``(model_params, params, trainer_params, seed, files,
options)`` -> the report on global rank 0, None on the other ranks."""


def training_stage_main(
    stage: str, params_cls: type[Section], train: TrainFunction, files: TrainingPaths
) -> None:
    """The thin ``main()`` of ``pretrain`` and ``finetune``.

    Reads the ``model``, stage and ``trainer`` sections, opens the stage's MLflow run
    before training (an unreachable server fails now, not after), trains (resuming from
    the checkpoint of an interrupted run of the same params and inputs) while the curve
    rows go to the run as ``<stage>/train_loss``, ``<stage>/val_loss``..., then completes
    it with the stage's final numbers at its last step.
    """
    model_params = load_section("model", ModelParams)
    params = load_section(stage, params_cls)
    trainer_params = load_section("trainer", TrainerParams)
    seed = load_seed()
    stage_run = StageRun(stage)
    sections = {
        "seed": seed,
        "model": model_params.model_dump(),
        stage: params.model_dump(),
        "trainer": trainer_params.model_dump(exclude=set(DISPLAY_ONLY)),
    }
    checkpoints = checkpoint_folder(stage, sections, [p for p in files.inputs() if p.exists()])
    options = FitOptions(checkpoints, stage_run.curve_logger(stage))
    result = train(model_params, params, trainer_params, seed, files, options)
    if result is not None:  # rank 0 only
        summary, stats = final_numbers(stage, result)
        stage_run.finish(
            ["seed", "model", stage],
            metrics=summary,
            step=int(result.get("steps", 0)),
            report=stats,
            params={"trainer": sections["trainer"]},
            artifacts=[files.report, files.curves],
        )


def final_numbers(stage: str, result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a training report into ``<stage>/...`` metrics and the scalars left for params."""
    return split_report(stage, result, FINAL_METRICS, skip=("val_loss",))


def training_summary(
    fitted: Fitted, module: EncoderModule, counts: dict[str, int]
) -> dict[str, Any]:
    """The report keys both training stages share: budget, speed and size."""
    trainer = fitted.trainer
    tokens = module.train_tokens * trainer.world_size  # real tokens, this run
    return {
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "train_minutes": round(fitted.seconds / 60, 3),
        "train_tokens": tokens,
        "train_tokens_per_second": round(tokens / fitted.seconds, 1),
        "world_size": trainer.world_size,
        "parameters": counts,
        "resumed": fitted.resumed,
    }


def stage_datamodule(
    splits: dict[str, DocumentTokens],
    cfg: TrainParams,
    trainer_params: TrainerParams,
    seed: int,
    train_collate: LMCollator | ClassifyCollator,
    eval_collate: LMCollator | ClassifyCollator,
) -> TokenizedDataModule:
    """The datamodule of a training stage: batch sizes from ``cfg``, workers from
    ``trainer_params``, the train order seeded by ``seed``."""
    return TokenizedDataModule(
        splits,
        train_collate=train_collate,
        eval_collate=eval_collate,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size,
        num_workers=trainer_params.num_workers,
        seed=seed,
    )


def write_training_outputs(
    model: nn.Module,
    config: dict[str, Any],
    curve: LossCurve,
    result: dict[str, Any],
    files: TrainingPaths,
    table: pd.DataFrame | None = None,
) -> None:
    """Weights + config, the two loss curves, the JSON report and the logits ``table``
    (into ``files.predictions``), all or nothing (one :func:`pipeline.io.atomic_outputs`
    block).

    Raises:
        ValueError: a ``table`` without ``files.predictions``.
    """
    with atomic_outputs() as out:
        save_model(model, out.dir(files.model), config)
        curve_dir = out.dir(files.curves)
        write_curve(curve_dir / "train.csv", curve.train)
        write_curve(curve_dir / "validation.csv", curve.val)
        write_json(out.file(files.report), result)
        if table is not None:
            if files.predictions is None:
                raise ValueError("a logits table needs files.predictions")
            table.to_parquet(out.dir(files.predictions) / paths.PREDICTIONS_FILE, index=False)


def write_curve(path: Path, rows: list[dict[str, float]]) -> None:
    """A CSV for DVC plots: one row per step, columns in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = [",".join(columns)]
    lines += [",".join(_fmt(row.get(c)) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else f"{value:.6g}"
