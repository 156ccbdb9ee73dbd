"""`fetch` on archives that are not clean bydate data: one `error:` line, no outputs."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from pipeline.domain import GROUPS
from pipeline.io import sha256_file
from tests.helpers import (
    SMOKE_UNTRACKED,
    add_bytes,
    archive_overrides,
    assert_failed_cleanly,
    make_post,
    read_json,
    run_stage,
    write_params,
)

TOP = "20news-bydate"


def write_archive(
    path: Path, extra: dict[str, bytes] | None = None, skip: tuple[str, ...] = ()
) -> str:
    """A small bydate archive (3 train + 2 test posts per group) plus ``extra`` members."""
    with tarfile.open(path, "w:gz") as tar:
        for gi, group in enumerate(GROUPS):
            if group in skip:
                continue
            for origin, n, offset in (("train", 3, 0), ("test", 2, 500)):
                for k in range(n):
                    name = f"{TOP}/20news-bydate-{origin}/{group}/{10000 + 1000 * gi + offset + k}"
                    add_bytes(tar, name, make_post(gi, k).encode("latin-1"))
        for name, data in (extra or {}).items():
            add_bytes(tar, f"{TOP}/{name}", data)
    return sha256_file(path)


def run_fetch(workdir: Path, archive: Path, sha: str):
    workdir.mkdir(exist_ok=True)
    write_params(workdir / "params.yaml", *SMOKE_UNTRACKED, *archive_overrides(archive, sha))
    return run_stage("fetch", workdir)


def test_a_clean_archive_passes(tmp_path: Path) -> None:
    archive = tmp_path / "clean.tar.gz"
    proc = run_fetch(tmp_path / "work", archive, write_archive(archive))
    assert proc.returncode == 0, proc.stderr
    report = read_json(tmp_path / "work/reports/data.json")
    assert report["documents"]["validation"] == 20
    assert report["validation_scheme"] == "thread"
    assert report["thread_overlap_with_train"]["validation"] == 0.0


def test_binary_post_is_rejected_by_id(tmp_path: Path) -> None:
    archive = tmp_path / "binary.tar.gz"
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10"
    sha = write_archive(archive, {"20news-bydate-train/sci.med/99999": png})
    proc = run_fetch(tmp_path / "work", archive, sha)
    assert_failed_cleanly(
        proc, tmp_path / "work", "binary.tar.gz", "document train/sci.med/99999 is binary"
    )


@pytest.mark.parametrize(("data", "kind"), [(b"", "empty"), (b"  \n\n\t \n", "whitespace-only")])
def test_empty_or_blank_post_is_rejected_by_id(tmp_path: Path, data: bytes, kind: str) -> None:
    archive = tmp_path / "blank.tar.gz"
    sha = write_archive(archive, {"20news-bydate-test/rec.autos/77777": data})
    proc = run_fetch(tmp_path / "work", archive, sha)
    assert_failed_cleanly(proc, tmp_path / "work", f"document test/rec.autos/77777 is {kind}")


def test_archive_missing_groups_is_rejected_naming_them(tmp_path: Path) -> None:
    archive = tmp_path / "partial.tar.gz"
    sha = write_archive(archive, skip=("sci.space", "comp.graphics"))
    proc = run_fetch(tmp_path / "work", archive, sha)
    assert_failed_cleanly(
        proc,
        tmp_path / "work",
        "partial.tar.gz: groups without posts:",
        "train lacks 2 of 20: comp.graphics, sci.space",
        "test lacks 2 of 20: comp.graphics, sci.space",
    )


def test_post_in_a_nested_folder_is_rejected_naming_the_member(tmp_path: Path) -> None:
    archive = tmp_path / "nested.tar.gz"
    member = "20news-bydate-train/sci.space/sub/123"
    sha = write_archive(archive, {member: make_post(14, 9).encode("latin-1")})
    proc = run_fetch(tmp_path / "work", archive, sha)
    assert_failed_cleanly(
        proc, tmp_path / "work", f"archive member '{TOP}/{member}' is inside a folder"
    )


def test_group_that_cannot_be_split_is_rejected_naming_it(tmp_path: Path) -> None:
    """Every train post of sci.med in one thread: no thread can go to validation."""
    archive = tmp_path / "one-thread.tar.gz"
    # Replace sci.med's train posts by three replies in one thread (same numbers).
    gi = GROUPS.index("sci.med")
    same = {
        f"20news-bydate-train/sci.med/{10000 + 1000 * gi + k}": (
            f"From: u{k}@example.edu\nSubject: {'Re: ' * k}one thread\n\nmedicine {k}\n"
        ).encode("latin-1")
        for k in range(3)
    }
    with tarfile.open(archive, "w:gz") as tar:
        for g, group in enumerate(GROUPS):
            for origin, n, offset in (("train", 3, 0), ("test", 2, 500)):
                for k in range(n):
                    name = f"20news-bydate-{origin}/{group}/{10000 + 1000 * g + offset + k}"
                    data = same.get(name, make_post(g, k).encode("latin-1"))
                    add_bytes(tar, f"{TOP}/{name}", data)
    proc = run_fetch(tmp_path / "work", archive, sha256_file(archive))
    assert_failed_cleanly(
        proc,
        tmp_path / "work",
        "documents.parquet: groups without posts: validation lacks 1 of 20: sci.med",
        "data.validation=thread can split a group only when it has at least 2 threads",
    )
