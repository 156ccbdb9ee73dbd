"""Unit tests of the fetch stage's pure parts: parsing, stripping, splitting, safety."""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from pipeline import fetch
from pipeline.errors import PipelineError
from pipeline.fetch import (
    DataParams,
    Source,
    assign_validation,
    build_table,
    content_digest,
    parse_archive,
    resolve_source,
    strip_texts,
    subsample,
    verify_archive,
)
from pipeline.schemas import FULL_SPLIT_SIZES, GROUPS, Documents, validate
from tests.helpers import build_archive, make_post

PARAMS = DataParams(
    url="https://example.org/archive.tar.gz",
    url_sha256="0" * 64,
)


@pytest.fixture(scope="module")
def raw(tiny_archive: tuple[Path, str]) -> pd.DataFrame:
    return parse_archive(tiny_archive[0], progress=False)


def test_parse_reads_every_post_with_labels_and_latin1(raw: pd.DataFrame) -> None:
    assert len(raw) == 20 * 9
    assert (raw["split"] == "test").sum() == 20 * 3
    assert list(raw.columns) == ["id", "split", "label", "label_name", "text"]
    assert raw["id"].is_monotonic_increasing and raw["id"].is_unique
    row = raw[raw["id"] == "train/sci.med/23000"].iloc[0]
    assert row["label"] == GROUPS.index("sci.med") == 13
    assert row["text"] == make_post(13, 0)
    assert "Université" in row["text"]  # decoded as latin-1, not mangled
    validate(raw, Documents, "tiny")  # a parsed archive satisfies the schema


def test_content_digest_ignores_packing(tmp_path: Path, raw: pd.DataFrame) -> None:
    flat = tmp_path / "flat.tar.gz"  # sklearn's archive has no top folder
    build_archive(flat, top=None)
    other = parse_archive(flat, progress=False)
    assert content_digest(other) == content_digest(raw)
    changed = other.copy()
    changed.loc[0, "text"] += "!"
    assert content_digest(changed) != content_digest(raw)


def test_strip_matches_sklearn_semantics() -> None:
    post = pd.Series([make_post(0, 1)])
    assert strip_texts(post, []).iloc[0] == post.iloc[0]
    no_headers = strip_texts(post, ["headers"]).iloc[0]
    assert "From:" not in no_headers and "Subject:" not in no_headers
    assert no_headers.startswith("In article")
    no_footer = strip_texts(post, ["footers"]).iloc[0]
    assert "signature line" not in no_footer and "Café" in no_footer
    no_quotes = strip_texts(post, ["quotes"]).iloc[0]
    assert "> an earlier opinion" not in no_quotes and "writes:" not in no_quotes
    assert "I think" in no_quotes


def test_validation_split_is_seeded_stratified_and_from_train(raw: pd.DataFrame) -> None:
    a = assign_validation(raw, 0.34, seed=1)
    b = assign_validation(raw, 0.34, seed=1)
    c = assign_validation(raw, 0.34, seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert not a["split"].equals(c["split"])
    per_class = a[a["split"] == "validation"].groupby("label").size()
    assert per_class.to_dict() == {label: 2 for label in range(20)}  # round(0.34 * 6)
    assert (a.loc[raw["split"] == "test", "split"] == "test").all()  # test never moves


def test_subsample_caps_each_split_and_class(raw: pd.DataFrame) -> None:
    df = subsample(assign_validation(raw, 0.34, seed=0), 2, seed=0)
    counts = df.groupby(["split", "label"]).size()
    assert counts.max() == 2 and len(counts) == 60
    assert subsample(raw, None, seed=0) is raw


def test_build_table_drops_posts_left_empty(raw: pd.DataFrame) -> None:
    only_headers = raw.copy()
    only_headers.loc[0, "text"] = "From: a@b.c\nSubject: nothing\n\n   \n"
    params = PARAMS.model_copy(update={"remove": ["headers"]})
    df, dropped = build_table(only_headers, params, seed=0)
    assert dropped == 1 and len(df) == len(raw) - 1
    assert list(df["split"].drop_duplicates()) == ["train", "validation", "test"]
    validate(df, Documents, "built")
    df2, _ = build_table(only_headers, params, seed=0)
    pd.testing.assert_frame_equal(df, df2)


def test_schema_reports_every_failure_at_once(raw: pd.DataFrame) -> None:
    bad = raw.copy()
    bad.loc[0, "label"] = 25
    bad.loc[1, "split"] = "dev"
    bad.loc[2, "text"] = ""
    bad.loc[4, "id"] = bad.loc[3, "id"]
    with pytest.raises(PipelineError) as err:
        validate(bad, Documents, "bad.parquet")
    message = str(err.value)
    assert message.startswith("bad.parquet: failed")
    for expected in ("label:", "split:", "text:", "id: field_uniqueness", "label_name"):
        assert expected in message, expected


def test_schema_checks_full_split_sizes(raw: pd.DataFrame) -> None:
    with pytest.raises(PipelineError, match=r"split sizes .*'test': 60.*expected .*7532"):
        validate(raw, Documents, "tiny", FULL_SPLIT_SIZES)


def test_test_rows_cannot_be_relabelled_as_train(raw: pd.DataFrame) -> None:
    leaked = raw.copy()
    leaked.loc[leaked["split"] == "test", "split"] = "validation"
    with pytest.raises(PipelineError, match="test documents must come from"):
        validate(leaked, Documents, "leaked")


def _archive_with(tmp_path: Path, info: tarfile.TarInfo) -> Path:
    path = tmp_path / "evil.tar.gz"
    build_archive(path, n_train=1, n_test=1, extra=[info])
    return path


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("20news-bydate/../../etc/evil", tarfile.REGTYPE, "unsafe archive member"),
        ("/etc/evil", tarfile.REGTYPE, "unsafe archive member"),
        ("20news-bydate/20news-bydate-train/sci.med/link", tarfile.SYMTYPE, "unsafe archive"),
        ("20news-bydate/20news-bydate-train/sci.med/hard", tarfile.LNKTYPE, "unsafe archive"),
        ("20news-bydate/dev", tarfile.CHRTYPE, "unsafe archive member"),
    ],
)
def test_unsafe_members_are_rejected(tmp_path: Path, name: str, kind: bytes, message: str):
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "20news-bydate/20news-bydate-train/sci.med/23000"
    with pytest.raises(PipelineError, match=message):
        parse_archive(_archive_with(tmp_path, info), progress=False)


def test_absurd_member_size_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    info = tarfile.TarInfo("20news-bydate/20news-bydate-train/sci.med/99999")
    info.size = 4096
    path = _archive_with(tmp_path, info)
    monkeypatch.setattr(fetch, "MAX_MEMBER_BYTES", 2048)  # real posts here are < 1 KB
    with pytest.raises(PipelineError, match="4096 bytes .limit 2048."):
        parse_archive(path, progress=False)


def test_corrupt_truncated_and_wrong_archives(tmp_path: Path, tiny_archive) -> None:
    data = tiny_archive[0].read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"this is not an archive" * 100)
    wrong = tmp_path / "wrong.tar.gz"
    with tarfile.open(wrong, "w:gz") as tar:
        tar.add(__file__, arcname="notes/readme.txt")
    with pytest.raises(PipelineError, match="corrupt or truncated"):
        parse_archive(truncated, progress=False)
    with pytest.raises(PipelineError, match="corrupt or truncated"):
        parse_archive(garbage, progress=False)
    with pytest.raises(PipelineError, match="wrong archive"):
        parse_archive(wrong, progress=False)
    plain = tmp_path / "plain.tar"
    plain.write_bytes(gzip.decompress(data))  # an uncompressed tar works too
    assert len(parse_archive(plain, progress=False)) == 180


def test_verify_archive(tmp_path: Path, tiny_archive: tuple[Path, str]) -> None:
    path, sha = tiny_archive
    assert verify_archive(Source(path, "test", sha)) == sha
    with pytest.raises(PipelineError, match="checksum mismatch: expected sha256 0{64}"):
        verify_archive(Source(path, "test", "0" * 64))
    with pytest.raises(PipelineError, match="unknown archive sha256"):
        verify_archive(Source(path, "test", None))
    with pytest.raises(PipelineError, match="missing.tar.gz .from test.: archive not found"):
        verify_archive(Source(tmp_path / "missing.tar.gz", "test", None))


def test_source_precedence_env_then_param_then_download(tmp_path: Path) -> None:
    params = PARAMS.model_copy(update={"archive": "param.tar.gz"})
    env = {"NEWSGROUPS_ARCHIVE": "/env.tar.gz", "NEWSGROUPS_ARCHIVE_SHA256": "a" * 64}
    assert resolve_source(params, env) == Source(
        Path("/env.tar.gz"), "$NEWSGROUPS_ARCHIVE", "a" * 64
    )
    assert resolve_source(params, {}).path == Path("param.tar.gz")
    download = resolve_source(PARAMS, {"XDG_CACHE_HOME": str(tmp_path)})
    assert download.download_url == PARAMS.url and download.sha256 == PARAMS.url_sha256
    assert download.path.parent == tmp_path / "newsgroups-pipeline"
