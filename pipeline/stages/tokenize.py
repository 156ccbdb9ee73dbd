"""Stage `tokenize`: train a subword tokenizer on the train split and encode every split.

The tokenizer (Hugging Face ``tokenizers``: byte-level BPE, the default, or WordPiece)
sees the train split only; byte-level BPE trains deterministically, WordPiece does not
(huggingface/tokenizers#1794: ties between merges are broken in hash-map order).
Every document is encoded whole, without special tokens and without truncation: the
model stages decide how to window, chunk or truncate long posts and add ``[CLS]`` /
``[SEP]`` themselves. Special tokens have fixed ids the model stages rely on.

Outputs: ``data/tokenizer/tokenizer.json``, ``data/tokenized/`` (a ``datasets``
DatasetDict saved with ``save_to_disk``: id, label, input_ids, length per split) and
``reports/tokenize.json`` (vocab size, tokens per split, length percentiles, unknown rate).
"""

from __future__ import annotations

import os
import sys
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from pipeline import paths
from pipeline.config import Section, load_section
from pipeline.domain import CLS_ID, SEP_ID, SPECIAL_TOKENS, SPLITS, UNK_ID, special_token_mismatch
from pipeline.errors import PipelineError, run_stage
from pipeline.io import atomic_outputs, digest_strings, sha256_file, write_json
from pipeline.predictions import read_documents
from pipeline.schemas import Documents, TokenizedSplit, validate
from pipeline.tracking import StageRun

PERCENTILES = (50, 90, 95, 99)


class TokenizerParams(Section):
    """Section ``tokenizer`` of params.yaml."""

    kind: Literal["bpe", "wordpiece"] = Field(
        description="bpe: byte-level BPE, no unknown token, deterministic (the default); "
        "wordpiece: BERT-style, its vocabulary can differ slightly between runs."
    )
    vocab_size: int = Field(
        ge=300, le=1_000_000, description="Tokens in the vocabulary, special tokens included."
    )
    lowercase: bool = Field(description="Lowercase the text before tokenizing.")
    min_frequency: int = Field(
        ge=1, description="Least train frequency of a merge or token to enter the vocabulary."
    )
    batch_size: int = Field(
        ge=1, description="Documents per batch of the datasets.map that encodes every split."
    )


def new_tokenizer(params: TokenizerParams):  # -> (Tokenizer, Trainer)
    """An untrained tokenizer and its trainer, with the special tokens first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

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


def train_tokenizer(texts: list[str], params: TokenizerParams):  # -> Tokenizer
    """Train on ``texts`` (the train split) and add the [CLS] ... [SEP] template for serving."""
    from tokenizers.processors import TemplateProcessing

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


def encode_split(df: pd.DataFrame, tokenizer, batch_size: int, fingerprint: str, name: str):
    """Encode one split with a batched ``datasets.map`` (whole documents, no specials).

    The map works on Arrow batches and builds the token column with pyarrow directly,
    skipping datasets' per-row Python conversion: the stage keeps up with a bare
    ``encode_batch`` over the same texts (see ``make bench``).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
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


def split_stats(ds, vocab_size: int) -> dict:
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


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from datasets import DatasetDict, disable_caching

    disable_caching()  # artifacts go to data/ via save_to_disk, not to the HF cache
    params = load_section("tokenizer", TokenizerParams)
    tracking = StageRun("tokenize")
    docs = validate(read_documents(columns=None), Documents, str(paths.DOCUMENTS))
    train_texts = docs.loc[docs["split"] == "train", "text"].tolist()
    if not train_texts:
        raise PipelineError(f"{paths.DOCUMENTS}: the train split is empty")
    if params.kind == "wordpiece":
        print(
            "tokenize: warning: WordPiece training is not deterministic in `tokenizers` "
            "(huggingface/tokenizers#1794); use tokenizer=bpe for byte-identical reruns",
            file=sys.stderr,
        )
    tokenizer = train_tokenizer(train_texts, params)
    vocab_size = tokenizer.get_vocab_size()
    tok_json = tokenizer.to_str()
    splits = {}
    for split in SPLITS:
        part = docs[docs["split"] == split].reset_index(drop=True)
        fingerprint = digest_strings([tok_json, split, *part["id"], *part["text"]])[:32]
        splits[split] = encode_split(part, tokenizer, params.batch_size, fingerprint, split)
        validate(
            splits[split].select_columns(["id", "label", "length"]).to_pandas(),
            TokenizedSplit,
            f"{paths.TOKENIZED}/{split}",
        )
    report = {
        "kind": params.kind,
        "vocab_size": vocab_size,
        "lowercase": params.lowercase,
        "special_tokens": {t: i for i, t in enumerate(SPECIAL_TOKENS)},
        "splits": {name: split_stats(ds, vocab_size) for name, ds in splits.items()},
    }
    with atomic_outputs() as out:
        tokenizer.save(str(out.dir(paths.TOKENIZER_DIR) / "tokenizer.json"))
        DatasetDict(splits).save_to_disk(str(out.dir(paths.TOKENIZED)))
        write_json(out.file(paths.stage_report("tokenize")), report)
    train = report["splits"]["train"]
    print(
        f"tokenize: vocab {vocab_size}, train {train['tokens']} tokens "
        f"(mean {train['mean_length']}/doc) -> {paths.TOKENIZER_DIR}, {paths.TOKENIZED}, "
        f"{paths.stage_report('tokenize')}"
    )
    inputs = {"documents": sha256_file(paths.DOCUMENTS)}
    tracking.finish(
        ["tokenizer"],
        report=report,
        artifacts=[paths.stage_report("tokenize"), paths.TOKENIZER_DIR / "tokenizer.json"],
        inputs=inputs,
    )


if __name__ == "__main__":
    run_stage(main)
