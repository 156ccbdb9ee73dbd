"""LightningModules around the plain torch models of :mod:`pipeline.encoder.model`:
:class:`LMModule` (pretraining) and :class:`ClassifierModule` (fine-tuning).

A non-finite loss stops training with :class:`NonFiniteLossError` on every rank.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor

from pipeline.encoder.model import Classifier, LanguageModel, model_inputs
from pipeline.encoder.optim import configure_adamw
from pipeline.encoder.params import TrainParams
from pipeline.errors import PipelineError


class NonFiniteLossError(PipelineError):
    """Training produced a NaN or infinite loss."""


def refuse_frozen_encoder_under_ddp(freeze_epochs: int, strategy: str) -> None:
    """Raise when a frozen encoder would meet plain DDP, which rejects unused parameters.

    Raises:
        PipelineError: ``freeze_epochs > 0`` with the ``ddp`` or ``ddp_spawn`` strategy.
    """
    if freeze_epochs and strategy in ("ddp", "ddp_spawn"):
        raise PipelineError(
            "finetune.freeze_epochs > 0 leaves encoder parameters unused, which plain DDP "
            "rejects: use trainer.strategy=ddp_find_unused_parameters_true"
        )


class EncoderModule(L.LightningModule):
    """Loss checks and run statistics shared by both modules.

    Attributes:
        cfg: The optimizer, schedule and budget this module trains with.
        last_train_loss: The latest training loss of this rank.
        train_tokens: Real (non-pad) tokens seen by this rank, for throughput.
        stage: The DVC stage that trains this module, for messages.
    """

    cfg: TrainParams
    last_train_loss: float = float("nan")
    train_tokens: int = 0
    stage: str

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


class LMModule(EncoderModule):
    """Language-model pretraining (masked or causal) of :class:`.LanguageModel`."""

    stage = "pretrain"

    def __init__(self, model: LanguageModel, cfg: TrainParams) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
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
        return configure_adamw(self, self.model, self.cfg, self.model.encoder.params.n_layers, 1.0)


class ClassifierModule(EncoderModule):
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
        cfg: TrainParams,
        *,
        n_classes: int,
        label_smoothing: float = 0.0,
        freeze_epochs: int = 0,
        layer_lr_decay: float = 1.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
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
        return configure_adamw(self, self.model, self.cfg, n_layers, self.layer_lr_decay)
