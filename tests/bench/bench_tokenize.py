"""Benchmark: the tokenize stage's encoding throughput vs bare `tokenizers`, and no-op repro.

Run from the repo root after `dvc repro tokenize` on the full data (``make bench``).
Prints a table and writes ``reports/bench/tokenize.json``. Not part of the test suite:
timings depend on the machine and on what else it is doing.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from datasets import disable_caching
from tokenizers import Tokenizer

from pipeline import paths
from pipeline.tokenization import encode_split

OUT = Path("reports/bench/tokenize.json")


def best_of(repeats: int, fn) -> float:
    """Best wall time of ``repeats`` runs: the least disturbed by other processes."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # read when encoding starts
    disable_caching()
    docs = pd.read_parquet(paths.DOCUMENTS)
    tok = Tokenizer.from_file(str(paths.TOKENIZER_DIR / "tokenizer.json"))
    texts = docs["text"].tolist()
    n = len(texts)
    bare = best_of(3, lambda: tok.encode_batch(texts, add_special_tokens=False))
    bare_fast = best_of(3, lambda: tok.encode_batch_fast(texts, add_special_tokens=False))

    def stage() -> None:
        for split, part in docs.groupby("split", sort=False):
            encode_split(part.reset_index(drop=True), tok, 1000, "b" * 32, str(split))

    stage_time = best_of(3, stage)
    dvc = [sys.executable, "-m", "dvc", "repro"]
    subprocess.run(dvc, check=True, capture_output=True)  # make sure it is up to date
    noop = best_of(3, lambda: subprocess.run(dvc, check=True, capture_output=True))
    figures = {
        "documents": n,
        "bare_encode_batch_docs_per_s": round(n / bare),
        "bare_encode_batch_fast_docs_per_s": round(n / bare_fast),
        "stage_docs_per_s": round(n / stage_time),
        "stage_vs_bare_encode_batch": round(bare / stage_time, 3),
        "stage_vs_bare_encode_batch_fast": round(bare_fast / stage_time, 3),
        "noop_dvc_repro_s": round(noop, 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "command": "make bench",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    for key, value in figures.items():
        print(f"{key:36s} {value}")


if __name__ == "__main__":
    main()
