"""The params sections of Lightning training: ``trainer`` (where and how Lightning runs)
and :class:`TrainParams` (optimizer, schedule and budget), the common part of the
``pretrain`` and ``finetune`` sections.

The schedule's horizon is the step budget (``max_steps``/``max_epochs``), never the wall
clock, so a run's LR curve and results do not depend on machine speed; ``max_minutes`` is
a safety cap on top.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import Section

Precision = Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true"]
Schedule = Literal["cosine", "linear", "constant"]

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
