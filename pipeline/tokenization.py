"""Train a subword tokenizer and encode documents with it (Hugging Face ``tokenizers``).

Byte-level BPE or WordPiece, with the special tokens first so their ids are the fixed ones
:mod:`pipeline.domain` names; documents are encoded whole, without special tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing

from pipeline.domain import CLS_ID, SEP_ID, SPECIAL_TOKENS, UNK_ID, special_token_mismatch
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from datasets import Dataset

PERCENTILES = (50, 90, 95, 99)

TokenizerKind = Literal["bpe", "wordpiece"]


class TokenizerOptions(Protocol):
    """The ``tokenizer`` params :func:`train_tokenizer` reads (see the tokenize stage's
    section)."""

    kind: TokenizerKind
    vocab_size: int
    lowercase: bool
    min_frequency: int


def new_tokenizer(params: TokenizerOptions) -> tuple[Tokenizer, trainers.Trainer]:
    """An untrained tokenizer and its trainer, with the special tokens first."""
    specials = list(SPECIAL_TOKENS)
    if params.kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=params.lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=params.vocab_size,
            min_frequency=params.min_frequency,
            special_tokens=specials,
            show_progress=True,
        )
    else:
        tok = Tokenizer(models.BPE())
        steps = [normalizers.NFC()] + ([normalizers.Lowercase()] if params.lowercase else [])
        tok.normalizer = normalizers.Sequence(steps)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=params.vocab_size,
            min_frequency=params.min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=True,
        )
    return tok, trainer


def train_tokenizer(texts: list[str], params: TokenizerOptions) -> Tokenizer:
    """Train on ``texts`` (the train split) and add the [CLS] ... [SEP] template for serving."""
    tok, trainer = new_tokenizer(params)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    mismatch = special_token_mismatch(tok)
    if mismatch:  # pragma: no cover - guarded by tokenizers
        raise PipelineError(f"tokenizer: {mismatch}")
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)],
    )
    return tok


def encode_split(
    df: pd.DataFrame, tokenizer: Tokenizer, batch_size: int, fingerprint: str, name: str
) -> Dataset:
    """Encode one split with a batched ``datasets.map`` (whole documents, no specials).

    The map works on Arrow batches and builds the token column with pyarrow directly,
    skipping datasets' per-row Python conversion: the stage keeps up with a bare
    ``encode_batch`` over the same texts (see ``make bench``).
    """
    # Deferred: datasets is slow to import, and training a tokenizer does not need it.
    from datasets import Dataset

    def encode(batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        ids = pa.array([e.ids for e in encodings], type=pa.list_(pa.int32()))
        return pa.table(
            {
                "id": batch.column("id").cast(pa.string()),
                "label": batch.column("label"),
                "input_ids": ids,
                "length": pc.list_value_length(ids).cast(pa.int32()),
            }
        )

    ds = Dataset.from_pandas(df[["id", "label", "text"]], preserve_index=False)
    encoded = ds.with_format("arrow").map(
        encode,
        batched=True,
        batch_size=batch_size,
        remove_columns=["text"],
        new_fingerprint=fingerprint,
        desc=f"tokenizing {name}",
    )
    return encoded.with_format(None)


def split_stats(ds: Dataset, vocab_size: int) -> dict:
    """Token counts, length percentiles and unknown-token rate of one encoded split."""
    lengths = np.asarray(ds["length"], dtype=np.int64)
    ids = ds.data.column("input_ids").combine_chunks().flatten().to_numpy()
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise PipelineError(f"tokenize: token id outside [0, {vocab_size}) in the output")
    total = int(lengths.sum())
    return {
        "documents": len(lengths),
        "tokens": total,
        "mean_length": round(float(lengths.mean()), 2) if len(lengths) else 0.0,
        "length_percentiles": {
            f"p{p}": int(np.percentile(lengths, p)) if len(lengths) else 0 for p in PERCENTILES
        }
        | {"max": int(lengths.max()) if len(lengths) else 0},
        "unk_rate": round(float((ids == UNK_ID).sum()) / max(total, 1), 6),
    }
