"""Lightning callbacks of the training stages: the best weights kept in memory (checkpoint
selection on validation without files to clean up or share between ranks), the loss
curves for DVC plots and MLflow, per-epoch reseeding, end-of-epoch resume checkpoints and
the progress bar."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from torch import Tensor

from pipeline.tracking import CurveSink


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
    exactly like an uninterrupted one (same weights at the end)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = (self.seed * 1_000_003 + trainer.current_epoch) % 2**32
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)


class EpochCheckpoint(Callback):
    """``last.ckpt`` in ``folder`` at the end of every training epoch: weights, optimizer,
    schedule, loop position and the callbacks' states (Lightning writes it through a
    temporary file, so a kill mid-write leaves the previous one whole)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.folder / "last.ckpt", weights_only=False)  # all of it


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, reading ``Epoch 3`` rather than ``Epoch 3/-2`` when the budget
    is in steps (``max_epochs`` unset: Lightning passes -1 and prints ``max_epochs - 1``)."""

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        text = f"Epoch {current_epoch} (to step {self.trainer.max_steps})"
        return text.ljust(len(self.validation_description))
