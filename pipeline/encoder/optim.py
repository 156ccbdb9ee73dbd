"""AdamW with decoupled weight decay on weight matrices only, optional layer-wise LR decay
and a separate token-embedding LR, under a step-based warmup + cosine/linear schedule."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn

from pipeline.encoder.params import Schedule, TrainParams
from pipeline.errors import PipelineError


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
    cfg: TrainParams,
    n_layers: int,
    layer_decay: float,
) -> dict[str, Any]:
    """Optimizer + per-step scheduler for ``configure_optimizers``.

    Raises:
        PipelineError: the trainer cannot estimate its number of optimizer steps.
    """
    groups = param_groups(net, cfg.lr, cfg.weight_decay, n_layers, layer_decay, cfg.embedding_lr)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    total = module.trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise PipelineError("cannot size the LR schedule: set max_steps or max_epochs")
    total = int(total)
    warmup = int(cfg.warmup_fraction * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupDecay(total, warmup, cfg.schedule, cfg.min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
