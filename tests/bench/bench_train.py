"""Benchmark: training throughput of the Lightning loop against a bare PyTorch loop.

Same model (``conf/model/<model>.yaml``), same pre-collated MLM batches, same optimizer,
schedule and gradient clipping; only the loop differs. Target: Lightning >= 0.95x bare.

    python tests/bench/bench_train.py                 # model=cpu, 30 timed steps, best of 3
    python tests/bench/bench_train.py --model tiny --steps 30

Uses ``data/tokenized`` when present (random tokens otherwise). Prints the figures and
writes ``reports/bench/train.json``. Not part of the test suite: timings depend on the
machine and on what else it is doing (run it on an idle machine; compare best-of runs).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import lightning.pytorch as L
import torch
import yaml
from torch.utils.data import DataLoader

from pipeline.encoder.data import LMCollator
from pipeline.encoder.model import LanguageModel, ModelParams
from pipeline.encoder.modules import LMModule
from pipeline.encoder.optim import configure_adamw
from pipeline.encoder.params import TrainerParams
from pipeline.encoder.tokens import load_splits, load_vocab_size
from pipeline.encoder.trainer import build_trainer
from pipeline.stages.pretrain import PretrainParams

ROOT = Path(__file__).resolve().parents[2]
OUT = Path("reports/bench/train.json")


def batches(p: ModelParams, n: int, batch_size: int) -> tuple[list[dict], int]:
    """``n`` MLM batches from the real train split if tokenized, else random tokens."""
    torch.manual_seed(0)
    tokenizer = Path("data/tokenizer/tokenizer.json")
    if tokenizer.is_file() and Path("data/tokenized").is_dir():
        vocab = load_vocab_size(tokenizer)
        train = load_splits("data/tokenized", vocab, 20, ("train",))["train"]
        collate = LMCollator(p.max_len, vocab, seed=0)
        docs = [train[i] for i in range(n * batch_size)]
        return [collate(docs[i * batch_size : (i + 1) * batch_size]) for i in range(n)], vocab
    vocab = 16000
    collate = LMCollator(p.max_len, vocab, seed=0)
    from pipeline.encoder.collate import Example

    gen = torch.Generator().manual_seed(0)
    docs = [
        Example(i, torch.randint(5, vocab, (p.max_len,), generator=gen).int().numpy(), 0)
        for i in range(n * batch_size)
    ]
    return [collate(docs[i * batch_size : (i + 1) * batch_size]) for i in range(n)], vocab


class StepTimer(L.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.end = time.perf_counter()


def run_lightning(p, vocab, data, run, trainer_p, warmup) -> float:
    L.seed_everything(0, verbose=False)
    module = LMModule(LanguageModel(p, vocab), run)
    timer = StepTimer(warmup)
    trainer = build_trainer(
        trainer_p, run, [timer], limit_val_batches=0, enable_model_summary=False
    )
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    return timer.end - timer.start


def run_bare(p, vocab, data, run, warmup) -> float:
    L.seed_everything(0, verbose=False)
    torch.use_deterministic_algorithms(True)  # as Trainer(deterministic=True) does
    model = LanguageModel(p, vocab).train()

    class _Shim:  # configure_adamw reads the step budget from a trainer
        class trainer:
            estimated_stepping_batches = len(data)

    opt = configure_adamw(_Shim(), model, run, p.n_layers, 1.0)  # type: ignore[arg-type]
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    for i, batch in enumerate(data):
        if i == warmup:
            start = time.perf_counter()
        loss = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        if not torch.isfinite(loss):
            raise RuntimeError("non-finite loss")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cpu")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()

    p = ModelParams.model_validate(
        yaml.safe_load((ROOT / f"conf/model/{args.model}.yaml").read_text())
    )
    trainer_p = TrainerParams.model_validate(
        {**yaml.safe_load((ROOT / "conf/trainer/cpu.yaml").read_text()), "progress_bar": False}
    )
    n = args.warmup + args.steps
    pretrain = yaml.safe_load((ROOT / "conf/pretrain/default.yaml").read_text())
    run = PretrainParams.model_validate(
        {**pretrain, "batch_size": args.batch_size, "max_steps": n, "lr": 5e-4}
    )
    data, vocab = batches(p, n, args.batch_size)
    tokens = sum(int(b["attention_mask"].sum()) for b in data[args.warmup :])
    bare_times, light_times = [], []
    for _ in range(args.repeats):  # alternate, so a busy spell hits both loops alike
        bare_times.append(run_bare(p, vocab, data, run, args.warmup))
        light_times.append(run_lightning(p, vocab, data, run, trainer_p, args.warmup))
    bare, light = min(bare_times), min(light_times)
    result = {
        "command": f"python tests/bench/bench_train.py --model {args.model} --steps {args.steps}",
        "model": p.model_dump(),
        "batch": [args.batch_size, p.max_len],
        "timed_steps": args.steps,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "bare_tokens_per_second": round(tokens / bare, 1),
        "lightning_tokens_per_second": round(tokens / light, 1),
        "lightning_vs_bare": round(bare / light, 3),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
