"""The pretrain and finetune stages on the tiny corpus: outputs, determinism, DDP, resume."""

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

from pipeline.domain import LOGIT_COLUMNS
from pipeline.encoder.collate import ClassifyCollator
from pipeline.encoder.model import Classifier, ModelParams
from pipeline.encoder.modules import ClassifierModule
from pipeline.encoder.params import TrainerParams
from pipeline.encoder.tokens import load_splits, load_vocab_size
from pipeline.encoder.trainer import build_trainer
from pipeline.encoder.training_stage import FinetunePaths, PretrainPaths
from pipeline.errors import PipelineError, run_stage
from pipeline.schemas import Predictions
from pipeline.stages.finetune import (
    FinetuneParams,
    build_classifier,
)
from pipeline.stages.finetune import train_classifier as finetune
from pipeline.stages.pretrain import pretrain_lm as pretrain
from tests.helpers import ROOT, default_section, params_with
from tests.tiny import (
    FINETUNE,
    MODEL,
    PRETRAIN,
    SIZES,
    TRAINER,
    VOCAB,
    sections,
    tiny_data,
    without_timing,
)

pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.slow
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
            PretrainPaths(
                model=out / "pretrained", report=out / "pretrain.json", curves=out / "pretrain"
            ),
        )
        params = default_section("finetune", **{**FINETUNE, "init": "pretrained", "max_epochs": 2})
        fin = finetune(
            model_p,
            params,
            trainer_p,
            7,
            FinetunePaths(
                pretrained=out / "pretrained",
                model=out / "classifier",
                predictions=out / "predictions",
                report=out / "finetune.json",
                curves=out / "finetune",
            ),
        )
        logits = pd.read_parquet(out / "predictions/predictions.parquet")
        results.append((without_timing(pre), without_timing(fin), logits))
    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1]
    pd.testing.assert_frame_equal(results[0][2], results[1][2], check_exact=True)


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


def test_freeze_epochs_with_plain_ddp_is_refused(project: Path) -> None:
    model_p, trainer_p = sections(trainer={"strategy": "ddp"})
    params = default_section("finetune", **{**FINETUNE, "freeze_epochs": 1})
    with pytest.raises(PipelineError, match="ddp_find_unused_parameters_true"):
        finetune(model_p, params, trainer_p, 0)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    (done,) = client.search_runs(
        [experiment.experiment_id], "attributes.status = 'FINISHED' and tags.stage = 'pretrain'"
    )
    history = client.get_metric_history(done.info.run_id, "pretrain/train_loss")
    rows = pd.read_csv(killed / "reports/pretrain/train.csv")
    assert sorted(m.step for m in history) == rows["step"].tolist()
    np.testing.assert_allclose(
        [m.value for m in sorted(history, key=lambda m: m.step)], rows["loss"], rtol=1e-5
    )
