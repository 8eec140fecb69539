"""Starting pretrain's workers on this node with torchrun's own launcher, and tying each worker's life to it.

Imports stay light at module level: ``die_with_the_launcher`` runs before pretrain's slow imports.
"""
from __future__ import annotations

import os
import signal
import sys


def die_with_the_launcher() -> None:
    """Under torchrun, have the kernel SIGKILL this worker when its launcher dies (Linux).

    torchrun starts its workers in sessions of their own, so a SIGKILL of `dvc repro`'s process group (a
    scheduler's kill, `timeout -s KILL`, an OOM kill of the group) ends the launcher but not the worker: the orphan
    would go on training and writing data/checkpoints while the next `dvc repro` trains into the same folder.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    launcher = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != launcher:  # the launcher died before the request took effect
        os._exit(137)


def launch_workers(nproc: int, module: str, argv: list[str]) -> int:
    """Run ``nproc`` workers of ``python -m module argv`` on this node with torchrun's launcher; returns the exit
    status.

    A worker that meets a user error prints its one line and exits 2 (run_cli); torchrun would then add its own error
    log and a ChildFailedError traceback. Here that report is left out when a worker has said what is wrong, and
    shortened to one line when none could (a crash prints its own traceback; a kill prints nothing).
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run as torchrun

    from pipeline.errors import PipelineError, print_error

    stage = module.rsplit(".", 1)[-1]
    launch_args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", module, *argv])
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")   # what torchrun sets, without its banner; pretrain.threads decides
    try:
        torchrun(launch_args)
    except SignalException as exc:   # Ctrl-C, or a scheduler's SIGTERM to the launcher: the workers are stopped
        print_error(stage, f"interrupted ({exc.sigval.name}); run `dvc repro` again to resume from the newest "
                           f"checkpoint")
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        if any(f.exitcode == PipelineError.exit_code for f in exc.failures.values()):
            return PipelineError.exit_code
        # The cause: a worker killed by the OS (not by the launcher's own SIGTERM while stopping the others), else the
        # first failure. Failure times have whole seconds, so a tie could otherwise name a bystander.
        killed = [(rank, f) for rank, f in sorted(exc.failures.items())
                  if f.exitcode < 0 and -f.exitcode != signal.SIGTERM]
        rank, failure = killed[0] if killed else exc.get_first_failure()
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with status {failure.exitcode} (its output above says why)")
        print_error(stage, f"worker rank {rank} {how}; run `dvc repro` again to resume from the newest checkpoint")
        return 1
    return 0
