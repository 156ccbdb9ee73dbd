"""Validation splits: carve the validation split out of the documents table's train split.

Schemes (``data.validation``): whole threads, optionally with their authors (``thread``),
each group's newest posts (``latest``), or a seeded random share (``random``).
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np
import pandas as pd

from pipeline.domain import GROUPS
from pipeline.errors import PipelineError

ValidationScheme = Literal["thread", "latest", "random"]


class ValidationParams(Protocol):
    """The ``data`` params :func:`split_validation` reads (see the fetch stage's section)."""

    validation: ValidationScheme
    validation_fraction: float
    new_author_share: float


def validation_size(n: int, fraction: float) -> int:
    """Validation posts wanted from a class of ``n`` train posts.

    ``round(fraction * n)``, but at least 1 and at most ``n - 1`` so both splits keep the
    class (tiny smoke archives included); 0 for a class of fewer than 2 posts.
    """
    return 0 if n < 2 else min(n - 1, max(1, round(fraction * n)))


def assign_validation(df: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Move a seeded, per-class ``fraction`` of train to ``validation`` (``random``).

    Per-class rounding (at least one document of every class with two or more) keeps the
    split stratified even on tiny smoke archives, where sklearn's splitter refuses.
    """
    rng = np.random.default_rng(seed)
    split = df["split"].copy()
    for _, idx in df[df["split"] == "train"].groupby("label", sort=True).groups.items():
        n_val = validation_size(len(idx), fraction)
        split.loc[rng.permutation(np.asarray(idx))[:n_val]] = "validation"
    return df.assign(split=split)


def author_thread_groups(threads: pd.Series, authors: pd.Series) -> pd.Series:
    """Connected posts: two posts are in one group when they share a thread or an author.

    Moving a whole group to validation gives posts whose threads *and* authors train never
    saw; the group is named by its smallest thread key, so names are stable across runs.
    """
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        parent.setdefault(key, key)
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for thread, author in zip(threads, authors, strict=True):
        if author:
            a, b = find(f"t {thread}"), find(f"a {author}")
            if a != b:
                parent[max(a, b)] = min(a, b)
    roots = {t: find(f"t {t}") for t in threads}
    names: dict[str, str] = {}
    for thread in sorted(roots):
        names.setdefault(roots[thread], thread)
    return pd.Series([names[roots[t]] for t in threads], index=threads.index, dtype="str")


def pick_threads(sizes: np.ndarray, target: int, rng: np.random.Generator) -> list[int]:
    """Indices of threads, in a seeded order, whose sizes add up to at most ``target``.

    Threads are taken in a random order and skipped when they would overshoot, so a class
    dominated by one huge thread still fills validation from its other threads. If every
    thread is larger than the target, the smallest one goes. Never all threads: with two
    or more, train keeps at least one; with fewer, nothing moves.
    """
    if len(sizes) < 2 or target < 1:
        return []
    order = rng.permutation(len(sizes))
    chosen: list[int] = []
    taken = 0
    for i in order:
        if taken + sizes[i] <= target:
            chosen.append(int(i))
            taken += int(sizes[i])
            if taken == target:
                break
    if not chosen:
        chosen = [int(min(order, key=lambda i: sizes[i]))]
    return chosen


def move_groups(keys: pd.Series, target: int, rng: np.random.Generator) -> pd.Index:
    """Rows of whole groups (``keys``) adding up to at most ``target`` rows, seeded."""
    sizes = keys.value_counts().sort_index()  # sorted by key: the same order every run
    chosen = pick_threads(sizes.to_numpy(), target, rng)
    return keys.index[keys.isin(sizes.index[chosen])]


def assign_validation_by_thread(
    df: pd.DataFrame,
    threads: pd.Series,
    fraction: float,
    seed: int,
    authors: pd.Series | None = None,
    new_author_share: float = 0.0,
) -> pd.DataFrame:
    """Move whole train threads to ``validation``: about ``fraction`` of each class's posts.

    No thread has posts in both train and validation. With ``new_author_share``, that share
    of each class's validation posts moves as whole author-and-thread groups
    (:func:`author_thread_groups`), so their authors are new to train too. A class needs at
    least 2 threads to be split. Why: most test posts start threads, and many come from
    authors, that the training data never saw; a validation split like that scores a model
    the way test does.

    Args:
        df: The documents table; only its ``train`` rows move.
        threads: Thread key of each row (same index as ``df``).
        fraction: Share of each class's train posts to move (see :func:`validation_size`).
        seed: Seeds the order in which threads (and groups) are tried.
        authors: Author of each row; None moves threads alone.
        new_author_share: Share of each class's validation posts moved with their authors.

    Returns:
        ``df`` with ``split`` set to ``validation`` on the moved rows.
    """
    rng = np.random.default_rng(seed)
    split = df["split"].copy()
    for _, idx in df[df["split"] == "train"].groupby("label", sort=True).groups.items():
        target = validation_size(len(idx), fraction)
        keys = threads.loc[idx]
        n_new = round(target * new_author_share)
        if authors is not None and n_new > 0:
            moved = move_groups(author_thread_groups(keys, authors.loc[idx]), n_new, rng)
            split.loc[moved] = "validation"
            keys = keys.drop(moved)
            target -= len(moved)
        split.loc[move_groups(keys, target, rng)] = "validation"
    return df.assign(split=split)


def message_number(doc_id: str) -> int:
    """The Usenet article number that ends a document id (``train/<group>/<number>``)."""
    number = doc_id.rsplit("/", 1)[-1]
    if not number.isdigit():
        raise PipelineError(
            f"data.validation=latest: document {doc_id} has no numeric message number"
        )
    return int(number)


def assign_validation_latest(df: pd.DataFrame, fraction: float) -> pd.DataFrame:
    """Move each class's newest train posts (highest message numbers) to ``validation``.

    Article numbers grow with time within a group, and the test posts are the latest ones.
    """
    split = df["split"].copy()
    for _, idx in df[df["split"] == "train"].groupby("label", sort=True).groups.items():
        numbers = pd.Series([message_number(i) for i in df.loc[idx, "id"]], index=idx)
        newest = numbers.sort_values(ascending=False, kind="stable").index
        split.loc[newest[: validation_size(len(idx), fraction)]] = "validation"
    return df.assign(split=split)


def split_validation(
    df: pd.DataFrame, threads: pd.Series, authors: pd.Series, params: ValidationParams, seed: int
) -> pd.DataFrame:
    """Carve the validation split out of train with the ``data.validation`` scheme."""
    if params.validation == "thread":
        return assign_validation_by_thread(
            df, threads, params.validation_fraction, seed, authors, params.new_author_share
        )
    if params.validation == "latest":
        return assign_validation_latest(df, params.validation_fraction)
    return assign_validation(df, params.validation_fraction, seed)


def check_groups(df: pd.DataFrame, splits: tuple[str, ...], where: str, hint: str = "") -> None:
    """Every one of the 20 groups must have posts in each of ``splits``; one error otherwise."""
    missing = {
        split: [g for g in GROUPS if g not in set(df.loc[df["split"] == split, "label_name"])]
        for split in splits
    }
    missing = {split: groups for split, groups in missing.items() if groups}
    if missing:
        parts = "; ".join(
            f"{split} lacks {len(groups)} of {len(GROUPS)}: {', '.join(groups)}"
            for split, groups in missing.items()
        )
        raise PipelineError(f"{where}: groups without posts: {parts}{hint}")


def overlap_with_train(df: pd.DataFrame, keys: pd.Series) -> dict[str, float]:
    """Share of validation and of test posts whose key (thread, author) also has posts in
    train: how much of each split the model has seen something of."""
    seen = set(keys[df["split"] == "train"])
    shares = {}
    for split in ("validation", "test"):
        part = keys[df["split"] == split]
        shares[split] = round(float(part.isin(seen).mean()), 4) if len(part) else 0.0
    return shares
