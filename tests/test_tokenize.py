"""Unit tests of the tokenize stage: training, special ids, whole-document encoding."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline.domain import CLS_ID, SEP_ID, SPECIAL_TOKENS, UNK_ID
from pipeline.sources.bydate import parse_archive
from pipeline.tokenization import (
    encode_split,
    split_stats,
    train_tokenizer,
)
from tests.helpers import default_section


@pytest.fixture(scope="module")
def docs(tiny_archive: tuple[Path, str]) -> pd.DataFrame:
    return parse_archive(tiny_archive[0], progress=False)


def test_bpe_training_is_deterministic(docs: pd.DataFrame) -> None:
    params = default_section("tokenizer", kind="bpe", vocab_size=400, min_frequency=1)
    texts = docs.loc[docs["split"] == "train", "text"].tolist()
    first = train_tokenizer(texts, params).to_str()
    assert all(train_tokenizer(texts, params).to_str() == first for _ in range(3))


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_special_tokens_have_fixed_ids(docs: pd.DataFrame, kind: str) -> None:
    params = default_section("tokenizer", kind=kind, vocab_size=400, min_frequency=1)
    a = train_tokenizer(docs.loc[docs["split"] == "train", "text"].tolist(), params)
    assert [a.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    served = a.encode("hello world")  # the template used when serving adds CLS/SEP
    assert served.ids[0] == CLS_ID and served.ids[-1] == SEP_ID


def test_lowercase_param_changes_normalisation(docs: pd.DataFrame) -> None:
    texts = docs["text"].tolist()
    lower = train_tokenizer(texts, default_section("tokenizer", vocab_size=400, lowercase=True))
    cased = train_tokenizer(texts, default_section("tokenizer", vocab_size=400, lowercase=False))
    assert lower.encode("SUBJECT").tokens == lower.encode("subject").tokens
    assert cased.encode("SUBJECT").tokens != cased.encode("subject").tokens


def test_encoding_keeps_whole_documents_without_specials(docs: pd.DataFrame) -> None:
    tok = train_tokenizer(docs["text"].tolist(), default_section("tokenizer", vocab_size=400))
    long_doc = docs.iloc[:2].copy()
    long_doc.loc[long_doc.index[0], "text"] = " ".join(["interesting"] * 3000)
    ds = encode_split(long_doc, tok, batch_size=1, fingerprint="f" * 32, name="t")
    assert ds.column_names == ["id", "label", "input_ids", "length"]
    assert ds[0]["length"] == len(ds[0]["input_ids"]) >= 3000  # no truncation
    assert CLS_ID not in ds[1]["input_ids"] and SEP_ID not in ds[1]["input_ids"]
    assert ds[1]["input_ids"] == tok.encode(long_doc.iloc[1]["text"], add_special_tokens=False).ids
    assert ds[0]["id"] == long_doc.iloc[0]["id"] and ds[0]["label"] == long_doc.iloc[0]["label"]


def test_split_stats_counts_tokens_and_unknowns(docs: pd.DataFrame) -> None:
    params = default_section(
        "tokenizer", kind="wordpiece", vocab_size=400
    )  # BPE has no unknown token
    tok = train_tokenizer(docs["text"].tolist(), params)
    part = docs.iloc[:3].copy()
    part.loc[part.index[2], "text"] = "漢字"  # characters never seen in training
    ds = encode_split(part, tok, batch_size=2, fingerprint="e" * 32, name="t")
    stats = split_stats(ds, tok.get_vocab_size())
    lengths = [len(x) for x in ds["input_ids"]]
    assert stats["documents"] == 3 and stats["tokens"] == sum(lengths)
    assert stats["length_percentiles"]["max"] == max(lengths)
    unknown = sum(x.count(UNK_ID) for x in ds["input_ids"])
    assert unknown >= 1 and stats["unk_rate"] == round(unknown / sum(lengths), 6)
