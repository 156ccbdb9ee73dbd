"""DVC stage entry points: one module per stage of dvc.yaml, each a ``main()`` over library code.

``python -m pipeline.stages.<name>`` imports this package before the stage's own imports,
so it first checks, with the standard library only, that the running interpreter has the
project's dependencies: DVC runs stages with the ``python`` on PATH, which is not the
virtual environment's unless it is activated.
"""

from __future__ import annotations

import importlib.util
import sys

# Import names of key dependencies of pyproject.toml: looked up on sys.path, not imported.
REQUIRED_MODULES = ("pandas", "numpy", "pyarrow", "pydantic", "yaml", "pandera", "sklearn")
EXIT_CODE = 1  # as pipeline.errors.run_stage exits on a PipelineError


def missing_module(names: tuple[str, ...] = REQUIRED_MODULES) -> str | None:
    """The first of ``names`` the running interpreter cannot import, or None."""
    return next((name for name in names if importlib.util.find_spec(name) is None), None)


def check_environment() -> None:
    """Exit with one ``error:`` line on stderr if the interpreter lacks the dependencies.

    Raises:
        SystemExit: with ``EXIT_CODE`` when a module of ``REQUIRED_MODULES`` is missing.
    """
    missing = missing_module()
    if missing is not None:
        print(
            f"error: {sys.executable} lacks the project's dependencies (no module "
            f"'{missing}'): activate the virtual environment (source .venv/bin/activate) "
            "or run through make (make repro)",
            file=sys.stderr,
        )
        sys.exit(EXIT_CODE)


check_environment()
