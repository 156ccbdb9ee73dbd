"""Timing, FLOP counting and the JSON report of the GPU check (no pipeline imports).

Throughput is measured on the steps after ``warmup`` (the first steps pay for CUDA
context creation, cuDNN/cuBLAS heuristics and ``torch.compile``), each step's end taken
after a device synchronize, so the time between the first and last timed step ends is
what those steps really cost, data loading included.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of the device name;
# the first match wins, so the more specific names come first.
DENSE_BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)
FLOP_FORMULA = (
    "6 * matmul_params * padded_tokens per training step (Kaplan et al.; matmul_params: "
    "the weights of the Linear layers every token goes through, embeddings, norms, "
    "biases, attention scores and the MLM output layer not counted)"
)


def device_peak(name: str, override: float | None = None) -> float | None:
    """The dense bf16 peak (TFLOP/s) used for a device name, or ``override``."""
    if override is not None:
        return override
    return next((peak for key, peak in DENSE_BF16_PEAK_TFLOPS if key in name), None)


def matmul_params(model: torch.nn.Module) -> int:
    """Weights of the ``nn.Linear`` layers inside the encoder blocks and heads."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(Callback):
    """Per optimizer step: the end time (after a synchronize), the real and padded tokens
    of the batch and the module's training loss."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ends: list[float] = []
        self.real: list[int] = []
        self.padded: list[int] = []
        self.losses: list[float] = []
        self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        sync(self.device)
        self.ends.append(time.perf_counter())
        mask = batch["attention_mask"]
        self.real.append(int(mask.sum()))
        self.padded.append(int(mask.numel()))
        self.losses.append(float(module.last_train_loss))  # type: ignore[attr-defined]

    def summary(self, warmup: int, params: int, peak: float | None) -> dict[str, Any]:
        """Throughput of the steps after ``warmup`` (at least one step is timed)."""
        n = len(self.ends)
        first = max(min(warmup, n - 2), 0)  # the end of the last untimed step
        out: dict[str, Any] = {"steps": n, "timed_steps": max(n - 1 - first, 0)}
        out["losses"] = [round(v, 5) for v in self.losses]
        out["seconds_to_first_timed_step"] = round(self.ends[first] - self.start, 3) if n else None
        seconds = self.ends[-1] - self.ends[first] if n >= 2 else 0.0
        if seconds <= 0:
            return out
        real, padded = sum(self.real[first + 1 :]), sum(self.padded[first + 1 :])
        tflops = 6 * params * padded / seconds / 1e12
        out |= {
            "tokens_per_s": round(real / seconds, 1),
            "padded_tokens_per_s": round(padded / seconds, 1),
            "achieved_tflops": round(tflops, 3),
            "mfu": round(tflops / peak, 4) if peak else None,
        }
        return out


def loss_trend(losses: list[float], min_steps: int = 8) -> dict[str, float] | None:
    """Means of the first and the last quarter of the losses (None: too few steps)."""
    if len(losses) < min_steps:
        return None
    q = len(losses) // 4
    return {"first_quarter": sum(losses[:q]) / q, "last_quarter": sum(losses[-q:]) / q}


class Report:
    """The check's JSON, rewritten to ``path`` after each part so a run cut short still
    reports what finished; ``line()`` is the one JSON line printed at the end."""

    def __init__(self, path: Path, budget_s: float, header: dict[str, Any]) -> None:
        self.path = path
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self.data: dict[str, Any] = {**header, "parts": {}, "checks": {}, "summary": {}}
        self.write()

    def remaining(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def part(self, name: str, result: dict[str, Any]) -> None:
        self.data["parts"][name] = result
        self.write()

    def check(self, name: str, ok: bool | None, detail: Any = None) -> None:
        """Record a check: True passed, False failed, None skipped (with ``detail``)."""
        status = "skipped" if ok is None else "pass" if ok else "fail"
        self.data["checks"][name] = {"status": status, "detail": detail}

    def failed(self) -> list[str]:
        return [k for k, v in self.data["checks"].items() if v["status"] == "fail"]

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.start, 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(_plain(self.data), indent=1) + "\n")

    def line(self) -> str:
        return json.dumps(_plain(self.data), separators=(",", ":"))


def _plain(value: Any) -> Any:
    """Strict JSON: non-finite floats and paths as strings, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value) if isinstance(value, Path) else value


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded, or None when either is missing."""
    return round(a / b, 3) if a and b else None


def close(a: np.ndarray, b: np.ndarray, tol: tuple[float, float]) -> dict[str, Any]:
    """How far logits ``a`` are from the reference ``b``, and whether within ``tol``."""
    diff = float(np.abs(a - b).max())
    bound = tol[0] + tol[1] * float(np.abs(b).max())
    agree = float((a.argmax(1) == b.argmax(1)).mean())
    return {"max_abs_diff": diff, "bound": bound, "argmax_agreement": agree, "ok": diff <= bound}


def header(args: argparse.Namespace, device: torch.device, data: dict, peak: float | None):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "device": name or device.type,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "peak_bf16_dense_tflops_used": peak,
        "flop_formula": FLOP_FORMULA,
        "tokens_per_s": "real (non-pad) tokens of the timed steps per second",
        "models": {"main": args.model, "second": args.second_model},
        "trainer": "conf/trainer/gpu.yaml; pretrain/finetune: conf/experiment/gpu.yaml",
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "batch_size_override": args.batch_size,
        "budget_s": args.budget_s,
        "data": data,
    }


def summary(parts: dict[str, dict]) -> dict[str, Any]:
    """The headline numbers, None where their part did not run."""

    def get(part: str, key: str) -> Any:
        return parts.get(part, {}).get(key)

    memory = [p["peak_memory_gib"] for p in parts.values() if "peak_memory_gib" in p]
    pretrain_tps = get("pretrain", "tokens_per_s")
    return {
        "pretrain_tokens_per_s": pretrain_tps,
        "finetune_tokens_per_s": get("finetune", "tokens_per_s"),
        "bf16_vs_fp32_speedup": ratio(pretrain_tps, get("pretrain_fp32", "tokens_per_s")),
        "compile_speedup": ratio(get("pretrain_compiled", "tokens_per_s"), pretrain_tps),
        "peak_gpu_memory_gib": max(memory) if memory else None,
        "pretrain_achieved_tflops": get("pretrain", "achieved_tflops"),
        "pretrain_mfu": get("pretrain", "mfu"),
        "finetune_achieved_tflops": get("finetune", "achieved_tflops"),
    }
