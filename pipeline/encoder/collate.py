"""Documents to classifier batches: the chunking both fine-tuning and serving use.

Lightning-free (torch and numpy only) so the served model can import it: the same
:class:`ClassifyCollator` builds the batches ``finetune`` trains and predicts on and the
ones the served model scores, so served logits equal the pipeline's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from pipeline.domain import CLS_ID, PAD_ID, SEP_ID
from pipeline.encoder.tokens import Example

LongDoc = Literal["chunk", "head_tail", "head"]


def pad_sequences(seqs: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    """Right-pad int sequences into (input_ids int64, attention_mask bool)."""
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.full((len(seqs), int(lengths.max())), PAD_ID, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.from_numpy(np.asarray(seq, dtype=np.int64))
    return ids, torch.arange(ids.shape[1])[None, :] < lengths[:, None]


def wrap(body: np.ndarray) -> np.ndarray:
    """``[CLS] body [SEP]``."""
    return np.concatenate(([CLS_ID], body, [SEP_ID])).astype(np.int64)


def split_document(
    tokens: np.ndarray, strategy: LongDoc, body_len: int, max_chunks: int, head_fraction: float
) -> list[np.ndarray]:
    """The token bodies (without [CLS]/[SEP]) the classifier sees for one document.

    ``chunk``: consecutive chunks of ``body_len`` tokens, at most ``max_chunks``; when the
    document fits in ``max_chunks`` chunks the last one is aligned to the document's end
    (overlapping its neighbour) so no chunk is a short stub. ``head_tail``: the first
    ``head_fraction`` of the budget from the start and the rest from the end.
    ``head``: the first ``body_len`` tokens. A document never yields zero sequences.
    """
    n = len(tokens)
    if n <= body_len:
        return [tokens]
    if strategy == "head":
        return [tokens[:body_len]]
    if strategy == "head_tail":
        n_head = round(body_len * head_fraction)
        return [np.concatenate((tokens[:n_head], tokens[n - (body_len - n_head) :]))]
    n_chunks = -(-n // body_len)
    if n_chunks > max_chunks:
        return [tokens[i * body_len : (i + 1) * body_len] for i in range(max_chunks)]
    starts = [i * body_len for i in range(n_chunks - 1)] + [n - body_len]
    return [tokens[s : s + body_len] for s in starts]


@dataclass
class ClassifyCollator:
    """Documents to chunk batches for :class:`pipeline.encoder.model.Classifier`.

    Returns ``input_ids``/``attention_mask`` (N chunks, T), ``chunk_mask`` (B docs, C),
    True where document b has chunk c (chunks are listed in that row-major order),
    ``labels`` (B,) and ``index`` (B,), the documents' row numbers in their split.
    """

    max_len: int
    strategy: LongDoc = "chunk"
    max_chunks: int = 4
    head_fraction: float = 0.25

    def __call__(self, batch: list[Example]) -> dict[str, Tensor]:
        per_doc = [
            split_document(
                ex.tokens, self.strategy, self.max_len - 2, self.max_chunks, self.head_fraction
            )
            for ex in batch
        ]
        ids, attention_mask = pad_sequences([wrap(c) for chunks in per_doc for c in chunks])
        counts = torch.tensor([len(c) for c in per_doc])
        chunk_mask = torch.arange(int(counts.max()))[None, :] < counts[:, None]
        return {
            "input_ids": ids,
            "attention_mask": attention_mask,
            "chunk_mask": chunk_mask,
            "labels": torch.tensor([ex.label for ex in batch], dtype=torch.long),
            "index": torch.tensor([ex.index for ex in batch], dtype=torch.long),
        }
