"""Atomic stage outputs, deterministic JSON reports and content digests.

Every stage writes its outputs to temporary siblings and renames them into place only
after everything succeeded, so a crash, a bad input or Ctrl-C never leaves a half-written
file that DVC could mistake for a result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class Outputs:
    """Collects temporary paths for a stage's outputs; see :func:`atomic_outputs`."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def dir(self, target: str | Path) -> Path:
        """A fresh temporary directory that becomes ``target`` on success."""
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        self._pending.append((tmp, target))
        return tmp

    def file(self, target: str | Path) -> Path:
        """A temporary file path that becomes ``target`` on success."""
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        self._pending.append((Path(name), target))
        return Path(name)

    def commit(self) -> None:
        for tmp, target in self._pending:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            tmp.chmod(0o755 if tmp.is_dir() else 0o644)  # mkdtemp/mkstemp make them private
            os.replace(tmp, target)
        self._pending.clear()

    def discard(self) -> None:
        for tmp, _ in self._pending:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        self._pending.clear()


@contextmanager
def atomic_outputs() -> Iterator[Outputs]:
    """Write outputs to temporary paths; rename them all into place only on success."""
    outputs = Outputs()
    try:
        yield outputs
    except BaseException:
        outputs.discard()
        raise
    outputs.commit()


def write_json(path: str | Path, data: Any) -> None:
    """Deterministic, human-readable JSON (stable key order, trailing newline)."""
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest_strings(parts: Iterable[str]) -> str:
    """Hex sha256 of a sequence of strings, each length-prefixed so boundaries count."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
