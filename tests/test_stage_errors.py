"""Stages run as DVC runs them; bad input gives one clear error line and no outputs."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from pipeline.io import sha256_file
from tests.helpers import (
    SMOKE_UNTRACKED,
    archive_overrides,
    assert_failed_cleanly,
    build_archive,
    run_stage,
    write_params,
)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


@pytest.mark.slow
def test_fetch_then_tokenize_succeed_on_a_tiny_archive(workdir: Path, tiny_archive) -> None:
    write_params(workdir / "params.yaml", *SMOKE_UNTRACKED, *archive_overrides(*tiny_archive))
    assert run_stage("fetch", workdir).returncode == 0
    proc = run_stage("tokenize", workdir)
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "data/tokenized/train/dataset_info.json").is_file()
    assert sorted(p.name for p in (workdir / "data").iterdir()) == ["raw", "tokenized", "tokenizer"]
    assert not list(workdir.rglob("*.tmp"))  # temporary siblings renamed away


def test_corrupt_archive(workdir: Path, tiny_archive, tmp_path: Path) -> None:
    data = tiny_archive[0].read_bytes()
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(data[: len(data) * 2 // 3])
    sha = sha256_file(broken)
    write_params(workdir / "params.yaml", *SMOKE_UNTRACKED, *archive_overrides(broken, sha))
    assert_failed_cleanly(run_stage("fetch", workdir), workdir, "broken.tar.gz", "corrupt")


def test_wrong_checksum(workdir: Path, tiny_archive) -> None:
    path, _ = tiny_archive
    write_params(workdir / "params.yaml", *SMOKE_UNTRACKED, *archive_overrides(path, "a" * 64))
    assert_failed_cleanly(run_stage("fetch", workdir), workdir, "checksum mismatch")


def test_missing_archive_from_environment(workdir: Path) -> None:
    write_params(workdir / "params.yaml", *SMOKE_UNTRACKED)
    proc = run_stage("fetch", workdir, NEWSGROUPS_ARCHIVE=str(workdir / "nope.tar.gz"))
    assert_failed_cleanly(proc, workdir, "nope.tar.gz", "$NEWSGROUPS_ARCHIVE", "not found")


def test_member_escaping_the_archive(workdir: Path, tmp_path: Path) -> None:
    evil = tarfile.TarInfo("20news-bydate/../../outside")
    evil.size = 10
    path = tmp_path / "evil.tar.gz"
    sha = build_archive(path, n_train=2, n_test=1, extra=[evil])
    write_params(workdir / "params.yaml", *SMOKE_UNTRACKED, *archive_overrides(path, sha))
    assert_failed_cleanly(run_stage("fetch", workdir), workdir, "unsafe archive member")
    assert not (tmp_path / "outside").exists()


@pytest.mark.parametrize(
    ("stage", "override", "fragment"),
    [
        ("fetch", "+data.shuffle=true", "unknown key data.shuffle"),
        ("fetch", "data.validation_fraction=0", "data.validation_fraction=0"),
        ("tokenize", "tokenizer.vocab_size=ten", "tokenizer.vocab_size='ten'"),
        ("tokenize", "tokenizer.kind=unigram", "tokenizer.kind='unigram'"),
    ],
)
def test_invalid_params(workdir: Path, tiny_archive, stage: str, override: str, fragment: str):
    write_params(
        workdir / "params.yaml", *SMOKE_UNTRACKED, override, *archive_overrides(*tiny_archive)
    )
    assert_failed_cleanly(run_stage(stage, workdir), workdir, "params.yaml", fragment)


def test_tokenize_without_fetch_output(workdir: Path) -> None:
    write_params(workdir / "params.yaml", *SMOKE_UNTRACKED)
    assert_failed_cleanly(run_stage("tokenize", workdir), workdir, "documents.parquet", "not found")
