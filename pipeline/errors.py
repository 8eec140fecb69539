"""One clear error line for bad input, and the CLI wrapper every stage uses."""
from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, NoReturn

import yaml

from xlm_core.atomic import DISK_FULL_ERRNOS, disk_full_reason, is_disk_full
from xlm_core.errors import XLMError


class PipelineError(XLMError):
    """A problem the user can fix, found by a stage (params, paths): what is wrong, where, how to fix it."""


def fail(message: str) -> NoReturn:
    raise PipelineError(message)


@contextlib.contextmanager
def disk_full_is_an_error(stage: str, target: str | os.PathLike, outcome: str | None = None) -> Iterator[None]:
    """Turn a full disk (or quota, or file-size limit) met while writing ``target`` into one error line.

    Outputs are written under temporary names and renamed into place (xlm_core.atomic), so what was there before is
    still there: ``outcome`` says so unless given (pretrain says where training stands instead).
    """
    try:
        yield
    except XLMError:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise PipelineError(disk_full_message(stage, str(target), exc, outcome)) from None


def disk_full_message(stage: str, target: str | None, exc: BaseException, outcome: str | None = None) -> str:
    where = f" while writing {target}" if target else ""
    holding = "it" if target else "the stage's outputs"
    if outcome is None and restore_hint(stage):   # under `dvc repro` the previous output is gone: run_cli says so
        return f"disk full{where} ({disk_full_reason(exc)}); free space on the disk holding {holding} and rerun " \
               f"`dvc repro {stage}`"
    if outcome is None:
        outcome = (f"the previous {target} is untouched" if target else
                   "outputs are renamed into place only when complete, so each is whole, the previous or the new "
                   "version")
    return (f"disk full{where} ({disk_full_reason(exc)}); free space on the disk holding {holding} and rerun "
            f"`dvc repro {stage}`; {outcome}")


def _written_path(exc: BaseException) -> tuple[str | None, bool]:
    """The file a disk-full OSError in ``exc``'s chain names (a write() error usually names none), as it will be
    called once renamed into place, and whether it was a temporary (so the previous output is untouched)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS and current.filename:
            # data/clean.tmp-123-1a2b3c4d/mono/train.parquet -> data/clean/mono/train.parquet
            path, temporaries = re.subn(r"\.tmp-\d+-[^/]*", "", os.fsdecode(current.filename))
            with contextlib.suppress(ValueError):
                path = str(Path(path).relative_to(Path.cwd()))
            return path, temporaries > 0
        current = current.__cause__ or current.__context__
    return None, False


def run_cli(stage: str, func: Callable[[], object]) -> int:
    """Run a stage entry point; turn any XLMError into ``error: [stage] message`` on stderr and exit status 2.

    Tracebacks are for bugs; a user error is a single line. A full disk is a user error wherever it happens (stages
    that know which output they were writing say so themselves). Ctrl-C exits 130 without a traceback.
    """
    try:
        func()
    except XLMError as exc:
        _let_rank_zero_say_it()
        print_error(stage, " ".join(str(exc).split("\n")) + restore_hint(stage))
        return exc.exit_code
    except KeyboardInterrupt:
        print_error(stage, "interrupted")
        return 130
    except Exception as exc:
        if _under_torchrun() and _peer_gone(exc):
            # Another worker failed (and said why) or was killed: the launcher stops this one in a moment and
            # reports; a traceback from here would only bury the cause.
            time.sleep(PEER_GONE_WAIT_S)
            print_error(stage, f"lost contact with another worker ({str(exc).splitlines()[0][:200]}); the cause is "
                               f"in that worker's output above")
            return 1
        if not is_disk_full(exc):
            raise
        _let_rank_zero_say_it()
        path, temporary = _written_path(exc)
        outcome = None if temporary or path is None else \
            "files written in place there may be cut short; the rerun rewrites them"
        print_error(stage, disk_full_message(stage, path, exc, outcome) + (restore_hint(stage) if outcome is None
                                                                           else ""))
        return PipelineError.exit_code
    return 0


def restore_hint(stage: str) -> str:
    """Under `dvc repro` (DVC sets DVC_STAGE), DVC deleted the stage's cached outputs before running it: say how to
    get them back. Settings errors never get here (the params stage refuses them before DVC removes anything).

    Only when dvc.lock records an earlier run of the stage (else there is nothing to restore), and by path: `dvc
    checkout <stage>` would also check out its persistent outputs (pretrain's checkpoints), which a failed run may
    have changed on purpose.
    """
    if os.environ.get("DVC_STAGE") != stage:
        return ""
    root = Path(os.environ.get("DVC_ROOT", "."))
    try:
        entry = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]
        locked = yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]
        recorded = {item["path"] for item in locked.get("outs") or []}
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return ""
    removed = []
    for key in ("outs", "metrics", "plots"):
        for item in entry.get(key) or []:
            path, options = (item, {}) if isinstance(item, str) else next(iter(item.items()))
            if not (options or {}).get("persist") and (options or {}).get("cache", True) and path in recorded:
                removed.append(path)
    if not removed:
        return ""
    return (f"; DVC removed the previous {', '.join(removed)} before running the stage: `dvc checkout "
            f"{' '.join(removed)}` restores {'it' if len(removed) == 1 else 'them'}")


# How long a worker other than rank 0 waits before printing its error line (see _let_rank_zero_say_it), and how long
# a worker whose peer is gone waits for the launcher to stop it.
OTHER_RANK_WAIT_S = 10.0
PEER_GONE_WAIT_S = 30.0
# How a collective reports a peer that exited or was killed (gloo, NCCL, the TCP store).
_PEER_GONE_TEXTS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                    "NCCL communicator was aborted")


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def _peer_gone(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"DistError", "DistNetworkError", "DistBackendError"}) or \
        any(text in str(exc) for text in _PEER_GONE_TEXTS)


def _let_rank_zero_say_it() -> None:
    """Under torchrun every rank meets the same user errors (same params, same data), and rank 0 prints the line.

    Another rank waits a moment first: torchrun stops it as soon as rank 0 has exited, so the line is not repeated
    once per worker, and an error only that rank met (rank 0 then waits for it in a collective) still gets printed.
    """
    if _under_torchrun() and os.environ.get("RANK", "0") != "0":
        time.sleep(OTHER_RANK_WAIT_S)


def print_error(stage: str, message: str) -> None:
    # The leading carriage return starts the line at column 0 even after nested progress bars (the thread-pool
    # stages) closed: tqdm clears them with spaces and a cursor-up, which would otherwise glue the error to that
    # cleared line. Both a terminal and str.splitlines() then see the error as a line of its own.
    print(f"\rerror: [{stage}] {message}", file=sys.stderr, flush=True)
