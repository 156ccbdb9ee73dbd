"""Lightning modules and the pretrain/finetune stages on a tiny synthetic corpus."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.domain import GROUPS, LOGIT_COLUMNS, SPECIAL_TOKENS
from pipeline.encoder.collate import ClassifyCollator
from pipeline.encoder.data import LMCollator, TokenizedDataModule, load_splits, load_vocab_size
from pipeline.encoder.model import Classifier, LanguageModel, ModelParams
from pipeline.encoder.training import (
    ClassifierModule,
    LMModule,
    LossCurve,
    NonFiniteLossError,
    StepProgressBar,
    TrainerParams,
    WarmupDecay,
    build_trainer,
    param_groups,
)
from pipeline.errors import PipelineError, run_stage
from pipeline.schemas import Predictions
from pipeline.stages.finetune import (
    FinetuneParams,
    build_classifier,
)
from pipeline.stages.finetune import run as finetune
from pipeline.stages.pretrain import PretrainParams
from pipeline.stages.pretrain import run as pretrain
from tests.helpers import default_section, params_with

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 64
SIZES = {"train": 200, "validation": 60, "test": 60}
TIMING_KEYS = {"train_minutes", "train_tokens_per_second"}

MODEL = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "dropout": 0.0, "max_len": 16}
TRAINER = {"progress_bar": False, "log_every_n_steps": 5}
PRETRAIN = {"batch_size": 16, "lr": 3e-3, "max_steps": 30, "val_every_steps": 15}
FINETUNE = {"batch_size": 16, "lr": 3e-3, "max_epochs": 4, "init": "scratch", "max_chunks": 3}


def build_tiny_corpus(root: Path, seed: int = 0) -> None:
    """``data/tokenizer`` + ``data/tokenized`` in the layout of the tokenize stage.

    Class c is signalled by tokens 5 + 2c and 6 + 2c (30% of a document's tokens, the
    rest is noise from 45..63), so a tiny model learns it in a few epochs. Lengths run
    past model.max_len so every long-document path is exercised.
    """
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer, models

    rng = np.random.default_rng(seed)
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab |= {f"w{i}": i for i in range(len(SPECIAL_TOKENS), VOCAB)}
    (root / "data/tokenizer").mkdir(parents=True)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.save(str(root / "data/tokenizer/tokenizer.json"))
    splits = {}
    for split, n in SIZES.items():
        labels = np.arange(n) % 20
        docs = []
        for label in labels:
            length = int(rng.integers(1, 45))
            key = 5 + 2 * label + rng.integers(0, 2, length)
            noise = rng.integers(45, VOCAB, length)
            docs.append(np.where(rng.random(length) < 0.3, key, noise).astype(np.int32))
        # ids as fetch makes them: <archive folder>/<group>/<file>
        folder, offset = ("test", 0) if split == "test" else ("train", 1000 * (split != "train"))
        ids = [f"{folder}/{GROUPS[label]}/{offset + i}" for i, label in enumerate(labels)]
        splits[split] = Dataset.from_dict(
            {"id": ids, "label": labels.astype(np.int64), "input_ids": docs}
        )
    DatasetDict(splits).save_to_disk(str(root / "data/tokenized"), num_proc=None)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are slower with two threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    build_tiny_corpus(root)
    return root


@pytest.fixture
def project(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder whose data/ points at the shared tiny corpus."""
    (tmp_path / "data").mkdir()
    for name in ("tokenizer", "tokenized"):
        (tmp_path / "data" / name).symlink_to(corpus / "data" / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def sections(**changes: dict) -> tuple[ModelParams, TrainerParams]:
    return default_section("model", **{**MODEL, **changes.get("model", {})}), default_section(
        "trainer", **{**TRAINER, **changes.get("trainer", {})}
    )


def tiny_data(corpus: Path, collate_train, collate_eval, batch_size: int = 16):
    splits = load_splits(corpus / "data/tokenized", VOCAB, 20)
    return TokenizedDataModule(
        splits, train_collate=collate_train, eval_collate=collate_eval, batch_size=batch_size
    )


def without_timing(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in TIMING_KEYS}


# ------------------------------------------------------------------ fast_dev_run


def test_fast_dev_run_mlm(corpus: Path) -> None:
    model_p, trainer_p = sections()
    run = default_section("pretrain", **PRETRAIN)
    data = tiny_data(corpus, LMCollator(16, VOCAB), LMCollator(16, VOCAB, seed=0))
    module = LMModule(LanguageModel(model_p, VOCAB), run)
    trainer = build_trainer(trainer_p, run, [], fast_dev_run=True)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1
    assert math.isfinite(float(trainer.callback_metrics["val_loss"]))


def test_fast_dev_run_classifier(corpus: Path) -> None:
    model_p, trainer_p = sections()
    run = default_section("finetune", **FINETUNE)
    collate = ClassifyCollator(16, "chunk", 3)
    data = tiny_data(corpus, collate, collate)
    module = ClassifierModule(Classifier(model_p, VOCAB, 20), run, n_classes=20)
    trainer = build_trainer(trainer_p, run, [], fast_dev_run=True)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1
    # fast_dev_run validates one batch after the step: the logged accuracy is that batch's
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        predicted = module.eval()(batch).argmax(1)
    expected = (predicted == batch["labels"]).double().mean().item()
    assert float(trainer.callback_metrics["val_acc"]) == pytest.approx(expected)


def test_loss_curve_rows_go_to_the_sink_as_they_are_made(corpus: Path) -> None:
    """What MLflow gets is exactly the DVC curve: the same rows, steps and values."""
    model_p, trainer_p = sections()
    run = default_section("pretrain", **{**PRETRAIN, "max_steps": 6, "val_every_steps": 3})
    data = tiny_data(corpus, LMCollator(16, VOCAB), LMCollator(16, VOCAB, seed=0))
    sent: list[tuple[int, str, float]] = []
    curve = LossCurve(every=2)
    trainer = build_trainer(
        trainer_p,
        run,
        [curve],
        curve_sink=lambda values, step: sent.extend((step, k, v) for k, v in values.items()),
    )
    trainer.fit(LMModule(LanguageModel(model_p, VOCAB), run), datamodule=data)
    expected = [(r["step"], "train_loss", r["loss"]) for r in curve.train]
    expected += [(r["step"], "val_loss", r["loss"]) for r in curve.val]
    assert [r["step"] for r in curve.train] == [2, 4, 6]
    assert [r["step"] for r in curve.val] == [3, 6]
    assert sorted(sent) == sorted(expected)


def test_step_based_progress_bar_has_no_negative_epoch_count() -> None:
    def description(**budget: int | None) -> str:
        run = default_section("pretrain", **{**PRETRAIN, **budget})
        trainer = build_trainer(default_section("trainer", progress_bar=True), run, [])
        bar = trainer.progress_bar_callback
        assert isinstance(bar, StepProgressBar)
        bar.setup(trainer, None, "fit")
        return bar._get_train_description(0).strip()

    assert description(max_steps=600, max_epochs=None) == "Epoch 0 (to step 600)"  # not 0/-2
    assert description(max_steps=None, max_epochs=3) == "Epoch 0/2"


# ---------------------------------------------------------------- stages end to end


def test_pretrain_then_finetune_write_their_outputs(project: Path) -> None:
    model_p, trainer_p = sections()
    pre = pretrain(model_p, default_section("pretrain", **PRETRAIN), trainer_p, 0)
    assert pre is not None and pre["steps"] == 30
    assert pre["val_perplexity"] == pytest.approx(math.exp(pre["val_loss"]), rel=1e-4)
    assert pre["val_loss"] < math.log(VOCAB)  # learned something beyond uniform
    assert json.loads(Path("reports/pretrain.json").read_text()) == pre
    assert sorted(p.name for p in Path("data/models/pretrained").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    curve = pd.read_csv("reports/pretrain/validation.csv")
    assert curve["step"].tolist() == [15, 30] and list(curve.columns) == ["step", "loss"]
    assert len(pd.read_csv("reports/pretrain/train.csv")) == 6

    params = default_section(
        "finetune", **{**FINETUNE, "init": "pretrained", "long_doc": "head_tail"}
    )
    result = finetune(model_p, params, trainer_p, 0)
    assert result is not None and result["init"] == "pretrained"
    table = pd.read_parquet("data/predictions/transformer/predictions.parquet")
    Predictions.validate(table)
    assert table.groupby("split").size().to_dict() == {"test": 60, "validation": 60}
    assert table.loc[table["split"] == "test", "id"].str.startswith("test/").all()
    val = table[table["split"] == "validation"]
    accuracy = (val[list(LOGIT_COLUMNS)].to_numpy().argmax(1) == val["label"].to_numpy()).mean()
    assert result["validation_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert set(json.loads(Path("reports/finetune.json").read_text())) >= {
        "validation_accuracy",
        "validation_nll",
        "selected_step",
    }
    config = json.loads(Path("data/models/classifier/config.json").read_text())
    assert config["model"] == model_p.model_dump() and config["long_doc"] == "head_tail"
    # no temporary leftovers next to the outputs
    leftovers = [p for p in Path(".").rglob(".*.tmp")]
    assert leftovers == []


def test_causal_lm_pretraining_learns_and_feeds_finetune(project: Path) -> None:
    model_p, trainer_p = sections()
    pre = pretrain(
        model_p, default_section("pretrain", **{**PRETRAIN, "objective": "clm"}), trainer_p, 0
    )
    assert pre is not None and pre["objective"] == "clm"
    assert pre["val_loss"] < math.log(VOCAB)  # next tokens are partly predictable
    config = json.loads(Path("data/models/pretrained/config.json").read_text())
    assert config["objective"] == "clm"
    params = default_section("finetune", **{**FINETUNE, "init": "pretrained", "max_epochs": 1})
    result = finetune(model_p, params, trainer_p, 0)
    assert result is not None and result["init"] == "pretrained" and result["steps"] > 0


def test_finetune_loads_the_pretrained_encoder(project: Path) -> None:
    model_p, trainer_p = sections()
    pretrain(model_p, default_section("pretrain", **{**PRETRAIN, "max_steps": 2}), trainer_p, 0)
    from safetensors.torch import load_file

    saved = load_file("data/models/pretrained/model.safetensors")
    params = default_section("finetune", **{**FINETUNE, "init": "pretrained"})
    model = build_classifier(model_p, params, VOCAB, Path("data/models/pretrained"))
    for key, value in model.encoder.state_dict().items():
        torch.testing.assert_close(value, saved[f"encoder.{key}"])
    other = default_section("model", **{**MODEL, "d_model": 16})
    with pytest.raises(PipelineError, match="does not match the model section"):
        build_classifier(other, params, VOCAB, Path("data/models/pretrained"))


def test_two_seeded_runs_are_identical(project: Path, tmp_path_factory) -> None:
    model_p, trainer_p = sections(model={"dropout": 0.1})
    results = []
    for run in range(2):
        out = tmp_path_factory.mktemp(f"run{run}")
        pre = pretrain(
            model_p,
            default_section("pretrain", **PRETRAIN),
            trainer_p,
            7,
            out_model=out / "pretrained",
            report=out / "pretrain.json",
            curves=out / "pretrain",
        )
        params = default_section("finetune", **{**FINETUNE, "init": "pretrained", "max_epochs": 2})
        fin = finetune(
            model_p,
            params,
            trainer_p,
            7,
            pretrained=out / "pretrained",
            out_model=out / "classifier",
            out_predictions=out / "predictions",
            report=out / "finetune.json",
            curves=out / "finetune",
        )
        logits = pd.read_parquet(out / "predictions/predictions.parquet")
        results.append((without_timing(pre), without_timing(fin), logits))
    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1]
    pd.testing.assert_frame_equal(results[0][2], results[1][2], check_exact=True)


# ------------------------------------------------------------------- failure modes


def test_nan_loss_stops_training_with_a_clear_message(corpus: Path) -> None:
    model_p, trainer_p = sections()
    run = default_section("pretrain", **PRETRAIN)
    data = tiny_data(corpus, LMCollator(16, VOCAB), LMCollator(16, VOCAB, seed=0))
    model = LanguageModel(model_p, VOCAB)
    with torch.no_grad():
        model.encoder.tok_emb.weight[7] = float("nan")  # any batch holding token 7 is NaN
    trainer = build_trainer(trainer_p, run, [])
    with pytest.raises(NonFiniteLossError, match=r"training loss became nan at step 0"):
        trainer.fit(LMModule(model, run), datamodule=data)


def test_diverging_finetune_writes_nothing(project: Path, capsys) -> None:
    model_p, trainer_p = sections()
    params = default_section("finetune", **{**FINETUNE, "grad_clip": None, "warmup_fraction": 0})
    params = params.model_copy(update={"lr": 1e30})  # past the param's range, to diverge

    def main() -> None:
        finetune(model_p, params, trainer_p, 0)

    with pytest.raises(SystemExit) as exit_info:
        run_stage(main)
    assert exit_info.value.code == 1
    assert "error: training loss became" in capsys.readouterr().err
    assert not Path("data/models/classifier").exists()
    assert not Path("data/predictions").exists() or not any(Path("data/predictions").rglob("*"))
    assert not Path("reports/finetune.json").exists()


def test_missing_or_bad_inputs_are_clear_errors(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(PipelineError, match="tokenizer not found"):
        load_vocab_size(tmp_path / "tokenizer.json")
    with pytest.raises(PipelineError, match="tokenized dataset not found"):
        load_splits(tmp_path / "nothing", VOCAB, 20)
    with pytest.raises(PipelineError, match="outside the vocabulary"):
        load_splits(corpus / "data/tokenized", 10, 20)
    with pytest.raises(PipelineError, match="labels outside"):
        load_splits(corpus / "data/tokenized", VOCAB, 5)


# ---------------------------------------------------------------- optimizer pieces


def test_param_groups_decay_and_layer_lr() -> None:
    model = Classifier(default_section("model", **{**MODEL, "n_layers": 2}), VOCAB, 20)
    groups = param_groups(model, lr=1.0, weight_decay=0.1, n_layers=2, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = 0
    for group in groups:
        for param in group["params"]:
            name = names[id(param)]
            seen += 1
            decays = param.ndim >= 2 and "emb" not in name
            assert group["weight_decay"] == (0.1 if decays else 0.0), name
            if "tok_emb" in name or "pos_emb" in name:
                assert group["lr"] == 0.125
            elif "blocks.0." in name:
                assert group["lr"] == 0.25
            elif "blocks.1." in name:
                assert group["lr"] == 0.5
            else:  # final norm and head
                assert group["lr"] == 1.0, name
    assert seen == len(list(model.parameters()))


def test_embedding_lr_gives_the_token_embedding_its_own_group() -> None:
    model = Classifier(default_section("model", **{**MODEL, "n_layers": 2}), VOCAB, 20)
    groups = param_groups(model, lr=1.0, weight_decay=0.1, n_layers=2, embedding_lr=30.0)
    own = [g for g in groups if g["lr"] == 30.0]
    assert len(own) == 1 and own[0]["weight_decay"] == 0.0
    assert own[0]["params"] == [model.encoder.tok_emb.weight]
    rest = [p for g in groups if g["lr"] != 30.0 for p in g["params"]]
    assert len(rest) + 1 == len(list(model.parameters()))  # every parameter exactly once


def test_warmup_then_decay() -> None:
    cosine = WarmupDecay(total=110, warmup=10, schedule="cosine", min_ratio=0.1)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.55) and cosine(110) == pytest.approx(0.1)
    linear = WarmupDecay(total=110, warmup=10, schedule="linear", min_ratio=0.0)
    assert linear(60) == pytest.approx(0.5) and linear(200) == 0.0
    assert WarmupDecay(110, 0, "constant", 0.0)(50) == 1.0


def test_freeze_epochs_keep_the_encoder_fixed(corpus: Path) -> None:
    model_p, trainer_p = sections()
    run = default_section("finetune", **{**FINETUNE, "max_epochs": 1, "freeze_epochs": 1})
    collate = ClassifyCollator(16, "head", 1)
    model = Classifier(model_p, VOCAB, 20)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = ClassifierModule(model, run, n_classes=20, freeze_epochs=1)
    build_trainer(trainer_p, run, []).fit(module, datamodule=tiny_data(corpus, collate, collate))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert not torch.equal(before["head.weight"], after["head.weight"])


def test_freeze_epochs_with_plain_ddp_is_refused(project: Path) -> None:
    model_p, trainer_p = sections(trainer={"strategy": "ddp"})
    params = default_section("finetune", **{**FINETUNE, "freeze_epochs": 1})
    with pytest.raises(PipelineError, match="ddp_find_unused_parameters_true"):
        finetune(model_p, params, trainer_p, 0)


# ------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("group", "section"),
    [
        ("model", ModelParams),
        ("trainer", TrainerParams),
        ("pretrain", PretrainParams),
        ("finetune", FinetuneParams),
    ],
)
def test_config_groups_are_valid_sections(group: str, section: type) -> None:
    files = sorted((ROOT / "conf" / group).glob("*.yaml"))
    assert files
    for path in files:
        section.model_validate(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize(
    "choices",
    [
        {"model": "cpu", "pretrain": "default", "finetune": "default", "trainer": "cpu"},
        {"model": "gpu", "pretrain": "default", "finetune": "default", "trainer": "ddp"},
        {"model": "tiny", "pretrain": "default", "finetune": "default", "trainer": "gpu"},
    ],
)
def test_hydra_composes_the_groups_into_valid_params(choices: dict, tmp_path: Path) -> None:
    from pipeline.config import compose, load_section

    primary = yaml.safe_load((ROOT / "conf/config.yaml").read_text())
    listed = {next(iter(d)) for d in primary.get("defaults", []) if isinstance(d, dict)}
    # "+group=choice" appends a group the primary config does not list (yet)
    overrides = [f"{'' if g in listed else '+'}{g}={c}" for g, c in choices.items()]
    path = tmp_path / "params.yaml"
    path.write_text(compose(overrides))
    models = {
        "model": ModelParams,
        "pretrain": PretrainParams,
        "finetune": FinetuneParams,
        "trainer": TrainerParams,
    }
    for group, section in models.items():
        load_section(group, section, path)


def test_gpu_experiment_runs_a_few_steps_on_cpu(corpus: Path, tmp_path: Path) -> None:
    """experiment=gpu (its model, trainer with bf16 autocast, finetune settings) works on
    CPU, slowly."""
    from pipeline.config import compose, load_section

    path = tmp_path / "params.yaml"
    path.write_text(compose(["experiment=gpu"]))
    model_p = load_section("model", ModelParams, path)
    assert model_p.d_model == 512 and model_p.n_layers == 8
    trainer_p = load_section("trainer", TrainerParams, path)
    assert trainer_p.precision == "bf16-mixed"
    trainer_p = trainer_p.model_copy(
        update={"accelerator": "cpu", "num_workers": 0, "progress_bar": False}
    )
    params = load_section("finetune", FinetuneParams, path)
    run = params.model_copy(
        update={"max_steps": 2, "max_epochs": None, "batch_size": 2, "val_every_steps": 2}
    )
    collate = ClassifyCollator(model_p.max_len, run.long_doc, 2)
    data = tiny_data(corpus, collate, collate, batch_size=2)
    module = ClassifierModule(Classifier(model_p, VOCAB, 20), run, n_classes=20)
    trainer = build_trainer(trainer_p, run, [], limit_val_batches=1)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    assert math.isfinite(float(trainer.callback_metrics["val_loss"]))


# ----------------------------------------------------------------------------- DDP


def test_ddp_finetune_on_two_cpu_processes(corpus: Path, tmp_path: Path) -> None:
    """The stage as DVC runs it, with strategy=ddp on 2 CPU processes (gloo)."""
    (tmp_path / "data").mkdir()
    for name in ("tokenizer", "tokenized"):
        (tmp_path / "data" / name).symlink_to(corpus / "data" / name)
    params = params_with(
        seed=0,
        model=MODEL,
        finetune={**FINETUNE, "batch_size": 8, "max_epochs": 6},
        trainer={**TRAINER, "accelerator": "cpu", "devices": 2, "strategy": "ddp"},
        tracking={"enabled": False},
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.finetune"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "reports/finetune.json").read_text())
    assert report["world_size"] == 2
    assert report["validation_accuracy"] > 0.3  # chance is 0.05
    table = pd.read_parquet(tmp_path / "data/predictions/transformer/predictions.parquet")
    Predictions.validate(table)
    assert len(table) == SIZES["validation"] + SIZES["test"]
    assert proc.stdout.count("finetune: validation accuracy") == 1  # rank 0 reports once


# ------------------------------------------------------------------ resume after a crash


def pretrain_workdir(corpus: Path, folder: Path, tracking: bool = False) -> Path:
    """A stage folder (params.yaml, data/ linked to the tiny corpus) for an epoch-based
    pretraining that runs long enough to be killed between two checkpoints."""
    (folder / "data").mkdir(parents=True)
    for name in ("tokenizer", "tokenized"):
        (folder / "data" / name).symlink_to(corpus / "data" / name)
    pretrain = {**PRETRAIN, "max_steps": None, "max_epochs": 40, "val_every_steps": None}
    params = params_with(
        seed=0,
        model=MODEL,
        pretrain=pretrain,
        trainer={**TRAINER, "threads": 1},
        tracking={"enabled": tracking},
    )
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder


def stage_process(folder: Path) -> subprocess.Popen:
    store = f"sqlite:///{folder / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env["MLFLOW_TRACKING_URI"] = store
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.stages.pretrain"],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_killed_training_stage_resumes_to_the_same_weights(corpus: Path, tmp_path: Path) -> None:
    """SIGKILL after the first end-of-epoch checkpoint, rerun: the resumed run ends with
    exactly the weights of an uninterrupted run, and its checkpoints are gone."""
    import signal
    import time

    whole = pretrain_workdir(corpus, tmp_path / "whole")
    out, _ = stage_process(whole).communicate(timeout=600)
    assert not (whole / ".checkpoints").exists(), out  # discarded after success
    expected = (whole / "data/models/pretrained/model.safetensors").read_bytes()

    killed = pretrain_workdir(corpus, tmp_path / "killed", tracking=True)
    proc = stage_process(killed)
    deadline = time.monotonic() + 600
    while not list(killed.glob(".checkpoints/pretrain/*/last.ckpt")):
        assert proc.poll() is None, f"finished before a checkpoint was seen:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "data/models/pretrained").exists()  # nothing half-written

    resumed = stage_process(killed)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert "pretrain: resuming the interrupted run from .checkpoints/pretrain/" in out
    assert json.loads((killed / "reports/pretrain.json").read_text())["resumed"] is True
    assert (killed / "data/models/pretrained/model.safetensors").read_bytes() == expected
    assert not (killed / ".checkpoints/pretrain").exists()
    # The resumed stage's MLflow run has the whole curve, the rows made before the kill too.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{killed / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("newsgroups-pipeline")
    (done,) = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    history = client.get_metric_history(done.info.run_id, "pretrain/train_loss")
    rows = pd.read_csv(killed / "reports/pretrain/train.csv")
    assert sorted(m.step for m in history) == rows["step"].tolist()
    np.testing.assert_allclose(
        [m.value for m in sorted(history, key=lambda m: m.step)], rows["loss"], rtol=1e-5
    )
