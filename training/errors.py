"""The one error a training command stops on: library functions raise it (or a subclass) with a one-line reason,
and each command's `main` prints it and exits non-zero (`run_main`), without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class TrainingError(Exception):
    """A training, prior, evaluation or export step cannot go on. `str()` is a one-line reason for the user."""


def run_main(body: Callable[[], object]) -> int:
    """Run a command's body: 0 when it returns, 2 with `error: <reason>` on stderr when it raises TrainingError."""
    try:
        body()
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
