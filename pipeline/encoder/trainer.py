"""The Lightning ``Trainer`` of the training stages and what runs around ``fit``: building
it from the ``trainer`` section and the stage's :class:`TrainParams`, fitting (resuming an
interrupted run), and predicting with the trained classifier outside Lightning."""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from torch.utils.data import DataLoader

from pipeline.encoder import inference
from pipeline.encoder.callbacks import BestWeights, EpochCheckpoint, LossCurve, StepProgressBar
from pipeline.encoder.checkpoints import last_checkpoint
from pipeline.encoder.model import Classifier
from pipeline.encoder.modules import EncoderModule
from pipeline.encoder.params import Precision, TrainerParams, TrainParams
from pipeline.tracking import CurveSink


@rank_zero_only
def say(message: str) -> None:
    """Print once (global rank 0), so DDP runs do not repeat every line."""
    print(message, flush=True)


def quiet_lightning() -> None:
    """One line per milestone: drop Lightning's informational chatter (GPU/TPU lines,
    product tips, ``Trainer.fit stopped``) and one known deprecation warning that Lightning
    triggers inside torch on every run; real warnings still show."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )


def trainer_callbacks(
    trainer_params: TrainerParams,
    cfg: TrainParams,
    callbacks: list[Callback],
    checkpoints: Path | None,
) -> list[Callback]:
    """The stage's ``callbacks``, then the progress bar (if shown and rich is installed),
    early stopping on :class:`BestWeights`' metric (else ``val_loss``) and, last so that
    it saves the other callbacks' final state, :class:`EpochCheckpoint`."""
    if trainer_params.progress_bar and _RICH_AVAILABLE:
        callbacks = [*callbacks, StepProgressBar()]
    if cfg.early_stop_patience is not None:
        monitor = next((cb for cb in callbacks if isinstance(cb, BestWeights)), None)
        key, mode = (monitor.monitor, monitor.mode) if monitor else ("val_loss", "min")
        callbacks = [
            *callbacks,
            EarlyStopping(monitor=key, mode=mode, patience=cfg.early_stop_patience),
        ]
    if checkpoints is not None:
        callbacks = [*callbacks, EpochCheckpoint(checkpoints)]
    return callbacks


def build_trainer(
    trainer_params: TrainerParams,
    cfg: TrainParams,
    callbacks: list[Callback],
    checkpoints: Path | None = None,
    *,
    curve_sink: CurveSink | None = None,
    **overrides: Any,
) -> L.Trainer:
    """A Trainer from the ``trainer`` section and the stage's optimizer/budget section.

    Args:
        trainer_params: Where and how Lightning runs.
        cfg: The stage's budget, clipping, accumulation and validation interval.
        callbacks: The stage's callbacks, first in the trainer's list.
        checkpoints: Folder where Lightning saves ``last.ckpt`` at the end of every epoch,
            to resume an interrupted run (see
            :func:`pipeline.encoder.checkpoints.checkpoint_folder`); None: no checkpoints.
        curve_sink: Given to the :class:`LossCurve` callbacks (the stage's MLflow run).
        **overrides: Passed straight to ``L.Trainer`` (tests pass limits).

    Returns:
        The trainer; the stage writes its outputs itself, atomically.
    """
    quiet_lightning()
    for callback in callbacks:
        if isinstance(callback, LossCurve) and curve_sink is not None:
            callback.sink = curve_sink
    kwargs: dict[str, Any] = {
        "accelerator": trainer_params.accelerator,
        "devices": trainer_params.devices,
        "strategy": trainer_params.strategy,
        "num_nodes": trainer_params.num_nodes,
        "precision": trainer_params.precision,
        "deterministic": trainer_params.deterministic,
        "max_steps": cfg.max_steps if cfg.max_steps is not None else -1,
        "max_epochs": cfg.max_epochs if cfg.max_epochs is not None else -1,
        "max_time": timedelta(minutes=cfg.max_minutes) if cfg.max_minutes else None,
        "gradient_clip_val": cfg.grad_clip,
        "accumulate_grad_batches": cfg.accumulate,
        "callbacks": trainer_callbacks(trainer_params, cfg, callbacks, checkpoints),
        "logger": False,  # curves go to MLflow through LossCurve's sink
        "enable_checkpointing": False,  # Lightning's own; EpochCheckpoint writes ours
        "enable_progress_bar": trainer_params.progress_bar,
        "enable_model_summary": False,  # the stage prints its parameter counts itself
        "log_every_n_steps": trainer_params.log_every_n_steps,
        "num_sanity_val_steps": 0,
    }
    if cfg.val_every_steps is not None:
        # Lightning counts batches here, not optimizer steps, across epoch boundaries.
        kwargs["val_check_interval"] = cfg.val_every_steps * cfg.accumulate
        kwargs["check_val_every_n_epoch"] = None
    kwargs.update(overrides)
    if trainer_params.threads is not None:
        # Tiny models run faster on one thread than on two busy cores (smoke runs, tests).
        torch.set_num_threads(trainer_params.threads)
    return L.Trainer(**kwargs)


def maybe_compile(module: L.LightningModule, trainer_params: TrainerParams) -> L.LightningModule:
    """``torch.compile`` the module when the trainer section asks (Lightning unwraps it)."""
    return torch.compile(module) if trainer_params.compile else module  # type: ignore[return-value]


@dataclass(frozen=True)
class Fitted:
    """What a finished ``trainer.fit`` leaves for the stage's report."""

    trainer: L.Trainer
    seconds: float
    resumed: bool


@dataclass(frozen=True)
class FitOptions:
    """How one training stage's fit runs, besides its params.

    Attributes:
        checkpoints: The resume-checkpoint folder (see :func:`build_trainer`); None: none.
        curve_sink: Receives the loss-curve rows as they are made (the MLflow run).
        trainer_overrides: Passed straight to ``L.Trainer`` (tests pass limits).
    """

    checkpoints: Path | None = None
    curve_sink: CurveSink | None = None
    trainer_overrides: Mapping[str, Any] = field(default_factory=dict)


def fit_module(
    module: EncoderModule,
    data: L.LightningDataModule,
    callbacks: list[Callback],
    trainer_params: TrainerParams,
    options: FitOptions,
) -> Fitted:
    """Build the trainer and fit ``module`` (with its own ``cfg``), resuming the
    interrupted run of the same params and inputs when its checkpoint exists."""
    trainer = build_trainer(
        trainer_params,
        module.cfg,
        callbacks,
        options.checkpoints,
        curve_sink=options.curve_sink,
        **options.trainer_overrides,
    )
    resume = last_checkpoint(options.checkpoints)
    if resume is not None:
        say(f"{module.stage}: resuming the interrupted run from {resume}")
    start = time.perf_counter()
    trainer.fit(maybe_compile(module, trainer_params), datamodule=data, ckpt_path=resume)
    return Fitted(trainer, time.perf_counter() - start, resume is not None)


def predict_logits(
    model: Classifier, loader: DataLoader, device: torch.device, precision: Precision
) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, float64 logits) for every document of ``loader``, in one process.

    Prediction happens once, after training, outside Lightning's distributed loop, so
    no sampler pads or splits the split across ranks. It runs on a copy, so the trained
    model stays where Lightning left it; the loop is the served model's
    (:func:`pipeline.encoder.inference.predict_logits`).
    """
    model = copy.deepcopy(model).to(device).eval()
    return inference.predict_logits(model, loader, device, precision)
