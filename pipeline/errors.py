"""One clear error line for bad input, and the CLI wrapper every stage uses."""
from __future__ import annotations

import sys
from typing import Callable, NoReturn


class PipelineError(Exception):
    """A problem the user can fix: the message says what is wrong, where, and how to fix it (one line)."""

    exit_code = 2


def fail(message: str) -> NoReturn:
    raise PipelineError(message)


def run_cli(stage: str, func: Callable[[], object]) -> int:
    """Run a stage entry point; turn PipelineError into ``error: [stage] message`` on stderr and exit status 2.

    Tracebacks are for bugs; a user error is a single line. Ctrl-C exits 130 without a traceback.
    """
    try:
        func()
    except PipelineError as exc:
        msg = " ".join(str(exc).split("\n"))
        print(f"error: [{stage}] {msg}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"error: [{stage}] interrupted", file=sys.stderr, flush=True)
        return 130
    return 0
