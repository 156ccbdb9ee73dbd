"""The documents table built from a source's raw posts, and the report on it.

:func:`build_table` strips, splits, subsamples and orders the posts; :func:`make_report`
counts them per split and class, measures thread and author overlap with train and
digests the content; :func:`split_datasets` describes each split as an MLflow dataset.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.domain import SPLITS
from pipeline.io import digest_strings
from pipeline.sources.bydate import KNOWN_ARCHIVES, StripPart, author_of, strip_texts, thread_keys
from pipeline.splits import ValidationParams, check_groups, overlap_with_train, split_validation

DATASET_PREFIX = "newsgroups"  # MLflow dataset names: newsgroups-train, ...
DATASET_DIGEST_CHARS = 36  # MLflow's limit on a dataset digest


class TableParams(ValidationParams, Protocol):
    """The ``data`` params :func:`build_table` and :func:`make_report` read (see the fetch
    stage's section)."""

    remove: list[StripPart]
    max_docs_per_class: int | None


def subsample(df: pd.DataFrame, per_class: int | None, seed: int) -> pd.DataFrame:
    """Keep a seeded sample of at most ``per_class`` documents per split and class."""
    if per_class is None:
        return df
    rng = np.random.default_rng(seed)
    keep = [
        rng.permutation(np.asarray(idx))[:per_class]
        for _, idx in df.groupby(["split", "label"], sort=True).groups.items()
    ]
    return df.loc[np.sort(np.concatenate(keep))].reset_index(drop=True)


def order_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows by split (train, validation, test) then id: a stable order for stable bytes."""
    rank = df["split"].map({s: i for i, s in enumerate(SPLITS)})
    return (
        df.assign(_rank=rank)
        .sort_values(["_rank", "id"])
        .drop(columns="_rank")
        .reset_index(drop=True)
    )


def build_table(
    raw: pd.DataFrame, params: TableParams, seed: int
) -> tuple[pd.DataFrame, pd.Series, int]:
    """Strip, drop posts left empty, split and subsample.

    Returns the table, the thread and author of each of its rows (columns ``thread``,
    ``author``, read from the raw posts before ``remove`` strips the headers) and how many
    posts ``remove`` left empty.
    """
    threads = thread_keys(raw)
    authors = pd.Series([author_of(t) for t in raw["text"]], index=raw.index, dtype="str")
    texts = strip_texts(raw["text"], params.remove)
    nonempty = texts.str.strip() != ""
    df = raw.assign(text=texts, _thread=threads, _author=authors)[nonempty]
    df = df.reset_index(drop=True)
    df = split_validation(df, df["_thread"], df["_author"], params, seed)
    df = order_rows(subsample(df, params.max_docs_per_class, seed))
    where = f"{paths.RAW / paths.DOCUMENTS.name}"
    check_groups(df, ("train", "test"), where)  # `remove` could have emptied a group
    unit = "2 threads" if params.validation == "thread" else "2 posts"
    hint = (
        f" (data.validation={params.validation} can split a group only when it has at "
        f"least {unit} in train)"
    )
    check_groups(df, ("validation",), where, hint)
    keys = df[["_thread", "_author"]].rename(columns=lambda c: c[1:])
    return df.drop(columns=["_thread", "_author"]), keys, int((~nonempty).sum())


def content_digest(df: pd.DataFrame) -> str:
    """Digest of the parsed posts (id, group, text): equal for any packing of the data."""
    ordered = df.sort_values("id")
    return digest_strings(
        part
        for row in ordered[["id", "label_name", "text"]].itertuples(index=False)
        for part in row
    )


def split_datasets(df: pd.DataFrame, source: str) -> dict[str, dict[str, Any]]:
    """One MLflow dataset per split of the documents table ``df``, read from ``source``
    (the archive's URL or file): ``name``, ``digest``, ``source`` and ``rows``.

    MLflow caps a dataset digest at 36 characters: the digest is the start of the split's
    :func:`content_digest`.
    """
    entries = {}
    for split in SPLITS:
        part = df[df["split"] == split]
        entries[split] = {
            "name": f"{DATASET_PREFIX}-{split}",
            "digest": content_digest(part)[:DATASET_DIGEST_CHARS],
            "source": source,
            "rows": len(part),
        }
    return entries


def make_report(
    df: pd.DataFrame,
    keys: pd.DataFrame,
    raw: pd.DataFrame,
    archive_sha256: str,
    params: TableParams,
    dropped: int,
) -> dict:
    """Counts per split and class, thread and author overlap with train, and digests."""
    counts = df.groupby(["label_name", "split"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=list(SPLITS), fill_value=0)
    return {
        "documents": {s: int((df["split"] == s).sum()) for s in SPLITS} | {"total": len(df)},
        "classes": len(counts),
        "per_class": {name: {s: int(v) for s, v in row.items()} for name, row in counts.iterrows()},
        "archive_sha256": archive_sha256,
        "archive": KNOWN_ARCHIVES.get(archive_sha256, "user-supplied"),
        "content_digest": content_digest(raw),
        "table_digest": content_digest(df) if len(df) else None,
        "removed": list(params.remove),
        "dropped_empty": dropped,
        "validation_scheme": params.validation,
        "thread_overlap_with_train": overlap_with_train(df, keys["thread"]),
        "author_overlap_with_train": overlap_with_train(df, keys["author"]),
    }
