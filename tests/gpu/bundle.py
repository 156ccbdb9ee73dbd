"""Build the folder that travels to a GPU machine: ``python -m tests.gpu.bundle``.

It holds the check (``tests/gpu/``), the pipeline modules it imports (their module-level
import closure, found by reading the sources), the configs it reads, the wheels of
``tests/gpu/requirements.txt`` (downloaded beforehand by ``make gpu-check-bundle``) and,
when ``data/tokenized`` exists, a seeded slice of it as Arrow IPC files. Prints the one
command that runs the check there, from the folder's parent.
"""

from __future__ import annotations

import argparse
import ast
import shutil
import sys
from pathlib import Path

from pipeline.domain import NUM_CLASSES
from pipeline.encoder.tokens import load_splits, load_vocab_size
from tests.gpu import corpus

ROOT = Path(__file__).resolve().parents[2]
CHECK_FILES = (
    "tests/__init__.py",
    "tests/gpu/__init__.py",
    "tests/gpu/check.py",
    "tests/gpu/corpus.py",
    "tests/gpu/measure.py",
    "tests/gpu/requirements.txt",
)
CONF_FILES = (
    "conf/model/*.yaml",
    "conf/trainer/gpu.yaml",
    "conf/pretrain/default.yaml",
    "conf/finetune/default.yaml",
    "conf/experiment/gpu.yaml",
)
SLICE_DOCS = {"train": 2048, "validation": 256}
MAX_BYTES = 64 * 2**20  # what the GPU machine accepts with the working tree
SITE = "/tmp/gpu-check-site"


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of a ``pipeline`` module or package, if it is one."""
    base = root / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """The ``pipeline`` modules a file imports at module level (not inside functions or
    ``if TYPE_CHECKING``), submodules named in ``from package import x`` included."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.split(".")[0] == "pipeline" and module_file(n)}


def pipeline_closure(starts: list[Path], root: Path = ROOT) -> list[Path]:
    """Every pipeline source file ``starts`` need at import time, with the ``__init__.py``
    of each package on the way."""
    todo, seen = list(starts), set()
    found: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                file = module_file(".".join(parts[:i]), root)
                if file is not None and file not in found:
                    found.add(file)
                    todo.append(file)
    return sorted(found)


def copy(files: list[Path], out: Path) -> None:
    for path in files:
        dest = out / path.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)


def write_data_slice(out: Path, tokenized: Path, tokenizer: Path) -> dict | None:
    """The slice of ``tokenized`` in ``out/gpu-slice`` (None when there is no data)."""
    if not tokenized.is_dir():
        return None
    vocab_size = load_vocab_size(tokenizer)
    splits = load_splits(tokenized, vocab_size, NUM_CLASSES, corpus.SPLITS)
    return corpus.write_slice(out / "gpu-slice", splits, vocab_size, SLICE_DOCS)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_command(out: Path) -> str:
    """The shell command that installs the wheels and runs the check on the GPU machine,
    from the parent of ``out``."""
    install = (
        f"python3 -m pip install -q --no-index --no-deps --no-compile --upgrade "
        f"--target {SITE} wheels/*.whl"
    )
    check = 'python3 -m tests.gpu.check --out "${OUT:-.}/gpu-check.json"'
    return f"cd {out.name} && {install} && PYTHONPATH={SITE} PYTHONUNBUFFERED=1 {check}"


def cpu_command(out: Path) -> str:
    """The same check forced onto this machine's CPU (two steps), with this Python."""
    return f"cd {out} && {sys.executable} -m tests.gpu.check --device cpu --out gpu-check.json"


def build(out: Path, wheels: Path | None, tokenized: Path, tokenizer: Path) -> int:
    """Write the bundle into ``out`` (replaced); its size in bytes."""
    shutil.rmtree(out, ignore_errors=True)
    check_files = [ROOT / f for f in CHECK_FILES]
    confs = [p for pattern in CONF_FILES for p in sorted(ROOT.glob(pattern))]
    py = [f for f in check_files if f.suffix == ".py"]
    copy([*check_files, *confs, *pipeline_closure(py)], out)
    write_data_slice(out, tokenized, tokenizer)
    if wheels is not None:
        (out / "wheels").mkdir()
        for wheel in sorted(wheels.glob("*.whl")):
            shutil.copy2(wheel, out / "wheels" / wheel.name)
    size = folder_bytes(out)
    if size >= MAX_BYTES:
        raise SystemExit(f"{out}: {size / 2**20:.1f} MiB, over the 64 MiB a GPU machine takes")
    return size


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / ".gpu-bundle")
    p.add_argument("--wheels", type=Path, help="folder of the requirements.txt wheels")
    p.add_argument("--tokenized", type=Path, default=ROOT / "data/tokenized")
    p.add_argument("--tokenizer", type=Path, default=ROOT / "data/tokenizer/tokenizer.json")
    args = p.parse_args(argv)
    size = build(args.out, args.wheels, args.tokenized, args.tokenizer)
    data = "a slice of data/tokenized" if (args.out / "gpu-slice").is_dir() else "synthetic data"
    print(f"{args.out}: {size / 2**20:.2f} MiB ({data}). On the GPU machine, from its parent:")
    print(run_command(args.out))
    print("Forced onto this machine's CPU, two steps:")
    print(cpu_command(args.out))


if __name__ == "__main__":
    sys.exit(main())
