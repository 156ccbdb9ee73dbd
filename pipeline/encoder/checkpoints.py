"""The resume-checkpoint folders of the training stages.

Resume checkpoints live outside every DVC output (DVC deletes a stage's outputs before
running it) and are git-ignored: ``.checkpoints/<stage>/<key>/last.ckpt``, written by
:class:`pipeline.encoder.callbacks.EpochCheckpoint`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.io import sha256_file


def checkpoint_folder(stage: str, params: dict[str, Any], inputs: list[Path]) -> Path:
    """The checkpoint folder of one stage run: its key hashes the stage's params and the
    contents of its inputs, so only a rerun of the same stage, params and data resumes."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for root in map(Path, inputs):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            digest.update(str(path.relative_to(root.parent)).encode())
            digest.update(sha256_file(path).encode())
    return paths.CHECKPOINTS / stage / digest.hexdigest()[:16]


def last_checkpoint(folder: Path | None) -> Path | None:
    """The checkpoint to resume from, if an interrupted run of the same key left one."""
    if folder is None:
        return None
    path = folder / "last.ckpt"
    return path if path.is_file() else None


def discard_checkpoints(folder: Path | None) -> None:
    """After a successful run: the stage's checkpoints (every key) are not needed anymore."""
    if folder is not None and folder.parent.is_dir():
        shutil.rmtree(folder.parent, ignore_errors=True)
        with contextlib.suppress(OSError):  # the root too, once no stage has checkpoints
            folder.parent.parent.rmdir()
