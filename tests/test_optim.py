"""Optimizer pieces: parameter groups, layer-wise and embedding LRs, the LR schedule."""

from __future__ import annotations

import pytest

from pipeline.encoder.model import Classifier
from pipeline.encoder.optim import WarmupDecay, param_groups
from tests.helpers import default_section
from tests.tiny import (
    MODEL,
    VOCAB,
)


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
