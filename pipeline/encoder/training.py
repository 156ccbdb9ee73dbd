"""Lightning pieces shared by ``pretrain`` and ``finetune``.

- :class:`TrainerParams` (the ``trainer`` section: device, strategy, precision) and
  :class:`TrainParams` (optimizer, schedule and budget, the common part of the
  ``pretrain`` and ``finetune`` sections).
- :class:`LMModule` and :class:`ClassifierModule`, thin LightningModules around the plain
  torch models of :mod:`pipeline.encoder.model`.
- AdamW with decoupled weight decay on matrices only, optional layer-wise LR decay, and a
  step-based warmup + cosine/linear schedule. The schedule's horizon is the step budget
  (``max_steps``/``max_epochs``), never the wall clock, so a run's LR curve and results do
  not depend on machine speed; ``max_minutes`` is a safety cap on top.
- A non-finite loss stops training with :class:`NonFiniteLossError` on every rank.
- Callbacks that keep the best weights in memory (checkpoint selection on validation
  without files to clean up or share between ranks) and record loss curves for DVC plots.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.callbacks import Callback, EarlyStopping, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pipeline import paths
from pipeline.config import Section
from pipeline.encoder import inference
from pipeline.encoder.model import Classifier, LanguageModel, model_inputs, save_model
from pipeline.errors import PipelineError
from pipeline.io import Outputs, sha256_file, write_json

Precision = Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true"]
Schedule = Literal["cosine", "linear", "constant"]
CurveSink = Callable[[Mapping[str, float], int], None]
"""Receives each curve row as it is made: ``{"train_loss": v}`` at an optimizer step."""

DISPLAY_ONLY = frozenset({"progress_bar"})
"""``trainer`` keys that change what the console shows, never what is trained or written:
not DVC params of any stage (dvc.yaml lists the other ``trainer`` keys one by one, a test
keeps the two lists in step), not part of the resume key, not logged to MLflow."""


class TrainerParams(Section):
    """The ``trainer`` section: where and how Lightning runs (not what it trains)."""

    accelerator: Literal["cpu", "gpu", "cuda", "mps", "auto"] = Field(
        description="Lightning accelerator."
    )
    devices: Annotated[int, Field(ge=-1)] | Literal["auto"] = Field(
        description="Devices (processes) per node; -1: every device."
    )
    strategy: str = Field(
        description="Lightning strategy: auto, ddp, ddp_spawn, ddp_find_unused_parameters_true "
        "(needed with finetune.freeze_epochs under DDP)."
    )
    num_nodes: int = Field(ge=1, description="Machines of a multi-node run.")
    precision: Precision = Field(description="32-true, bf16-mixed, 16-mixed, bf16-true or 64-true.")
    deterministic: bool | Literal["warn"] = Field(
        description="true: deterministic kernels (identical metrics for a fixed seed); warn: "
        "only warn about non-deterministic ones."
    )
    compile: bool = Field(
        description="torch.compile the LightningModule (needs a C compiler; pays off on GPU)."
    )
    num_workers: int = Field(
        ge=0,
        description="DataLoader worker processes per training process (0: collate in the main "
        "process, best on 2 cores).",
    )
    threads: int | None = Field(
        ge=1,
        description="torch intra-op threads per process (null: torch's default); 1 suits tiny "
        "models.",
    )
    log_every_n_steps: int = Field(
        ge=1,
        description="Optimizer steps between loss-curve points (and Lightning's logging interval).",
    )
    progress_bar: bool = Field(
        description="Show the progress bar (display only: not a DVC param, reruns nothing)."
    )

    @field_validator("devices")
    @classmethod
    def _some_devices(cls, devices: int | str) -> int | str:
        if devices == 0:
            raise ValueError("0 devices: use -1 (all), 'auto' or a positive count")
        return devices


class TrainParams(Section):
    """Optimizer, schedule and budget; ``pretrain`` and ``finetune`` extend this."""

    batch_size: int = Field(ge=1, description="Sequences per micro-batch, per process.")
    eval_batch_size: int | None = Field(
        ge=1, description="Sequences per validation/prediction batch (null: batch_size)."
    )
    lr: float = Field(
        gt=0.0, le=10.0, description="Peak AdamW learning rate, reached after warmup_fraction."
    )
    embedding_lr: float | None = Field(
        gt=0.0,
        le=10.0,
        description="The token embedding's own peak LR, same schedule (null: lr).",
    )
    weight_decay: float = Field(
        ge=0.0,
        le=10.0,
        description="Decoupled weight decay on weight matrices (not biases, norms, embeddings).",
    )
    adam_beta1: float = Field(ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(ge=0.0, lt=1.0, description="AdamW beta2.")
    schedule: Schedule = Field(
        description="After warmup: cosine or linear decay to min_lr_ratio x lr, or constant."
    )
    warmup_fraction: float = Field(
        ge=0.0, lt=1.0, description="Share of the steps with a linear LR warmup."
    )
    min_lr_ratio: float = Field(
        ge=0.0, le=1.0, description="Final LR as a share of lr (cosine and linear schedules)."
    )
    grad_clip: float | None = Field(
        gt=0.0, description="Clip the global gradient norm to this (null: no clipping)."
    )
    accumulate: int = Field(ge=1, description="Micro-batches per optimizer step.")
    max_steps: int | None = Field(
        ge=1,
        description="Budget in optimizer steps; it also sets the LR schedule's length (null: "
        "max_epochs).",
    )
    max_epochs: int | None = Field(
        ge=1, description="Budget in epochs when max_steps is null (set one of the two)."
    )
    max_minutes: float | None = Field(
        gt=0.0,
        description="Wall-clock cap in minutes, a safety net: stopping early truncates the "
        "schedule (null: none).",
    )
    val_every_steps: int | None = Field(
        ge=1,
        description="Validate every this many optimizer steps (null: at each epoch's end); "
        "also the validation-curve points.",
    )
    early_stop_patience: int | None = Field(
        ge=1, description="Stop after this many validations without improvement (null: never)."
    )

    @model_validator(mode="after")
    def _check_budget(self) -> TrainParams:
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("max_steps/max_epochs: set one (the LR schedule needs a horizon)")
        return self


class NonFiniteLossError(PipelineError):
    """Training produced a NaN or infinite loss."""


# --------------------------------------------------------------------------- optimizer


def _depth(name: str, n_layers: int) -> int:
    """Layer depth for layer-wise LR decay: embeddings 0, block i -> i + 1, the rest top."""
    parts = name.split(".")
    if "encoder" in parts:
        sub = parts[parts.index("encoder") + 1]
        if sub in ("tok_emb", "pos_emb"):
            return 0
        if sub == "blocks":
            return int(parts[parts.index("encoder") + 2]) + 1
    return n_layers + 1


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    n_layers: int,
    layer_decay: float = 1.0,
    embedding_lr: float | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and embeddings; with
    ``layer_decay < 1`` a parameter at depth d gets ``lr * layer_decay ** (top - d)``, so
    lower (more general) layers move less when fine-tuning. ``embedding_lr`` gives the
    token embedding its own peak LR: from random rows, a short run moves rare tokens'
    rows too little at the encoder's LR."""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if embedding_lr is not None and name.startswith("encoder.tok_emb."):
            key = (-1, False)
            groups.setdefault(key, {"params": [], "lr": embedding_lr, "weight_decay": 0.0})
            groups[key]["params"].append(param)
            continue
        depth = _depth(name, n_layers)
        decay = param.ndim >= 2 and "emb" not in name
        key = (depth, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": lr * layer_decay ** (n_layers + 1 - depth),
                "weight_decay": weight_decay if decay else 0.0,
            }
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


class WarmupDecay:
    """LR multiplier: linear warmup, then cosine or linear decay to ``min_ratio``."""

    def __init__(self, total: int, warmup: int, schedule: Schedule, min_ratio: float) -> None:
        self.total, self.warmup, self.schedule, self.min_ratio = total, warmup, schedule, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = (
            0.5 * (1 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1 - progress
        )
        return self.min_ratio + (1 - self.min_ratio) * shape


def configure_adamw(
    module: L.LightningModule,
    net: nn.Module,
    run: TrainParams,
    n_layers: int,
    layer_decay: float,
) -> dict[str, Any]:
    """Optimizer + per-step scheduler for ``configure_optimizers``."""
    groups = param_groups(net, run.lr, run.weight_decay, n_layers, layer_decay, run.embedding_lr)
    optimizer = torch.optim.AdamW(groups, lr=run.lr, betas=(run.adam_beta1, run.adam_beta2))
    total = module.trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise PipelineError("cannot size the LR schedule: set max_steps or max_epochs")
    total = int(total)
    warmup = int(run.warmup_fraction * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupDecay(total, warmup, run.schedule, run.min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ----------------------------------------------------------------------------- modules


class _Base(L.LightningModule):
    """Loss checks shared by both modules."""

    last_train_loss: float = float("nan")
    train_tokens: int = 0  # real (non-pad) tokens seen by this rank, for throughput
    stage: str  # the DVC stage that trains this module, for messages

    def _check_finite(self, loss: Tensor) -> None:
        bad = not bool(torch.isfinite(loss))
        # Decide on every rank together, so one NaN rank cannot leave the others waiting.
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise NonFiniteLossError(
                f"training loss became {loss.item() if bad else 'non-finite on another rank'} "
                f"at step {self.global_step} (epoch {self.current_epoch}); lower the learning "
                "rate, keep gradient clipping on, or use 32-bit precision"
            )
        self.last_train_loss = float(loss.detach())


class LMModule(_Base):
    """Language-model pretraining (masked or causal) of :class:`.LanguageModel`."""

    stage = "pretrain"

    def __init__(self, model: LanguageModel, run: TrainParams) -> None:
        super().__init__()
        self.model = model
        self.run = run
        self.val_loss = torchmetrics.MeanMetric()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        self.train_tokens += int(batch["attention_mask"].sum())
        self._check_finite(loss)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss = self.model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        # Weighted by masked tokens: the held-out loss is a per-token average.
        self.val_loss.update(loss, weight=(batch["labels"] != -100).sum())
        self.log("val_loss", self.val_loss, prog_bar=True, on_epoch=True)

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_adamw(self, self.model, self.run, self.model.encoder.params.n_layers, 1.0)


class ClassifierModule(_Base):
    """Fine-tuning of :class:`pipeline.encoder.model.Classifier` with cross-entropy.

    ``freeze_epochs``: the encoder runs without gradients for the first epochs (only the
    head learns), which protects pretrained features from a random head's first
    gradients. Under DDP that leaves encoder parameters unused: use the
    ``ddp_find_unused_parameters_true`` strategy then.
    """

    stage = "finetune"

    def __init__(
        self,
        model: Classifier,
        run: TrainParams,
        *,
        n_classes: int,
        label_smoothing: float = 0.0,
        freeze_epochs: int = 0,
        layer_lr_decay: float = 1.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.run = run
        self.label_smoothing = label_smoothing
        self.freeze_epochs = freeze_epochs
        self.layer_lr_decay = layer_lr_decay
        self.val_loss = torchmetrics.MeanMetric()
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(n_classes, average="micro")

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(**model_inputs(batch))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        frozen = self.current_epoch < self.freeze_epochs
        with torch.set_grad_enabled(not frozen):
            doc = self.model.embed(batch["input_ids"], batch["attention_mask"], batch["chunk_mask"])
        self.train_tokens += int(batch["attention_mask"].sum())
        logits = self.model.classify(doc).float()
        loss = F.cross_entropy(logits, batch["labels"], label_smoothing=self.label_smoothing)
        self._check_finite(loss)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch).float()
        # Plain cross-entropy (no smoothing): the NLL that calibration cares about.
        loss = F.cross_entropy(logits, batch["labels"])
        self.val_loss.update(loss, weight=len(batch["labels"]))
        self.val_acc.update(logits, batch["labels"])
        self.log("val_loss", self.val_loss, prog_bar=True, on_epoch=True)
        self.log("val_acc", self.val_acc, prog_bar=True, on_epoch=True)

    def configure_optimizers(self) -> dict[str, Any]:
        n_layers = self.model.encoder.params.n_layers
        return configure_adamw(self, self.model, self.run, n_layers, self.layer_lr_decay)


# --------------------------------------------------------------------------- callbacks


class BestWeights(Callback):
    """Keeps a CPU copy of ``pl_module.model``'s weights at the best validation score."""

    def __init__(self, monitor: str = "val_loss", mode: Literal["min", "max"] = "min") -> None:
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_step: int | None = None
        self.state: dict[str, Tensor] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        better = self.best is None or (
            value < self.best if self.mode == "min" else value > self.best
        )
        if better and math.isfinite(value):
            self.best, self.best_step = value, trainer.global_step
            model = pl_module.model  # type: ignore[attr-defined]
            self.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:  # kept in resume checkpoints
        return {"best": self.best, "best_step": self.best_step, "state": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.state = state["best"], state["best_step"], state["state"]


class LossCurve(Callback):
    """Training loss every ``every`` optimizer steps (mean over the micro-batches since
    the previous row, this rank) and validation metrics at each validation.

    The rows are the DVC CSV curves; with a ``sink`` (the stage's MLflow run, see
    :meth:`pipeline.tracking.StageRun.curve_logger`) every row is also sent there as it is
    made, as ``train_<column>`` / ``val_<column>`` at the row's step, so both views show
    the same points. Rows restored from a resume checkpoint are sent again (the
    interrupted run's MLflow run is not the new one).
    """

    def __init__(
        self,
        every: int = 10,
        val_keys: tuple[str, ...] = ("val_loss",),
        sink: CurveSink | None = None,
    ) -> None:
        self.every, self.val_keys, self.sink = every, val_keys, sink
        self.train: list[dict[str, float]] = []
        self.val: list[dict[str, float]] = []
        self._sum, self._n = 0.0, 0
        self._sent = {"train": 0, "val": 0}  # rows already given to the sink

    def _send(self) -> None:
        if self.sink is None:
            return
        for kind, rows in (("train", self.train), ("val", self.val)):
            for row in rows[self._sent[kind] :]:
                values = {f"{kind}_{k}": v for k, v in row.items() if k != "step"}
                self.sink(values, int(row["step"]))
            self._sent[kind] = len(rows)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        self._sum += float(pl_module.last_train_loss)  # type: ignore[attr-defined]
        self._n += 1
        step = trainer.global_step
        last_logged = self.train[-1]["step"] if self.train else 0
        if step > last_logged and step % self.every == 0 and self._n:
            self.train.append({"step": step, "loss": self._sum / self._n})
            self._sum, self._n = 0.0, 0
        if trainer.is_global_zero:
            self._send()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = {"step": trainer.global_step}
        for key in self.val_keys:
            if key in trainer.callback_metrics:
                row[key.removeprefix("val_")] = float(trainer.callback_metrics[key])
        if self.val and self.val[-1]["step"] == row["step"]:
            if self.val[-1] != row:  # a final validate() at the last fit step
                self.val[-1] = row
                self._sent["val"] = min(self._sent["val"], len(self.val) - 1)
        else:
            self.val.append(row)
        if trainer.is_global_zero:
            self._send()

    def state_dict(self) -> dict[str, Any]:  # kept in resume checkpoints
        return {"train": self.train, "val": self.val, "sum": self._sum, "n": self._n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train, self.val = list(state["train"]), list(state["val"])
        self._sum, self._n = state["sum"], state["n"]
        self._sent = {"train": 0, "val": 0}


class EpochSeed(Callback):
    """Reseeds Python, NumPy and torch at the start of every training epoch from
    (seed, epoch): an epoch's randomness (windows, masks, dropout) then depends only on the
    state it starts from, so a run resumed from an end-of-epoch checkpoint continues
    exactly like an uninterrupted one (same weights at the end, tested)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = (self.seed * 1_000_003 + trainer.current_epoch) % 2**32
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)


# ----------------------------------------------------------------------- checkpoints

"""Resume checkpoints live here, outside every DVC output (DVC deletes a stage's outputs
before running it) and git-ignored: ``.checkpoints/<stage>/<key>/last.ckpt``."""


def checkpoint_folder(stage: str, params: dict[str, Any], inputs: list[Path]) -> Path:
    """The checkpoint folder of one stage run: its key hashes the stage's params and the
    contents of its inputs, so only a rerun of the same stage, params and data resumes."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for root in map(Path, inputs):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            digest.update(str(path.relative_to(root.parent)).encode())
            digest.update(sha256_file(path).encode())
    return paths.CHECKPOINTS / stage / digest.hexdigest()[:16]


class EpochCheckpoint(Callback):
    """``last.ckpt`` in ``folder`` at the end of every training epoch: weights, optimizer,
    schedule, loop position and the callbacks' states (Lightning writes it through a
    temporary file, so a kill mid-write leaves the previous one whole)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.folder / "last.ckpt", weights_only=False)  # all of it


def last_checkpoint(folder: Path | None) -> Path | None:
    """The checkpoint to resume from, if an interrupted run of the same key left one."""
    if folder is None:
        return None
    path = folder / "last.ckpt"
    return path if path.is_file() else None


def discard_checkpoints(folder: Path | None) -> None:
    """After a successful run: the stage's checkpoints (every key) are not needed anymore."""
    if folder is not None and folder.parent.is_dir():
        shutil.rmtree(folder.parent, ignore_errors=True)
        with contextlib.suppress(OSError):  # the root too, once no stage has checkpoints
            folder.parent.parent.rmdir()


# ----------------------------------------------------------------------------- trainer


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, reading ``Epoch 3`` rather than ``Epoch 3/-2`` when the budget
    is in steps (``max_epochs`` unset: Lightning passes -1 and prints ``max_epochs - 1``)."""

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        text = f"Epoch {current_epoch} (to step {self.trainer.max_steps})"
        return text.ljust(len(self.validation_description))


def quiet_lightning() -> None:
    """One line per milestone: drop Lightning's informational chatter (GPU/TPU lines,
    product tips, ``Trainer.fit stopped``) and one known deprecation warning that Lightning
    2.6 triggers inside torch on every run; real warnings still show."""
    import logging
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )


def build_trainer(
    tp: TrainerParams,
    run: TrainParams,
    callbacks: list[Callback],
    checkpoints: Path | None = None,
    **overrides: Any,
) -> L.Trainer:
    """A Trainer from the two sections. The stage writes its outputs itself, atomically;
    with ``checkpoints``, Lightning also saves ``last.ckpt`` there at the end of every
    epoch, to resume an interrupted run (see :func:`checkpoint_folder`). ``overrides`` go
    straight to ``L.Trainer`` (the stages pass their MLflow ``logger`` this way; tests pass
    limits); ``curve_sink`` is given to the :class:`LossCurve` callbacks."""
    quiet_lightning()
    sink = overrides.pop("curve_sink", None)
    for callback in callbacks:
        if isinstance(callback, LossCurve) and sink is not None:
            callback.sink = sink
    if tp.progress_bar:
        from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

        if _RICH_AVAILABLE:
            callbacks = [*callbacks, StepProgressBar()]
    if run.early_stop_patience is not None:
        monitor = next((cb for cb in callbacks if isinstance(cb, BestWeights)), None)
        key, mode = (monitor.monitor, monitor.mode) if monitor else ("val_loss", "min")
        callbacks = [
            *callbacks,
            EarlyStopping(monitor=key, mode=mode, patience=run.early_stop_patience),
        ]
    kwargs: dict[str, Any] = {
        "accelerator": tp.accelerator,
        "devices": tp.devices,
        "strategy": tp.strategy,
        "num_nodes": tp.num_nodes,
        "precision": tp.precision,
        "deterministic": tp.deterministic,
        "max_steps": run.max_steps if run.max_steps is not None else -1,
        "max_epochs": run.max_epochs if run.max_epochs is not None else -1,
        "max_time": timedelta(minutes=run.max_minutes) if run.max_minutes else None,
        "gradient_clip_val": run.grad_clip,
        "accumulate_grad_batches": run.accumulate,
        "callbacks": callbacks,
        "logger": False,  # curves go to MLflow through LossCurve's sink
        "enable_checkpointing": False,  # Lightning's own; EpochCheckpoint writes ours
        "enable_progress_bar": tp.progress_bar,
        "enable_model_summary": False,  # the stage prints its parameter counts itself
        "log_every_n_steps": tp.log_every_n_steps,
        "num_sanity_val_steps": 0,
    }
    if checkpoints is not None:  # last, so it saves the other callbacks' final state
        kwargs["callbacks"] = [*kwargs["callbacks"], EpochCheckpoint(checkpoints)]
    if run.val_every_steps is not None:
        # Lightning counts batches here, not optimizer steps, across epoch boundaries.
        kwargs["val_check_interval"] = run.val_every_steps * run.accumulate
        kwargs["check_val_every_n_epoch"] = None
    kwargs.update(overrides)
    if tp.threads is not None:
        # Tiny models run faster on one thread than on two busy cores (smoke runs, tests).
        torch.set_num_threads(tp.threads)
    return L.Trainer(**kwargs)


def maybe_compile(module: L.LightningModule, tp: TrainerParams) -> L.LightningModule:
    """``torch.compile`` the module when the trainer section asks (Lightning unwraps it)."""
    return torch.compile(module) if tp.compile else module  # type: ignore[return-value]


@dataclass(frozen=True)
class Fitted:
    """What a finished ``trainer.fit`` leaves for the stage's report."""

    trainer: L.Trainer
    seconds: float
    resumed: bool


def fit_module(
    module: _Base,
    data: L.LightningDataModule,
    callbacks: list[Callback],
    tp: TrainerParams,
    checkpoints: Path | None,
    **overrides: Any,
) -> Fitted:
    """Build the trainer and fit ``module`` (with its own ``run`` params), resuming the
    interrupted run of the same params and inputs when its checkpoint exists."""
    trainer = build_trainer(tp, module.run, callbacks, checkpoints, **overrides)
    resume = last_checkpoint(checkpoints)
    if resume is not None:
        say(f"{module.stage}: resuming the interrupted run from {resume}")
    start = time.perf_counter()
    trainer.fit(maybe_compile(module, tp), datamodule=data, ckpt_path=resume)
    return Fitted(trainer, time.perf_counter() - start, resume is not None)


def run_summary(fitted: Fitted, module: _Base, counts: dict[str, int]) -> dict[str, Any]:
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


def write_training_outputs(
    out: Outputs,
    model: nn.Module,
    config: dict[str, Any],
    curve: LossCurve,
    result: dict[str, Any],
    out_model: Path,
    curves: Path,
    report: Path,
) -> None:
    """Weights + config, the two loss curves and the JSON report, inside ``out``."""
    save_model(model, out.dir(out_model), config)
    curve_dir = out.dir(curves)
    write_curve(curve_dir / "train.csv", curve.train)
    write_curve(curve_dir / "validation.csv", curve.val)
    write_json(out.file(report), result)


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


@rank_zero_only
def say(message: str) -> None:
    """Print once (global rank 0), so DDP runs do not repeat every line."""
    print(message, flush=True)


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


def training_stage_main(
    stage: str,
    params_cls: type[Section],
    run: Callable[..., dict[str, Any] | None],
    report: Path,
    curves: Path,
    inputs: list[Path],
) -> None:
    """The thin ``main()`` of ``pretrain`` and ``finetune``: read the ``model``, stage and
    ``trainer`` sections, open the stage's MLflow run before training (an unreachable
    server fails now, not after), train (resuming from the checkpoint of an interrupted
    run of the same params and ``inputs``) while the curve rows go to the run as
    ``<stage>/train_loss``, ``<stage>/val_loss``..., then complete it with the stage's
    final numbers at its last step."""
    from pipeline.config import load_section, load_seed
    from pipeline.encoder.model import ModelParams
    from pipeline.tracking import StageRun

    model_params = load_section("model", ModelParams)
    params = load_section(stage, params_cls)
    trainer_params = load_section("trainer", TrainerParams)
    seed = load_seed()
    tracking = StageRun(stage)
    sections = {
        "seed": seed,
        "model": model_params.model_dump(),
        stage: params.model_dump(),
        "trainer": trainer_params.model_dump(exclude=set(DISPLAY_ONLY)),
    }
    checkpoints = checkpoint_folder(stage, sections, [p for p in inputs if p.exists()])
    sink = tracking.curve_logger(stage)
    extra = {"curve_sink": sink} if sink else {}
    result = run(model_params, params, trainer_params, seed, checkpoints=checkpoints, **extra)
    if result is not None:  # rank 0 only
        summary, stats = final_numbers(stage, result)
        tracking.finish(
            ["seed", "model", stage],
            metrics=summary,
            step=int(result.get("steps", 0)),
            report=stats,
            params={"trainer": sections["trainer"]},
            artifacts=[report, curves],
        )


FINAL_METRICS = {
    # report key -> MLflow name (under the stage's prefix); the rest of the report's
    # scalars are params (report.*). The final validation loss is the curve's last point.
    "val_perplexity": "val_perplexity",
    "validation_accuracy": "selected_val_accuracy",  # finetune: of the kept weights
    "validation_nll": "selected_val_nll",
    "train_tokens_per_second": "train_tokens_per_second",
    "train_minutes": "train_minutes",
}


def final_numbers(stage: str, result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a training report into ``<stage>/...`` metrics and the scalars left for params."""
    from pipeline.tracking import split_report

    return split_report(stage, result, FINAL_METRICS, skip=("val_loss",))
