"""The hashes of a stage's DVC outputs, as ``dvc.lock`` will record them.

DVC writes a stage's ``dvc.lock`` entry only after its command exits, so a stage that
reports its outputs to MLflow hashes them itself, the way DVC 3 does: the MD5 of a file's
bytes; for a folder, the MD5 of the JSON list of its files (``md5`` and ``relpath``,
sorted by path) followed by ``.dir``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

CHUNK = 1 << 20


def file_md5(path: Path) -> str:
    """MD5 of a file's bytes."""
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def dir_md5(path: Path) -> str:
    """DVC's hash of a folder: MD5 of its sorted file list, then ``.dir``."""
    files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    entries = [{"md5": file_md5(p), "relpath": rel} for rel, p in files]
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"


def out_md5(path: Path) -> str | None:
    """The hash of a file or folder (None when it does not exist)."""
    if path.is_dir():
        return dir_md5(path)
    return file_md5(path) if path.is_file() else None


def stage_outs(dvc_file: Path, stage: str, item: str | None = None) -> list[str]:
    """The ``outs`` paths of ``stage`` in ``dvc_file`` (a ``foreach`` stage's for ``item``).

    Returns an empty list when the file or the stage is missing.
    """
    if not dvc_file.is_file():
        return []
    stages: dict[str, Any] = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["stages"]
    spec = stages.get(stage)
    if spec is None:
        return []
    body = spec.get("do", spec)
    outs = [o if isinstance(o, str) else next(iter(o)) for o in body.get("outs", [])]
    return [o.replace("${item}", item or "") for o in outs]


def output_tags(root: Path, stage: str, item: str | None = None) -> dict[str, str]:
    """``output.<path>`` -> hash, for the outputs of ``stage`` found under ``root``."""
    tags = {}
    for out in stage_outs(root / "dvc.yaml", stage, item):
        digest = out_md5(root / out)
        if digest is not None:
            tags[f"output.{out}"] = digest
    return tags
