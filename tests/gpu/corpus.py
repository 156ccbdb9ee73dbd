"""The GPU check's token data: a slice of ``data/tokenized`` or a synthetic stand-in.

Both come as one Arrow table per split with the columns of ``data/tokenized`` (``id``
str, ``label`` int64, ``input_ids`` list<int32>), which
:meth:`pipeline.encoder.tokens.DocumentTokens.from_arrow` reads as the stages do. The slice
is written here (where ``datasets`` can read ``data/tokenized``) as Arrow IPC files that
pyarrow reads alone on a machine without ``datasets``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute
import pyarrow.ipc

from pipeline.domain import N_SPECIAL, NUM_CLASSES

SPLITS = ("train", "validation")
META_FILE = "meta.json"

# Synthetic corpus: log-normal document lengths (median 300 tokens, a long tail capped at
# 8000), Zipf-like token frequencies, and per class a set of 10 telling tokens that make
# up 30% of a document's tokens, so both the MLM and the classifier have something to learn.
SYNTHETIC_DOCS = {"train": 1024, "validation": 128}
MEDIAN_LENGTH, LENGTH_SIGMA, MIN_LENGTH, MAX_LENGTH = 300, 1.0, 16, 8000
CLASS_TOKENS, CLASS_SHARE = 10, 0.3


def table(ids: Sequence[str], labels: np.ndarray, docs: Sequence[np.ndarray]) -> pa.Table:
    """One split in the column layout of ``data/tokenized``."""
    offsets = np.concatenate(([0], np.cumsum([len(d) for d in docs]))).astype(np.int32)
    values = np.concatenate(docs).astype(np.int32) if docs else np.zeros(0, np.int32)
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pa.table(
        {"id": pa.array(list(ids)), "label": pa.array(labels, pa.int64()), "input_ids": column}
    )


def synthetic(vocab_size: int, seed: int = 0) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Synthetic splits with a realistic length distribution, and their description."""
    rng = np.random.default_rng(seed)
    content = np.arange(N_SPECIAL, vocab_size)
    ranks = rng.permutation(len(content))
    freq = 1.0 / (ranks + 10.0)
    freq /= freq.sum()
    signal = rng.choice(content, (NUM_CLASSES, CLASS_TOKENS), replace=False)
    splits = {}
    for split, n in SYNTHETIC_DOCS.items():
        labels = np.arange(n) % NUM_CLASSES
        lengths = rng.lognormal(np.log(MEDIAN_LENGTH), LENGTH_SIGMA, n).astype(int)
        docs = []
        for label, length in zip(labels, np.clip(lengths, MIN_LENGTH, MAX_LENGTH), strict=True):
            doc = rng.choice(content, length, p=freq)
            telling = rng.random(length) < CLASS_SHARE
            doc[telling] = rng.choice(signal[label], int(telling.sum()))
            docs.append(doc)
        splits[split] = table([f"synthetic/{split}/{i}" for i in range(n)], labels, docs)
    return splits, {"source": "synthetic", "vocab_size": vocab_size, **_sizes(splits)}


def write_slice(
    dest: Path, splits: dict[str, Any], vocab_size: int, docs: dict[str, int], seed: int = 0
) -> dict[str, Any]:
    """Write a seeded sample of ``docs[split]`` documents of each split (``splits``: the
    :class:`~pipeline.encoder.tokens.DocumentTokens` of ``load_splits``) to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tables = {}
    for split in SPLITS:
        data = splits[split]
        rows = np.sort(rng.choice(len(data), min(docs[split], len(data)), replace=False))
        tables[split] = table(
            [data.ids[i] for i in rows], data.labels[rows], [data[int(i)].tokens for i in rows]
        )
        path = str(dest / f"{split}.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, tables[split].schema) as out:
            out.write_table(tables[split])
    meta = {"source": "data/tokenized slice", "vocab_size": vocab_size, **_sizes(tables)}
    (dest / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def read_slice(folder: Path) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """The splits and description written by :func:`write_slice`."""
    meta = json.loads((folder / META_FILE).read_text())
    tables = {}
    for split in SPLITS:
        with pa.OSFile(str(folder / f"{split}.arrow")) as source:
            tables[split] = pa.ipc.open_file(source).read_all()
    return tables, meta


def _sizes(tables: dict[str, pa.Table]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split, t in tables.items():
        lengths = pa.compute.list_value_length(t.column("input_ids")).to_numpy()
        out[split] = {
            "docs": t.num_rows,
            "tokens": int(lengths.sum()),
            "median_length": float(np.median(lengths)),
        }
    return out
