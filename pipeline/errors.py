"""One exception type for expected failures, and the stage entry point that prints it.

Stages raise :class:`PipelineError` for anything a user can fix (bad params, a corrupt
archive, a schema violation). The entry point turns it into one ``error:`` line on stderr
and exit code 1 instead of a traceback; unexpected exceptions keep their traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class PipelineError(Exception):
    """A failure with a message meant for the user (no traceback needed)."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (MLflow's ``.message`` when it has one),
    or its type name: library errors often run to pages, a user's error stays one line."""
    message = (getattr(exc, "message", None) or str(exc)).strip()
    return message.splitlines()[0][:limit] if message else type(exc).__name__


def run_stage(main: Callable[[], object]) -> None:
    """Run a stage's ``main`` and exit 1 with a one-line message on :class:`PipelineError`."""
    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: no outputs were written", file=sys.stderr)
        sys.exit(130)
