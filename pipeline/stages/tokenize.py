"""Stage `tokenize`: train a subword tokenizer on the train split and encode every split.

The tokenizer (Hugging Face ``tokenizers``: byte-level BPE, the default, or WordPiece)
sees the train split only; byte-level BPE trains deterministically, WordPiece does not
(``tokenizers`` breaks ties between merges in hash-map order).
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

from pydantic import Field

from pipeline import paths
from pipeline.config import Section, load_section
from pipeline.domain import SPECIAL_TOKENS, SPLITS
from pipeline.errors import PipelineError, run_stage
from pipeline.io import atomic_outputs, digest_strings, sha256_file, write_json
from pipeline.predictions import read_documents
from pipeline.schemas import Documents, TokenizedSplit, validate
from pipeline.tokenization import TokenizerKind, encode_split, split_stats, train_tokenizer
from pipeline.tracking import StageRun


class TokenizerParams(Section):
    """Section ``tokenizer`` of params.yaml."""

    kind: TokenizerKind = Field(
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


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # Deferred: datasets is slow to import, and `make params` imports this module too.
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
