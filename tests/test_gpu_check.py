"""The GPU check's CPU side: the bundle, the data slice, a forced-CPU run, and that the
check trains the pipeline's own objects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.encoder import collate, data, model, modules, trainer
from pipeline.encoder.tokens import DocumentTokens, load_splits
from tests.gpu import bundle, check, measure
from tests.gpu import corpus as gpu_corpus

# Not on the GPU machine: the check must never import them.
ABSENT_THERE = ("datasets", "dvc", "mlflow", "hydra", "omegaconf", "pandera", "pydantic_settings")
RUN_IN_BUNDLE = """
import os, runpy, sys
sys.argv = ["check", *sys.argv[1:]]
try:
    runpy.run_module("tests.gpu.check", run_name="__main__")
except SystemExit as exit:
    code = exit.code
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(os.environ["ABSENT_THERE"].split(",")))
print("ABSENT_LOADED", loaded)
sys.exit(code)
"""


def tiny_paths(corpus_root: Path) -> tuple[Path, Path]:
    return corpus_root / "data/tokenized", corpus_root / "data/tokenizer/tokenizer.json"


@pytest.fixture(scope="module")
def built(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    wheels = tmp_path_factory.mktemp("wheels")
    (wheels / "pydantic-0.0-py3-none-any.whl").write_bytes(b"stand-in")
    out = tmp_path_factory.mktemp("bundle") / ".gpu-bundle"
    return out, bundle.build(out, wheels, *tiny_paths(corpus))


def test_bundle_holds_the_check_its_pipeline_modules_and_the_slice(built, corpus):
    out, size = built
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert size < 64 * 2**20
    assert size == sum((out / f).stat().st_size for f in files)
    assert set(bundle.CHECK_FILES) <= files
    encoder = {
        f"pipeline/encoder/{m}.py"
        for m in ("model", "modules", "params", "trainer", "callbacks", "data", "collate")
    }
    assert encoder | {"pipeline/__init__.py", "pipeline/config.py"} <= files
    assert not {f for f in files if f.startswith("pipeline/stages")}
    assert {"conf/model/gpu.yaml", "conf/model/cpu.yaml", "conf/trainer/gpu.yaml"} <= files
    assert "wheels/pydantic-0.0-py3-none-any.whl" in files
    # the slice: the documents of data/tokenized, as the stages' DocumentTokens reads them
    tables, meta = gpu_corpus.read_slice(out / "gpu-slice")
    full = load_splits(tiny_paths(corpus)[0], meta["vocab_size"], 20, gpu_corpus.SPLITS)
    for split in gpu_corpus.SPLITS:
        part = DocumentTokens.from_arrow(tables[split])
        assert len(part) == min(bundle.SLICE_DOCS[split], len(full[split]))
        rows = {doc_id: i for i, doc_id in enumerate(full[split].ids)}
        for i, doc_id in enumerate(part.ids):
            theirs = full[split][rows[doc_id]]
            assert np.array_equal(part[i].tokens, theirs.tokens)
            assert part[i].label == theirs.label


def test_bundle_without_data_runs_on_cpu_on_synthetic_data(corpus, tmp_path):
    """The bundle alone (its own pipeline copy, cwd first on sys.path), two steps on CPU,
    one JSON line, nothing imported that the GPU machine lacks."""
    out = tmp_path / ".gpu-bundle"
    bundle.build(out, None, tmp_path / "none", tmp_path / "none.json")
    assert not (out / "gpu-slice").exists()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "OMP_NUM_THREADS": "1",
        "ABSENT_THERE": ",".join(ABSENT_THERE),
    }
    args = ["--device", "cpu", "--model", "tiny", "--second-model", "tiny", "--out", "r.json"]
    proc = subprocess.run(
        [sys.executable, "-c", RUN_IN_BUNDLE, *args],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "ABSENT_LOADED []"
    report = json.loads(lines[-2])
    assert report == json.loads((out / "r.json").read_text())
    assert report["data"]["source"] == "synthetic"
    assert report["failed_checks"] == []
    parts = report["parts"]
    assert parts["pretrain_compiled"]["status"] == "skipped"
    ran = {k for k, v in parts.items() if v["status"] == "ok"}
    assert ran == set(check.PARTS) - {"pretrain_compiled"}
    assert parts["pretrain"]["steps"] == 2 and parts["finetune"]["steps"] == 2
    assert report["summary"]["pretrain_tokens_per_s"] > 0
    assert report["checks"]["deterministic_repeat"]["status"] == "pass"


def test_the_check_trains_the_pipelines_own_objects(built, tmp_path, monkeypatch, one_thread):
    assert check.LMModule is modules.LMModule
    assert check.ClassifierModule is modules.ClassifierModule
    assert check.fit_module is trainer.fit_module
    assert check.predict_logits is trainer.predict_logits
    assert check.LanguageModel is model.LanguageModel
    assert check.Classifier is model.Classifier
    assert check.TokenizedDataModule is data.TokenizedDataModule
    assert check.LMCollator is data.LMCollator
    assert check.ClassifyCollator is collate.ClassifyCollator
    factory = trainer.build_trainer
    calls = []

    def spy(tp, cfg, callbacks, checkpoints=None, **overrides):
        calls.append(tp)
        return factory(tp, cfg, callbacks, checkpoints, **overrides)

    monkeypatch.setattr(trainer, "build_trainer", spy)
    out, _ = built
    args = check.parse_args(["--device", "cpu", "--data", str(out / "gpu-slice")])
    splits, meta = check.load_data(args)
    assert meta["source"] == "data/tokenized slice"
    report = measure.Report(tmp_path / "r.json", 60.0, {})
    ctx = check.Ctx(args, torch.device("cpu"), splits, meta["vocab_size"], report, None)
    lm, lm_timer = check.pretrain(ctx, "tiny", 2)
    cls, cls_timer = check.finetune(ctx, "tiny", 2)
    assert type(lm) is modules.LMModule and type(lm.model) is model.LanguageModel
    assert type(cls) is modules.ClassifierModule and type(cls.model) is model.Classifier
    assert [tp.precision for tp in calls] == ["bf16-mixed", "bf16-mixed"]
    assert len(lm_timer.losses) == len(cls_timer.losses) == 2


def test_step_timer_times_the_steps_after_warmup():
    timer = measure.StepTimer(torch.device("cpu"))
    timer.ends, timer.real, timer.padded = [1.0, 2.0, 3.0, 5.0], [9, 10, 10, 10], [12] * 4
    timer.losses = [4.0, 3.0, 2.0, 1.0]
    out = timer.summary(warmup=1, params=1000, peak=1.0)
    assert out["timed_steps"] == 2 and out["tokens_per_s"] == round(20 / 3, 1)
    assert out["achieved_tflops"] == round(6 * 1000 * 24 / 3 / 1e12, 3)
    trend = measure.loss_trend([3.0] * 4 + [2.5] * 2 + [2.0] * 2)
    assert trend == {"first_quarter": 3.0, "last_quarter": 2.0}
    assert measure.loss_trend([3.0, 2.0]) is None


def test_device_peaks():
    assert measure.device_peak("NVIDIA H200") == 989.0
    assert measure.device_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert measure.device_peak("NVIDIA H100 PCIe") == 756.0
    assert measure.device_peak("Some GPU") is None
    assert measure.device_peak("Some GPU", 100.0) == 100.0


def test_gpu_wheels_are_the_locked_versions():
    """The wheels carried to the GPU machine are requirements.lock's pydantic stack."""

    def pins(path: Path) -> dict[str, str]:
        lines = path.read_text(encoding="utf-8").splitlines()
        pairs = [line.split("==") for line in lines if "==" in line and not line.startswith("#")]
        return {name.lower().replace("_", "-"): version for name, version in pairs}

    wanted = pins(bundle.ROOT / "tests/gpu/requirements.txt")
    assert {"pydantic", "pydantic-core", "typing-extensions"} <= set(wanted)
    locked = pins(bundle.ROOT / "requirements.lock")
    assert {name: locked.get(name) for name in wanted} == wanted
