"""Stage `fetch`: the 20 Newsgroups "bydate" archive -> one validated documents table.

Source, in order of precedence: the ``NEWSGROUPS_ARCHIVE`` environment variable, the
``data.archive`` param, or a download of ``data.url`` (checksum-verified, resumable). A
local archive must match ``NEWSGROUPS_ARCHIVE_SHA256`` / ``data.archive_sha256`` when
given, or one of the known archives otherwise.

The archive is read member by member straight from the tar stream and never extracted
to disk: paths that would escape a target folder, links, special files and absurd sizes
are rejected before any byte is used. So are posts that are not text (NUL bytes or mostly
control bytes), empty or whitespace-only posts, and members in folders nested inside a
group, each named in the error; every group must have posts in train and test.

The validation split is carved out of train by ``data.validation``: ``thread`` (whole
threads, so validation posts, like test posts, mostly start conversations the model has
not seen), ``latest`` (each group's newest posts) or ``random``.

Outputs: ``data/raw/documents.parquet`` (id, split, label, label_name, text) and
``reports/data.json`` (documents per split and class, content digests, the validation
scheme and the share of validation and test posts whose thread has train posts).
"""

from __future__ import annotations

import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field
from tqdm import tqdm

from pipeline import paths
from pipeline.config import Section, load_section, load_seed
from pipeline.domain import FULL_SPLIT_SIZES, GROUPS, SPLITS
from pipeline.errors import PipelineError, run_stage
from pipeline.io import atomic_outputs, digest_strings, sha256_file, write_json
from pipeline.schemas import Documents, validate
from pipeline.tracking import StageRun, split_report

ENV_ARCHIVE = "NEWSGROUPS_ARCHIVE"
ENV_SHA256 = "NEWSGROUPS_ARCHIVE_SHA256"
# Archives known to hold the complete bydate data set (same documents, different packing).
KNOWN_ARCHIVES = {
    "8f1b2514ca22a5ade8fbb9cfa5727df95fa587f4c87b786e15c759fa66d95610": "public (figshare)",
    "7d3063e5938058d24386c4106e31637a93cdb67f53ee777c1d41a5735a1c89b7": "offline repack",
}
MAX_MEMBER_BYTES = 8 << 20  # the largest real post is ~160 KB
MAX_TOTAL_BYTES = 1 << 30
# An optional top folder, then 20news-bydate-{train,test}/<group>/<message number>.
MEMBER_RE = re.compile(r"^(?:[^/]+/)?20news-bydate-(train|test)/([^/]+)/([^/]+)$")
# Anything deeper than <group>/<post>: a folder inside a group, never part of bydate.
NESTED_RE = re.compile(r"^(?:[^/]+/)?20news-bydate-(?:train|test)/[^/]+/[^/]+/")
# Control bytes (C0 and DEL) other than tab, newline, carriage return and form feed, which
# text holds in numbers. Real posts carry a few stray ones (backspace overstrikes, ^B art
# in a signature: at most 7.4% of one post's bytes); binary data has a NUL or about 11%.
CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\r\f") + b"\x7f"
MAX_CONTROL_SHARE = 0.10
# Reply/forward prefixes of a Subject line: "Re:", "RE :", "Fwd:", "Fw:", "Re[2]:", "Re^2:".
EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
SUBJECT_PREFIX_RE = re.compile(r"^(?:(?:re|fwd?)\s*(?:\[\d+\]|\(\d+\)|\^\d+)?\s*:\s*)+")

SHA256 = r"^[0-9a-f]{64}$"


class DataParams(Section):
    """Section ``data`` of params.yaml."""

    url: str = Field(
        pattern=r"^https?://",
        description="Where the bydate archive is downloaded from (the one scikit-learn uses).",
    )
    url_sha256: str = Field(pattern=SHA256, description="sha256 the download from url must have.")
    archive: str | None = Field(
        description="Local archive to use instead of downloading (null: download url; the "
        "NEWSGROUPS_ARCHIVE environment variable takes precedence)."
    )
    archive_sha256: str | None = Field(
        pattern=SHA256,
        description="sha256 of the local archive (null: it must be one of the known archives).",
    )
    remove: list[Literal["headers", "footers", "quotes"]] = Field(
        description="Parts of each post to strip, as scikit-learn's remove= (headers, footers, "
        "quotes); empty keeps everything, the setting published results use."
    )
    validation_fraction: float = Field(
        gt=0.0,
        lt=1.0,
        description="Share of each class of the train split held out as the validation split "
        "(early stopping, calibration); test is never used for fitting.",
    )
    validation: Literal["thread", "latest", "random"] = Field(
        description="How validation is carved out of train: thread (whole threads, like most "
        "test posts), latest (each group's newest posts) or random (overstates test accuracy)."
    )
    new_author_share: float = Field(
        ge=0.0,
        le=1.0,
        description="validation=thread: share of each group's validation posts moved with all "
        "posts of their authors, so validation has as many new authors as test (0: threads "
        "alone).",
    )
    max_docs_per_class: int | None = Field(
        ge=1,
        description="Keep at most this many documents per class and split (null: all); "
        "for smoke runs.",
    )


@dataclass(frozen=True)
class Source:
    """Where the archive came from and the checksum it must have (None: a known one)."""

    path: Path
    origin: str
    sha256: str | None
    download_url: str | None = None


def cache_dir(env: dict[str, str]) -> Path:
    """Download cache outside the repo, so `dvc repro` never deletes the archive."""
    base = env.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "newsgroups-pipeline"


def resolve_source(params: DataParams, env: dict[str, str]) -> Source:
    """Pick the archive: environment variable, then param, then the public URL."""
    sha = env.get(ENV_SHA256) or params.archive_sha256
    if env.get(ENV_ARCHIVE):
        return Source(Path(env[ENV_ARCHIVE]).expanduser(), f"${ENV_ARCHIVE}", sha)
    if params.archive:
        return Source(Path(params.archive).expanduser(), "data.archive", sha)
    dest = cache_dir(env) / "20news-bydate.tar.gz"
    return Source(dest, params.url, params.url_sha256, download_url=params.url)


def verify_archive(source: Source) -> str:
    """Check the archive exists and has the expected (or a known) sha256; return it."""
    if not source.path.is_file():
        raise PipelineError(f"{source.path} (from {source.origin}): archive not found")
    actual = sha256_file(source.path)
    if source.sha256 is not None and actual != source.sha256:
        raise PipelineError(
            f"{source.path} (from {source.origin}): checksum mismatch: expected sha256 "
            f"{source.sha256}, got {actual}"
        )
    if source.sha256 is None and actual not in KNOWN_ARCHIVES:
        raise PipelineError(
            f"{source.path} (from {source.origin}): unknown archive sha256 {actual}; "
            f"if you trust it, set {ENV_SHA256} or data.archive_sha256 to that value"
        )
    return actual


def check_member(member: tarfile.TarInfo, seen_bytes: int) -> None:
    """Reject tar members that could escape a folder, are not plain files, or are huge."""
    parts = Path(member.name).parts
    if Path(member.name).is_absolute() or ".." in parts:
        raise PipelineError(f"unsafe archive member {member.name!r}: path leaves the archive")
    try:  # the stdlib's own rules for extracting untrusted archives, on top of ours
        tarfile.data_filter(member, "/nonexistent-extraction-root")
    except tarfile.FilterError as exc:
        raise PipelineError(f"unsafe archive member {member.name!r}: {exc}") from None
    if member.issym() or member.islnk():
        raise PipelineError(f"unsafe archive member {member.name!r}: links are not allowed")
    if not (member.isfile() or member.isdir()):
        raise PipelineError(f"unsafe archive member {member.name!r}: not a regular file")
    if member.size > MAX_MEMBER_BYTES:
        raise PipelineError(
            f"archive member {member.name!r} is {member.size} bytes "
            f"(limit {MAX_MEMBER_BYTES}): not a newsgroup post"
        )
    if seen_bytes + member.size > MAX_TOTAL_BYTES:
        raise PipelineError(f"archive holds more than {MAX_TOTAL_BYTES} bytes of posts")


def post_location(member: tarfile.TarInfo) -> tuple[str, str, str] | None:
    """(origin split, group, message number) of a post member; None for other members.

    A member in a folder inside a group (``20news-bydate-train/sci.space/sub/123``, or the
    folder ``sub`` itself) is refused rather than skipped: bydate has no such folders, so
    it means the archive was repacked wrongly and posts would silently go missing.
    """
    match = MEMBER_RE.match(member.name)
    if NESTED_RE.match(member.name) or (match is not None and not member.isfile()):
        raise PipelineError(
            f"archive member {member.name!r} is inside a folder within a group: posts must "
            "sit directly in 20news-bydate-{train,test}/<group>/"
        )
    return None if match is None else match.groups()


def check_post(doc_id: str, data: bytes) -> str:
    """Decode a post as latin-1, refusing what is not a text post, by document id.

    NUL bytes, or more than ``MAX_CONTROL_SHARE`` of control bytes other than tab, newline,
    carriage return and form feed, mean binary data (latin-1 decodes any bytes, so nothing
    else would catch it). An empty or whitespace-only post has nothing to learn from and no
    place in the bydate data: it is refused too, not dropped.
    """
    if b"\x00" in data:
        raise PipelineError(f"document {doc_id} is binary (it holds NUL bytes), not a text post")
    text = data.decode("latin-1")
    if not text.strip():
        kind = "empty" if not data else "whitespace-only"
        raise PipelineError(f"document {doc_id} is {kind}: every post must hold text")
    controls = len(data) - len(data.translate(None, CONTROL_BYTES))
    if controls > MAX_CONTROL_SHARE * len(data):
        raise PipelineError(
            f"document {doc_id} is binary ({controls} of its {len(data)} bytes are control "
            f"bytes, over {MAX_CONTROL_SHARE:.0%}), not a text post"
        )
    return text


def iter_posts(path: Path) -> Iterator[tuple[str, str, str, str]]:
    """Yield (origin split, group, message number, latin-1 text) from a bydate archive."""
    seen = 0
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                check_member(member, seen)
                location = post_location(member)
                if location is None:
                    continue
                seen += member.size
                fh = tar.extractfile(member)
                assert fh is not None  # regular files always have a stream
                origin, group, number = location
                yield origin, group, number, check_post(f"{origin}/{group}/{number}", fh.read())
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise PipelineError(f"{path}: corrupt or truncated archive ({exc})") from None
    except PipelineError as exc:
        raise PipelineError(f"{path}: {exc}") from None


def parse_archive(path: Path, progress: bool = True) -> pd.DataFrame:
    """Read every post into a table sorted by id, labelled by the sorted group names."""
    rows = [
        (f"{origin}/{group}/{number}", origin, group, text)
        for origin, group, number, text in tqdm(
            iter_posts(path), desc="reading archive", unit=" docs", disable=not progress
        )
    ]
    if not rows:
        raise PipelineError(
            f"{path}: no 20news-bydate-{{train,test}}/<group>/<id> documents found: wrong archive?"
        )
    df = pd.DataFrame(rows, columns=["id", "split", "label_name", "text"])
    label_of = {g: i for i, g in enumerate(GROUPS)}
    df.insert(2, "label", df["label_name"].map(label_of).fillna(-1).astype("int64"))
    return df.sort_values("id", ignore_index=True)


def strip_texts(texts: pd.Series, remove: list[str]) -> pd.Series:
    """Remove headers / signature footers / quoted replies exactly as scikit-learn does."""
    from sklearn.datasets._twenty_newsgroups import (
        strip_newsgroup_footer,
        strip_newsgroup_header,
        strip_newsgroup_quoting,
    )

    strippers = {
        "headers": strip_newsgroup_header,
        "footers": strip_newsgroup_footer,
        "quotes": strip_newsgroup_quoting,
    }
    for part in ("headers", "footers", "quotes"):  # sklearn's order
        if part in remove:
            texts = texts.map(strippers[part])
    return texts


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


def header_of(text: str, name: str) -> str | None:
    """The raw value of header ``name`` (e.g. ``"Subject"``) of a post, folded
    continuation lines joined, or None.

    Only the header block counts (up to the first blank line), so a quoted "Subject:" in
    the body is not taken for the post's own.
    """
    prefix = f"{name.casefold()}:"
    value: list[str] | None = None
    for line in text.splitlines():
        if not line.strip():
            break
        if value is not None:
            if line[:1] not in (" ", "\t"):
                break
            value.append(line)  # a folded header line continues the value
        elif line[: len(prefix)].casefold() == prefix:
            value = [line[len(prefix) :]]
    return None if value is None else " ".join(value)


def subject_of(text: str) -> str | None:
    """The raw Subject header value of a post, or None."""
    return header_of(text, "Subject")


def author_of(text: str) -> str:
    """The sender of a post: the e-mail address of its From header, lower-cased (the whole
    value when it holds none); empty when the post has no From header."""
    value = " ".join((header_of(text, "From") or "").casefold().split())
    match = EMAIL_RE.search(value)
    return match.group(0) if match else value


def normalise_subject(subject: str | None) -> str:
    """Subject as a thread name: case-folded, whitespace collapsed, reply prefixes removed.

    ``"Re: RE[2]:  Fwd: The  Topic "`` -> ``"the topic"``. Empty for a missing subject.
    """
    text = " ".join((subject or "").casefold().split())
    return SUBJECT_PREFIX_RE.sub("", text).strip()


def thread_keys(df: pd.DataFrame) -> pd.Series:
    """Thread of each post: its group and normalised Subject, read from the raw text.

    A post with an empty or missing Subject is a thread of its own (keyed by its id).
    """
    subjects = [normalise_subject(subject_of(text)) for text in df["text"]]
    keys = [
        f"thread {group} {subject}" if subject else f"post {doc_id}"
        for doc_id, group, subject in zip(df["id"], df["label_name"], subjects, strict=True)
    ]
    return pd.Series(keys, index=df.index, dtype="str")


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

    No thread has posts in both train and validation, as most test posts start threads
    the training data never saw. With ``new_author_share``, that share of each class's
    validation posts moves as whole author-and-thread groups (:func:`author_thread_groups`),
    so those authors are new to train too, as the authors of about half the test posts
    are. A class needs at least 2 threads to be split.
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
    df: pd.DataFrame, threads: pd.Series, authors: pd.Series, params: DataParams, seed: int
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
    raw: pd.DataFrame, params: DataParams, seed: int
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


def make_report(
    df: pd.DataFrame,
    keys: pd.DataFrame,
    raw: pd.DataFrame,
    archive_sha256: str,
    params: DataParams,
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


def main() -> None:
    params = load_section("data", DataParams)
    seed = load_seed()
    tracking = StageRun("fetch")
    source = resolve_source(params, dict(os.environ))
    if source.download_url is not None:
        from pipeline.download import download

        download(source.download_url, source.path, params.url_sha256)
    archive_sha256 = verify_archive(source)
    raw = parse_archive(source.path)
    full = KNOWN_ARCHIVES.get(archive_sha256) is not None
    validate(raw, Documents, f"{source.path}", FULL_SPLIT_SIZES if full else None)
    check_groups(raw, ("train", "test"), f"{source.path}")
    df, keys, dropped = build_table(raw, params, seed)
    validate(df, Documents, str(paths.RAW / paths.DOCUMENTS.name))
    report = make_report(df, keys, raw, archive_sha256, params, dropped)
    with atomic_outputs() as out:
        df.to_parquet(out.dir(paths.RAW) / paths.DOCUMENTS.name, index=False)
        write_json(out.file(paths.stage_report("data")), report)
    print(
        f"fetch: {report['documents']} -> {paths.RAW / paths.DOCUMENTS.name}, "
        f"{paths.stage_report('data')}"
    )
    _, stats = split_report("fetch", report, {}, skip=("per_class",))
    tracking.finish(
        ["seed", "data"],
        report=stats,
        artifacts=[paths.stage_report("data")],
        inputs={"archive": archive_sha256},
    )


if __name__ == "__main__":
    run_stage(main)
