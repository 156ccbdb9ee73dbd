"""Reading the ``tokenize`` artifacts: the tokenizer's vocabulary size and the splits.

``data/tokenized/`` is a ``datasets.DatasetDict`` (train/validation/test) of whole
documents: ``id`` (str), ``label`` (int64), ``input_ids`` (int32, no special tokens, no
truncation). Each split is loaded once into two flat numpy arrays (token values and
offsets), which makes row access free and forks cheaply into DataLoader workers.

Free of torch and Lightning, so the stages that only read tokens (``wide``) start fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from pipeline.domain import SPLITS, special_token_mismatch
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import pyarrow as pa


class Example(NamedTuple):
    index: int
    tokens: np.ndarray  # int32, the whole document without special tokens
    label: int


def load_vocab_size(tokenizer_path: str | Path) -> int:
    """Vocabulary size of the ``tokenize`` tokenizer, after checking its special-token ids."""
    from tokenizers import Tokenizer  # deferred: start-up time of the modules importing Example

    path = Path(tokenizer_path)
    if not path.is_file():
        raise PipelineError(f"{path}: tokenizer not found (run the tokenize stage)")
    tok = Tokenizer.from_file(str(path))
    mismatch = special_token_mismatch(tok)
    if mismatch:
        raise PipelineError(f"{path}: {mismatch}")
    return tok.get_vocab_size()


class DocumentTokens:
    """One split held as flat token values + offsets (fast, picklable, fork-friendly): a
    map-style dataset for torch's DataLoader."""

    def __init__(self, ids: list[str], labels: np.ndarray, values: np.ndarray, offsets: np.ndarray):
        self.ids = ids
        self.labels = labels
        self.values = values
        self.offsets = offsets

    @classmethod
    def from_arrow(cls, table: pa.Table) -> DocumentTokens:
        column = table.column("input_ids").combine_chunks()
        if column.null_count:
            raise PipelineError("input_ids has null rows")
        values = column.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        offsets = column.offsets.to_numpy().astype(np.int64)
        labels = table.column("label").to_numpy().astype(np.int64)
        return cls(table.column("id").to_pylist(), labels, values, offsets)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Example:
        return Example(i, self.values[self.offsets[i] : self.offsets[i + 1]], int(self.labels[i]))

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def load_splits(
    path: str | Path, vocab_size: int, n_classes: int, splits: tuple[str, ...] = SPLITS
) -> dict[str, DocumentTokens]:
    """Load and check the requested splits of ``data/tokenized`` (a ``save_to_disk`` dir)."""
    from datasets import DatasetDict, load_from_disk  # deferred: slow to import (start-up)

    path = Path(path)
    try:
        dd = load_from_disk(str(path))
    except FileNotFoundError:
        raise PipelineError(f"{path}: tokenized dataset not found (run tokenize)") from None
    if not isinstance(dd, DatasetDict):
        raise PipelineError(f"{path}: expected a DatasetDict with splits {list(splits)}")
    out = {}
    for split in splits:
        if split not in dd:
            raise PipelineError(f"{path}: missing split '{split}' (found {list(dd)})")
        ds = dd[split]
        missing = {"id", "label", "input_ids"} - set(ds.column_names)
        if missing:
            raise PipelineError(f"{path}/{split}: missing columns {sorted(missing)}")
        data = DocumentTokens.from_arrow(ds.with_format("arrow")[:])
        where = f"{path}/{split}"
        if len(data) == 0:
            raise PipelineError(f"{where}: no documents")
        if data.labels.min() < 0 or data.labels.max() >= n_classes:
            raise PipelineError(f"{where}: labels outside 0..{n_classes - 1}")
        if data.values.size and (data.values.min() < 0 or data.values.max() >= vocab_size):
            raise PipelineError(f"{where}: token ids outside the vocabulary (0..{vocab_size - 1})")
        out[split] = data
    return out
