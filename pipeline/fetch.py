"""Stage `fetch`: the 20 Newsgroups "bydate" archive -> one validated documents table.

Source, in order of precedence: the ``NEWSGROUPS_ARCHIVE`` environment variable, the
``data.archive`` param, or a download of ``data.url`` (checksum-verified, resumable). A
local archive must match ``NEWSGROUPS_ARCHIVE_SHA256`` / ``data.archive_sha256`` when
given, or one of the known archives otherwise.

The archive is read member by member straight from the tar stream and never extracted
to disk: paths that would escape a target folder, links, special files and absurd sizes
are rejected before any byte is used.

Outputs: ``data/raw/documents.parquet`` (id, split, label, label_name, text) and
``reports/data.json`` (documents per split and class, content digests).
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

from pipeline.config import Section, load_section, load_seed
from pipeline.errors import PipelineError, run_stage
from pipeline.io import atomic_outputs, digest_strings, sha256_file, write_json
from pipeline.schemas import FULL_SPLIT_SIZES, GROUPS, SPLITS, Documents, validate
from pipeline.tracking import StageRun

OUT_DIR = Path("data/raw")
OUT_TABLE = "documents.parquet"
REPORT = Path("reports/data.json")
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

Sha256 = Field(pattern=r"^[0-9a-f]{64}$")


class DataParams(Section):
    """Section ``data`` of params.yaml."""

    url: str = Field(pattern=r"^https?://")
    url_sha256: str = Sha256
    archive: str | None = None
    archive_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    remove: list[Literal["headers", "footers", "quotes"]] = Field(default_factory=list)
    validation_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    max_docs_per_class: int | None = Field(default=None, ge=1)


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


def iter_posts(path: Path) -> Iterator[tuple[str, str, str, str]]:
    """Yield (origin split, group, message number, latin-1 text) from a bydate archive."""
    seen = 0
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                check_member(member, seen)
                match = MEMBER_RE.match(member.name)
                if not member.isfile() or match is None:
                    continue
                seen += member.size
                fh = tar.extractfile(member)
                assert fh is not None  # regular files always have a stream
                yield *match.groups(), fh.read().decode("latin-1")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise PipelineError(f"{path}: corrupt or truncated archive ({exc})") from None


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


def assign_validation(df: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Move a seeded, per-class ``fraction`` of train to ``validation``.

    Per-class rounding (at least one document of every class with two or more) keeps the
    split stratified even on tiny smoke archives, where sklearn's splitter refuses.
    """
    rng = np.random.default_rng(seed)
    split = df["split"].copy()
    for _, idx in df[df["split"] == "train"].groupby("label", sort=True).groups.items():
        n = len(idx)
        n_val = 0 if n < 2 else min(n - 1, max(1, round(fraction * n)))
        split.loc[rng.permutation(np.asarray(idx))[:n_val]] = "validation"
    return df.assign(split=split)


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


def build_table(raw: pd.DataFrame, params: DataParams, seed: int) -> tuple[pd.DataFrame, int]:
    """Strip, drop posts left empty, split and subsample; return the table and drop count."""
    texts = strip_texts(raw["text"], params.remove)
    nonempty = texts.str.strip() != ""
    df = raw.assign(text=texts)[nonempty].reset_index(drop=True)
    df = assign_validation(df, params.validation_fraction, seed)
    df = subsample(df, params.max_docs_per_class, seed)
    return order_rows(df), int((~nonempty).sum())


def content_digest(df: pd.DataFrame) -> str:
    """Digest of the parsed posts (id, group, text): equal for any packing of the data."""
    ordered = df.sort_values("id")
    return digest_strings(
        part
        for row in ordered[["id", "label_name", "text"]].itertuples(index=False)
        for part in row
    )


def make_report(
    df: pd.DataFrame, raw: pd.DataFrame, archive_sha256: str, params: DataParams, dropped: int
) -> dict:
    """Counts per split and class, and digests to compare sources and outputs."""
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
    df, dropped = build_table(raw, params, seed)
    validate(df, Documents, str(OUT_DIR / OUT_TABLE))
    report = make_report(df, raw, archive_sha256, params, dropped)
    with atomic_outputs() as out:
        df.to_parquet(out.dir(OUT_DIR) / OUT_TABLE, index=False)
        write_json(out.file(REPORT), report)
    print(f"fetch: {report['documents']} -> {OUT_DIR / OUT_TABLE}, {REPORT}")
    tracking.log(["seed", "data"], report, [REPORT], inputs={"archive": archive_sha256})


if __name__ == "__main__":
    run_stage(main)
