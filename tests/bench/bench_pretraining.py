"""Benchmark: what pretraining is worth, against fine-tuning from scratch at an equal budget.

For each seed, on the full data of the current project (``data/tokenized`` from
``dvc repro tokenize``) and the default params of ``params.yaml``:

- ``pretrained``: ``pretrain`` as configured, then ``finetune`` with ``init=pretrained``;
- ``scratch``: ``finetune`` with ``init=scratch``, given as many *extra* fine-tuning
  tokens as pretraining consumed (converted to optimizer steps at the fine-tuning run's
  measured tokens per step), with its own recipe (``--scratch KEY=VALUE`` overrides of
  the ``finetune`` section, e.g. its best learning rate).

Budgets are steps, never wall clock, so both runs are deterministic for a seed. The test
accuracy of the encoder alone (the ``transformer`` row) is compared on the same test
documents: an exact McNemar test per seed, and a paired bootstrap of the accuracy
difference over all seeds. Prints a table and writes ``reports/bench/pretraining.json``.

    python tests/bench/bench_pretraining.py --seeds 42 43 --scratch lr=0.003
    python tests/bench/bench_pretraining.py --seeds 42 --reuse-pipeline  # after dvc repro

``--reuse-pipeline`` takes the pretrained side of the params' own seed from the
pipeline's outputs (``reports/pretrain.json``, ``reports/finetune.json``,
``data/predictions/transformer``): the same deterministic run, not trained twice.

Not part of the test suite: it trains 2 x len(seeds) models on the full data (about
20 minutes each on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

OUT = Path("reports/bench/pretraining.json")


def parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def test_correct(predictions: Path) -> pd.Series:
    """Per test document (by id): did the argmax of its logits hit the label?"""
    table = pd.read_parquet(predictions)
    test = table[table["split"] == "test"].set_index("id").sort_index()
    logits = test.filter(like="logit_").to_numpy()
    return pd.Series(logits.argmax(1) == test["label"].to_numpy(), index=test.index)


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value for paired booleans (binomial test on discordants)."""
    from scipy.stats import binomtest

    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, rounds: int, seed: int) -> dict[str, float]:
    """95% interval and two-sided p-value of mean(a) - mean(b) over resampled documents."""
    rng = np.random.default_rng(seed)
    diff = a.astype(float) - b.astype(float)
    stats = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(rounds)])
    p = 2 * min((stats <= 0).mean(), (stats >= 0).mean())
    return {
        "difference": round(float(diff.mean()), 6),
        "ci_low": round(float(np.quantile(stats, 0.025)), 6),
        "ci_high": round(float(np.quantile(stats, 0.975)), 6),
        "p_value": round(float(min(1.0, p)), 6),
    }


def pipeline_side() -> tuple[dict, float, dict, float, Path]:
    """The pretrained side as ``dvc repro`` left it (same params and seed, so the same
    deterministic run): reports, minutes and the transformer's predictions folder."""
    if dvc_status_dirty():
        raise SystemExit("--reuse-pipeline: `dvc status` is not clean; run `dvc repro` first")
    pre = json.loads(Path("reports/pretrain.json").read_text(encoding="utf-8"))
    fine = json.loads(Path("reports/finetune.json").read_text(encoding="utf-8"))
    predictions = Path("data/predictions/transformer")
    return pre, pre["train_minutes"], fine, fine["train_minutes"], predictions


def dvc_status_dirty() -> bool:
    import subprocess

    out = subprocess.run(
        ["dvc", "status", "pretrain", "finetune"], capture_output=True, text=True, check=True
    )
    return "up to date" not in out.stdout.lower()


def run_pair(
    params: dict[str, Any], seed: int, scratch: dict[str, Any], work: Path, reuse: bool
) -> dict:
    """Train the pretrained and the scratch encoder for one seed; their budgets and hits.
    ``reuse``: the pretrained side is the pipeline's own run (the params' seed only)."""
    from pipeline.encoder.model import ModelParams
    from pipeline.encoder.params import TrainerParams
    from pipeline.encoder.training_stage import FinetunePaths, PretrainPaths
    from pipeline.stages.finetune import FinetuneParams
    from pipeline.stages.finetune import train_classifier as finetune
    from pipeline.stages.pretrain import PretrainParams
    from pipeline.stages.pretrain import pretrain_lm as pretrain

    model = ModelParams(**params["model"])
    trainer = TrainerParams(**{**params["trainer"], "progress_bar": False})
    out: dict[str, Any] = {"seed": seed}

    def paths(name: str) -> dict[str, Path]:
        root = work / f"{name}-{seed}"
        return {
            "model": root / "model",
            "report": root / "report.json",
            "curves": root / "curves",
            **({"predictions": root / "predictions"} if name != "pretrain" else {}),
        }

    fine_paths = paths("pretrained")
    if reuse:
        pre, pre_minutes, fine, fine_minutes, fine_paths["predictions"] = pipeline_side()
    else:
        start = time.perf_counter()
        pre_paths = paths("pretrain")
        pre_files = PretrainPaths(**pre_paths)
        pre = pretrain(model, PretrainParams(**params["pretrain"]), trainer, seed, pre_files)
        pre_minutes = (time.perf_counter() - start) / 60
        start = time.perf_counter()
        ft = FinetuneParams(**{**params["finetune"], "init": "pretrained"})
        fine_files = FinetunePaths(pretrained=pre_paths["model"], **fine_paths)
        fine = finetune(model, ft, trainer, seed, fine_files)
        fine_minutes = (time.perf_counter() - start) / 60
    pre_tokens = pre["train_tokens"]
    tokens_per_step = fine["train_tokens"] / max(1, fine["steps"])
    extra_steps = math.ceil(pre_tokens / tokens_per_step)

    start = time.perf_counter()
    scratch_paths = paths("scratch")
    section = {**params["finetune"], **scratch, "init": "scratch"}
    section.update(max_steps=fine["steps"] + extra_steps, max_epochs=None)
    scratch_files = FinetunePaths(**scratch_paths)
    base = finetune(model, FinetuneParams(**section), trainer, seed, scratch_files)
    scratch_minutes = (time.perf_counter() - start) / 60

    out["pretrained"] = {
        "pretrain_steps": pre["steps"],
        "pretrain_tokens": pre_tokens,
        "pretrain_minutes": round(pre_minutes, 2),
        "finetune_steps": fine["steps"],
        "finetune_tokens": fine["train_tokens"],
        "finetune_minutes": round(fine_minutes, 2),
    }
    out["scratch"] = {
        "finetune_steps": base["steps"],
        "finetune_tokens": base["train_tokens"],
        "extra_steps_for_pretraining_tokens": extra_steps,
        "finetune_minutes": round(scratch_minutes, 2),
        "overrides": scratch,
    }
    hits = {
        name: test_correct(p["predictions"] / "predictions.parquet")
        for name, p in (("pretrained", fine_paths), ("scratch", scratch_paths))
    }
    return out, hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    parser.add_argument(
        "--scratch", nargs="*", default=[], help="finetune overrides for scratch, KEY=VALUE"
    )
    parser.add_argument("--bootstrap", type=int, default=10000)
    parser.add_argument(
        "--reuse-pipeline",
        action="store_true",
        help="for the params' own seed, take the pretrained side from `dvc repro`'s outputs",
    )
    args = parser.parse_args()
    scratch = {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.scratch)}
    params = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    runs, pre_hits, scratch_hits = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-pretraining-") as tmp:
        for seed in args.seeds:
            reuse = args.reuse_pipeline and seed == params["seed"]
            row, hits = run_pair(params, seed, scratch, Path(tmp), reuse)
            row["pretrained"]["from_pipeline"] = reuse
            a, b = hits["pretrained"].to_numpy(), hits["scratch"].to_numpy()
            row["pretrained"]["test_accuracy"] = round(float(a.mean()), 6)
            row["scratch"]["test_accuracy"] = round(float(b.mean()), 6)
            row["mcnemar_p_value"] = round(mcnemar_exact(a, b), 6)
            runs.append(row)
            pre_hits.append(a)
            scratch_hits.append(b)
            print(
                f"bench: seed {seed}: pretrained {a.mean():.4f}, scratch {b.mean():.4f} "
                f"(McNemar p = {row['mcnemar_p_value']:.3g})",
                flush=True,
            )
    a, b = np.concatenate(pre_hits), np.concatenate(scratch_hits)
    result = {
        "command": "python tests/bench/bench_pretraining.py "
        + " ".join(["--seeds", *map(str, args.seeds), "--scratch", *args.scratch])
        + (" --reuse-pipeline" if args.reuse_pipeline else ""),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "budget": "scratch gets the pretraining run's real tokens as extra fine-tuning steps",
        "pretrained_accuracy": round(float(a.mean()), 6),
        "scratch_accuracy": round(float(b.mean()), 6),
        "paired_bootstrap": paired_bootstrap(a, b, args.bootstrap, seed=0),
        "runs": runs,
        "params": {k: params[k] for k in ("seed", "model", "pretrain", "finetune", "trainer")},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    boot = result["paired_bootstrap"]
    print(
        f"pretrained {result['pretrained_accuracy']:.4f} vs scratch "
        f"{result['scratch_accuracy']:.4f}: difference {boot['difference']:+.4f} "
        f"[{boot['ci_low']:+.4f}, {boot['ci_high']:+.4f}], p = {boot['p_value']:.3g} -> {OUT}"
    )


if __name__ == "__main__":
    main()
