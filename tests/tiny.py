"""A tiny synthetic tokenized corpus and tiny configs for the model and training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.domain import GROUPS, SPECIAL_TOKENS
from pipeline.encoder.data import TokenizedDataModule
from pipeline.encoder.model import ModelParams
from pipeline.encoder.params import TrainerParams
from pipeline.encoder.tokens import load_splits
from tests.helpers import default_section

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
