"""The GPU check: short MLM pretraining and fine-tuning through the stages' own code.

Builds the encoder and classifier of ``conf/model/<--model>.yaml`` (``gpu``; ``cpu`` as a
second shape) with the ``trainer=gpu`` settings and the ``experiment=gpu`` pretrain and
finetune sections, trains them for a few steps with the pipeline's Lightning modules and
trainer factory on one device, and checks: finite and falling losses, bf16 logits close to
fp32 ones, saved weights that predict the same on CPU, a deterministic repeat. Prints one
JSON line (throughput, speed-ups, peak memory, TFLOP/s) and rewrites the JSON file after
each part, so a run stopped by its wall-clock budget still reports what finished.

Run from the repository (or bundle) root: ``python -m tests.gpu.check``;
``--device cpu --steps 2`` is the two-step run of the CPU tests. Exit status 1 when a
check failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
import yaml

# ---------------------------------------------------------------------------------------
# The pipeline's own objects, exactly what the pretrain and finetune stages use (all of
# the check's pipeline imports are in this block; tests/test_gpu_check.py asserts identity).
from pipeline.domain import NUM_CLASSES
from pipeline.encoder.callbacks import EpochSeed
from pipeline.encoder.collate import ClassifyCollator
from pipeline.encoder.data import LMCollator, TokenizedDataModule
from pipeline.encoder.model import (
    Classifier,
    LanguageModel,
    ModelParams,
    load_model_files,
    save_model,
)
from pipeline.encoder.modules import ClassifierModule, LMModule
from pipeline.encoder.params import TrainerParams, TrainParams
from pipeline.encoder.tokens import DocumentTokens
from pipeline.encoder.trainer import FitOptions, fit_module, predict_logits

# ---------------------------------------------------------------------------------------
from tests.gpu import corpus
from tests.gpu.measure import (
    Report,
    StepTimer,
    close,
    device_peak,
    header,
    loss_trend,
    matmul_params,
    summary,
)

ROOT = Path(__file__).resolve().parents[2]  # the repository or bundle root
SLICE = ROOT / "gpu-slice"
VOCAB_SIZE = 16000  # synthetic data: the tokenizer's vocabulary size (conf/tokenizer/bpe)
BF16_TOL = (0.05, 0.05)  # |bf16 - fp32| <= atol + rtol * max|fp32| on logits
FP32_TOL = (1e-3, 1e-3)  # the same between fp32 runs on two devices
MIN_PART_S = 10.0  # a part does not start with less budget left


@dataclass
class Ctx:
    """What the parts share: options, device, data and the objects earlier parts left."""

    args: argparse.Namespace
    device: torch.device
    splits: dict[str, DocumentTokens]
    vocab_size: int
    report: Report
    peak: float | None
    state: dict[str, Any] = field(default_factory=dict)


def conf(group: str, name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "conf" / group / f"{name}.yaml").read_text())


def stage_section(stage: str) -> dict[str, Any]:
    """``pretrain``/``finetune`` as ``experiment=gpu`` composes it (default + overrides)."""
    return {**conf(stage, "default"), **conf("experiment", "gpu").get(stage, {})}


def train_params(ctx: Ctx, stage: str, steps: int) -> tuple[TrainParams, dict[str, Any]]:
    """The stage's TrainParams with a step budget, no validation and the time left as the
    wall-clock cap; and the whole section (the stage-specific keys)."""
    section = stage_section(stage)
    fields = {k: v for k, v in section.items() if k in TrainParams.model_fields}
    fields |= {"max_steps": steps, "max_epochs": None, "val_every_steps": None}
    fields |= {"early_stop_patience": None, "max_minutes": max(ctx.report.remaining(), 1) / 60}
    if ctx.args.batch_size:
        fields |= {"batch_size": ctx.args.batch_size, "eval_batch_size": ctx.args.batch_size}
    return TrainParams(**fields), section


def trainer_params(ctx: Ctx, **changes: Any) -> TrainerParams:
    """``trainer=gpu`` on the chosen device, without a progress bar."""
    fields = conf("trainer", "gpu") | {"progress_bar": False, "devices": 1}
    if ctx.device.type == "cpu":
        fields |= {"accelerator": "cpu", "num_workers": 0}
    return TrainerParams(**(fields | changes))


def model_params(name: str) -> ModelParams:
    return ModelParams(**conf("model", name))


def train(ctx: Ctx, module: L.LightningModule, collate: Any, tp: TrainerParams) -> StepTimer:
    """Fit ``module`` with the stages' datamodule and trainer factory; the step timer."""
    data = TokenizedDataModule(
        ctx.splits,
        train_collate=collate,
        eval_collate=collate,
        batch_size=module.cfg.batch_size,
        num_workers=tp.num_workers,
        seed=ctx.args.seed,
    )
    timer = StepTimer(ctx.device)
    fit_module(
        module,
        data,
        [timer, EpochSeed(ctx.args.seed)],
        tp,
        FitOptions(trainer_overrides={"limit_val_batches": 0}),
    )
    return timer


def pretrain(ctx: Ctx, model: str, steps: int, **trainer: Any) -> tuple[LMModule, StepTimer]:
    """MLM pretraining of the ``model`` config's LanguageModel, as the pretrain stage."""
    mp = model_params(model)
    run, section = train_params(ctx, "pretrain", steps)
    tp = trainer_params(ctx, **trainer)
    L.seed_everything(ctx.args.seed, workers=True, verbose=False)
    objective = section["objective"]
    lm = LanguageModel(mp, ctx.vocab_size, objective)
    collate = LMCollator(mp.max_len, ctx.vocab_size, section["mask_rate"], None, objective)
    module = LMModule(lm, run)
    return module, train(ctx, module, collate, tp)


def classifier_factory(ctx: Ctx, model: str) -> tuple[Callable[[], Classifier], int]:
    """A maker of the finetune stage's Classifier (from scratch) and its ``max_len``."""
    section = stage_section("finetune")
    mp = model_params(model)
    if section["encoder_dropout"] is not None:
        mp = mp.model_copy(update={"dropout": section["encoder_dropout"]})
    options = {k: section[k] for k in ("pooling", "chunk_pooling", "dropout")}
    return lambda: Classifier(mp, ctx.vocab_size, NUM_CLASSES, **options), mp.max_len


def finetune(
    ctx: Ctx, model: str, steps: int, **trainer: Any
) -> tuple[ClassifierModule, StepTimer]:
    """Fine-tuning of the ``model`` config's Classifier, as the finetune stage."""
    make, max_len = classifier_factory(ctx, model)
    run, s = train_params(ctx, "finetune", steps)
    tp = trainer_params(ctx, **trainer)
    L.seed_everything(ctx.args.seed, workers=True, verbose=False)
    module = ClassifierModule(
        make(),
        run,
        n_classes=NUM_CLASSES,
        label_smoothing=s["label_smoothing"],
        freeze_epochs=s["freeze_epochs"],
        layer_lr_decay=s["layer_lr_decay"],
    )
    collate = ClassifyCollator(max_len, s["long_doc"], s["max_chunks"], s["head_fraction"])
    ctx.state["collate"] = collate
    return module, train(ctx, module, collate, tp)


def summarize(ctx: Ctx, name: str, module: L.LightningModule, timer: StepTimer) -> dict:
    """Throughput and the loss checks of one training part."""
    out = timer.summary(ctx.args.warmup, matmul_params(module.model), ctx.peak)
    losses = timer.losses
    ctx.report.check(f"{name}.finite_loss", bool(losses) and bool(np.isfinite(losses).all()))
    trend = loss_trend(losses)
    down = trend["last_quarter"] < trend["first_quarter"] if trend else None
    ctx.report.check(f"{name}.loss_down", down, trend or "too few steps")
    return out


def part_pretrain(ctx: Ctx) -> dict:
    module, timer = pretrain(ctx, ctx.args.model, ctx.args.steps)
    return summarize(ctx, "pretrain", module, timer)


def part_finetune(ctx: Ctx) -> dict:
    module, timer = finetune(ctx, ctx.args.model, ctx.args.steps)
    ctx.state["classifier"] = module.model
    return summarize(ctx, "finetune", module, timer)


def eval_batches(ctx: Ctx) -> list[dict[str, torch.Tensor]]:
    """One validation batch of the finetune stage's eval size, as its collator makes it."""
    size = ctx.args.batch_size or stage_section("finetune")["eval_batch_size"]
    val = ctx.splits["validation"]
    return [ctx.state["collate"]([val[i] for i in range(min(size, len(val)))])]


def part_precision(ctx: Ctx) -> dict:
    """The fine-tuned classifier's logits on one batch: bf16 autocast against fp32."""
    model, batches = ctx.state["classifier"], eval_batches(ctx)
    fp32 = predict_logits(model, batches, ctx.device, "32-true")[1]
    bf16 = predict_logits(model, batches, ctx.device, "bf16-mixed")[1]
    ctx.state |= {"fp32": fp32, "bf16": bf16, "batches": batches}
    result = close(bf16, fp32, BF16_TOL)
    ctx.report.check("bf16_vs_fp32_logits", result["ok"], result)
    return result


def part_reload(ctx: Ctx) -> dict:
    """Saved weights loaded into a fresh CPU classifier predict like the trained one."""
    make, _ = classifier_factory(ctx, ctx.args.model)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ctx.state["classifier"], tmp, {"check": "gpu"})
        _, state = load_model_files(tmp)
    fresh = make()
    fresh.load_state_dict(state)
    cpu = predict_logits(fresh, ctx.state["batches"], torch.device("cpu"), "32-true")[1]
    result = {
        "cpu_fp32_vs_device_fp32": close(cpu, ctx.state["fp32"], FP32_TOL),
        "cpu_fp32_vs_device_bf16": close(cpu, ctx.state["bf16"], BF16_TOL),
    }
    for key, value in result.items():
        ctx.report.check(f"reload.{key}", value["ok"], value)
    return result


def part_deterministic(ctx: Ctx) -> dict:
    """Two fine-tuning runs with ``trainer.deterministic=true``: same losses and weights."""
    steps = min(ctx.args.steps, 10)
    try:
        runs = [finetune(ctx, ctx.args.model, steps, deterministic=True) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    (m1, t1), (m2, t2) = runs
    s1, s2 = m1.model.state_dict(), m2.model.state_dict()
    differ = [k for k in s1 if not torch.equal(s1[k], s2[k])]
    result = {"steps": steps, "same_losses": t1.losses == t2.losses, "weights_differ": differ}
    ok = result["same_losses"] and not differ
    ctx.report.check("deterministic_repeat", ok, result)
    return result


def part_fp32(ctx: Ctx) -> dict:
    """Pretraining in 32-true, for the bf16 speed-up."""
    module, timer = pretrain(ctx, ctx.args.model, ctx.args.steps, precision="32-true")
    return summarize(ctx, "pretrain_fp32", module, timer)


def part_compile(ctx: Ctx) -> dict:
    """Pretraining with ``trainer.compile=true`` (timed after the warm-up steps)."""
    module, timer = pretrain(ctx, ctx.args.model, ctx.args.steps, compile=True)
    return summarize(ctx, "pretrain_compiled", module, timer)


def part_second_model(ctx: Ctx) -> dict:
    """Pretraining and fine-tuning of the second model config (``--second-model``)."""
    name = ctx.args.second_model
    lm, lm_timer = pretrain(ctx, name, ctx.args.steps)
    cls, cls_timer = finetune(ctx, name, ctx.args.steps)
    return {
        "model": name,
        "pretrain": summarize(ctx, f"{name}.pretrain", lm, lm_timer),
        "finetune": summarize(ctx, f"{name}.finetune", cls, cls_timer),
    }


PARTS: dict[str, tuple[Callable[[Ctx], dict], tuple[str, ...]]] = {
    # name: (function, the parts it needs)
    "pretrain": (part_pretrain, ()),
    "finetune": (part_finetune, ()),
    "precision": (part_precision, ("finetune",)),
    "reload": (part_reload, ("precision",)),
    "deterministic": (part_deterministic, ()),
    "pretrain_fp32": (part_fp32, ()),
    "pretrain_compiled": (part_compile, ()),
    "second_model": (part_second_model, ()),
}
CPU_SKIPS = ("pretrain_compiled",)  # needs a C compiler and minutes on CPU


def run_part(ctx: Ctx, name: str) -> None:
    """Run one part if selected, its needs met and budget left; record it either way."""
    fn, needs = PARTS[name]
    report = ctx.report
    reason = None
    if name not in ctx.args.parts:
        reason = "not selected (--parts)"
    elif missing := [n for n in needs if report.data["parts"].get(n, {}).get("status") != "ok"]:
        reason = f"needs {', '.join(missing)}"
    elif report.remaining() < MIN_PART_S:
        reason = f"wall-clock budget ({ctx.args.budget_s:g} s) spent"
    if reason:
        report.part(name, {"status": "skipped", "reason": reason})
        return
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    start = time.perf_counter()
    try:
        result = {"status": "ok", **fn(ctx)}
    except Exception as exc:  # reported, and the next part still runs
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]}
        report.check(name, False, result["error"])
    result["seconds"] = round(time.perf_counter() - start, 2)
    if ctx.device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(ctx.device) / 2**30, 3)
    report.part(name, result)


def load_data(args: argparse.Namespace) -> tuple[dict[str, DocumentTokens], dict[str, Any]]:
    """The carried slice of data/tokenized when there is one, else synthetic splits."""
    if args.data is not None or SLICE.is_dir():
        tables, meta = corpus.read_slice(args.data or SLICE)
    else:
        tables, meta = corpus.synthetic(VOCAB_SIZE, args.seed)
    return {k: DocumentTokens.from_arrow(t) for k, t in tables.items()}, meta


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--model", default="gpu", help="model config of the main parts")
    p.add_argument("--second-model", default="cpu", help="model config of second_model")
    p.add_argument("--steps", type=int, help="optimizer steps per fit (40; CPU: 2)")
    p.add_argument("--warmup", type=int, help="untimed first steps (10; CPU: 1)")
    p.add_argument("--batch-size", type=int, help="override the sections' (CPU: 2)")
    p.add_argument("--budget-s", type=float, default=270.0, help="wall-clock budget")
    p.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--data", type=Path, help=f"a slice folder (default: {SLICE.name}/ if any)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of an unlisted device")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    args = p.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = "cuda" if cuda else "cpu"
    gpu = args.device == "cuda"
    args.steps = args.steps or (40 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    args.batch_size = args.batch_size or (None if gpu else 2)
    skips = () if gpu else CPU_SKIPS
    args.parts = args.parts.split(",") if args.parts else [n for n in PARTS if n not in skips]
    if unknown := set(args.parts) - set(PARTS):
        p.error(f"unknown parts: {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "deterministic" in args.parts:
        # Deterministic cuBLAS needs it before its first use (Lightning sets it only when a
        # deterministic trainer starts, after earlier parts have used cuBLAS).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device = torch.device(args.device)
    splits, data = load_data(args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = device_peak(name, args.peak_tflops) if device.type == "cuda" else None
    report = Report(args.out, args.budget_s, header(args, device, data, peak))
    ctx = Ctx(args, device, splits, int(data["vocab_size"]), report, peak)
    for part in PARTS:
        run_part(ctx, part)
        report.data["summary"] = summary(report.data["parts"])
        report.write()
    report.data["failed_checks"] = report.failed()
    report.write()
    print(report.line(), flush=True)
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
