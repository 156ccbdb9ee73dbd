"""The 20 Newsgroups "bydate" archive: find and verify it, read its posts, parse headers.

The archive is read member by member straight from the tar stream and never extracted
to disk: paths that would escape a target folder, links, special files and absurd sizes
are rejected before any byte is used. So are posts that are not text (NUL bytes or mostly
control bytes), empty or whitespace-only posts, and members in folders nested inside a
group, each named in the error.
"""

from __future__ import annotations

import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import pandas as pd
from tqdm import tqdm

from pipeline.domain import GROUPS
from pipeline.errors import PipelineError
from pipeline.io import sha256_file

ENV_ARCHIVE = "NEWSGROUPS_ARCHIVE"
ENV_SHA256 = "NEWSGROUPS_ARCHIVE_SHA256"
# Archives known to hold the complete bydate data set (same documents, different packing).
KNOWN_ARCHIVES = {
    "8f1b2514ca22a5ade8fbb9cfa5727df95fa587f4c87b786e15c759fa66d95610": "public (figshare)",
    "7d3063e5938058d24386c4106e31637a93cdb67f53ee777c1d41a5735a1c89b7": "offline repack",
}
MAX_MEMBER_BYTES = 8 << 20  # far above any real post
MAX_TOTAL_BYTES = 1 << 30
# An optional top folder, then 20news-bydate-{train,test}/<group>/<message number>.
MEMBER_RE = re.compile(r"^(?:[^/]+/)?20news-bydate-(train|test)/([^/]+)/([^/]+)$")
# Anything deeper than <group>/<post>: a folder inside a group, never part of bydate.
NESTED_RE = re.compile(r"^(?:[^/]+/)?20news-bydate-(?:train|test)/[^/]+/[^/]+/")
# Control bytes (C0 and DEL) other than tab, newline, carriage return and form feed, which
# text holds in numbers. Real posts carry a few stray ones (backspace overstrikes, ^B art
# in a signature); past MAX_CONTROL_SHARE of a post's bytes, it is binary data.
CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\r\f") + b"\x7f"
MAX_CONTROL_SHARE = 0.10
EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# Reply/forward prefixes of a Subject line: "Re:", "RE :", "Fwd:", "Fw:", "Re[2]:", "Re^2:".
SUBJECT_PREFIX_RE = re.compile(r"^(?:(?:re|fwd?)\s*(?:\[\d+\]|\(\d+\)|\^\d+)?\s*:\s*)+")

StripPart = Literal["headers", "footers", "quotes"]


class ArchiveParams(Protocol):
    """The ``data`` params :func:`resolve_source` reads (see the fetch stage's section)."""

    url: str
    url_sha256: str
    archive: str | None
    archive_sha256: str | None


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


def resolve_source(params: ArchiveParams, env: dict[str, str]) -> Source:
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
    # Deferred: scikit-learn is slow to import, and the header parsers here do not need it.
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
