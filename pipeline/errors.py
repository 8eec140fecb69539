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
        _print_error(stage, " ".join(str(exc).split("\n")))
        return exc.exit_code
    except KeyboardInterrupt:
        _print_error(stage, "interrupted")
        return 130
    return 0


def _print_error(stage: str, message: str) -> None:
    # The leading carriage return starts the line at column 0 even after nested progress bars (the thread-pool
    # stages) closed: tqdm clears them with spaces and a cursor-up, which would otherwise glue the error to that
    # cleared line. Both a terminal and str.splitlines() then see the error as a line of its own.
    print(f"\rerror: [{stage}] {message}", file=sys.stderr, flush=True)
