"""Lightning modules on the tiny corpus: fast_dev_run, curves, progress, NaN, freezing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.encoder.callbacks import LossCurve, StepProgressBar
from pipeline.encoder.collate import ClassifyCollator
from pipeline.encoder.data import LMCollator
from pipeline.encoder.model import Classifier, LanguageModel
from pipeline.encoder.modules import ClassifierModule, LMModule, NonFiniteLossError
from pipeline.encoder.trainer import build_trainer
from tests.helpers import default_section
from tests.tiny import (
    FINETUNE,
    PRETRAIN,
    VOCAB,
    sections,
    tiny_data,
)

pytestmark = pytest.mark.usefixtures("one_thread")


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
