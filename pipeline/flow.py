"""``xlm flow``: run dvc.yaml as a Prefect 3 flow, one task per DVC stage, to watch the pipeline live in the Prefect UI.

DVC stays in charge. The stages, their order and their dependencies come from DVC's own stage graph; each task asks
DVC whether its stage is up to date (``dvc status``) and, if not, runs ``dvc repro --single-item <stage>``, so dvc.lock
remains the one record of what was built from what, and ``dvc repro`` after ``xlm flow`` has nothing to do (and the
reverse). Prefect adds what DVC has no place for: each stage's output streamed into its task's logs
(pipeline.stage_output), a progress bar with loss / tokens/s / ETA from the progress records a training stage writes
to ``XLM_PROGRESS_FILE``, a table of each stage's metrics file, the evaluation report (pipeline.flow_artifacts),
retries for the network stage, and a history of runs. DVC is reached through pipeline.dvc_adapter only. How a stage
runs its own units (``<stage>.task_runner``) is the stage's choice, the same under ``xlm flow`` as under ``dvc repro``.

    xlm flow                          # every stage of dvc.yaml, in DVC's order
    xlm flow --stages pretrain        # pretrain and what it depends on (like `dvc repro pretrain`)
    xlm flow --stages pretrain --force   # rerun pretrain even if DVC finds it up to date

Settings (server address, analytics off) are in prefect.toml at the project root; see the README.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# No telemetry from this process, whatever the Prefect profile says (set before Prefect is imported; a user who
# exported DO_NOT_TRACK=0 keeps their choice). The server side is off through prefect.toml.
os.environ.setdefault("DO_NOT_TRACK", "1")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.context import TaskRunContext  # noqa: E402
from prefect.states import Completed, State  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from pipeline.dvc_adapter import (  # noqa: E402
    DvcException,
    PlannedStage,
    find_project_root,
    stage_status,
)
from pipeline.dvc_adapter import plan_stages as plan_dvc_stages  # noqa: E402
from pipeline.errors import PipelineError, run_cli  # noqa: E402
from pipeline.fanout import PARENT_TASK_RUN_ENV  # noqa: E402
from pipeline.flow_artifacts import (  # noqa: E402
    PROGRESS_FILE_ENV,
    ProgressArtifact,
    ProgressTail,
    ValidationTable,
    publish_metrics,
    publish_reports,
)
from pipeline.prefect_server import check_prefect_api  # noqa: E402
from pipeline.stage_output import StageOutput, log_level  # noqa: E402

FLOW_NAME = "xlm-pipeline"
# Stages whose failures are usually transient (network): Prefect retries them with exponential backoff.
RETRIED_STAGES = {"download": 3}
RETRY_BACKOFF_S = 10.0             # waits of 10, 20, 40 s between the tries
# Reports shown as markdown artifacts after their stage, besides any *.md the stage declares in dvc.yaml.
STAGE_REPORTS = {"evaluate": ["reports/eval.md"]}
# Task state names: a stage DVC found up to date is Skipped (a Completed type, so downstream stages go on),
# one whose outputs came from DVC's run cache Restored, one that ran Completed.
SKIPPED, RESTORED, RAN = "Skipped", "Restored", "Completed"


class StageFailed(PipelineError):
    """A stage exited non-zero; the message carries the stage's own error line."""


def plan_stages(project: Path, targets: list[str] | None = None) -> list[PlannedStage]:
    """The stages `dvc repro [targets]` would consider, in DVC's order, with the reports this flow shows."""
    return plan_dvc_stages(project, targets, STAGE_REPORTS)


# ------------------------------------------------------------------------------------------------ the task, the flow
def _dvc_repro_command(address: str, force: bool) -> list[str]:
    return [sys.executable, "-m", "dvc", "repro", "--single-item", address, *(["--force"] if force else [])]


def _stage_env(progress_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")   # the stage's prints reach the task logs as they happen
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env[PROGRESS_FILE_ENV] = str(progress_file)   # a training stage appends its progress records there
    task_run = TaskRunContext.get()
    if task_run is not None:   # a stage with task_runner: prefect nests its units' flow run under this task run
        env[PARENT_TASK_RUN_ENV] = str(task_run.task_run.id)
    return env


def _run_streamed(command: list[str], root: Path, address: str, logger) -> tuple[int, object]:
    """Run ``command`` with its output streamed to the task's log and its progress records to artifacts."""
    output = StageOutput(lambda line: logger.log(log_level(line), "%s", line))
    with tempfile.TemporaryDirectory(prefix="xlm-progress-") as tmp:
        progress_file = Path(tmp) / "progress.jsonl"           # fresh for each run: no records of another stage
        with ProgressTail(progress_file, ProgressArtifact(address), ValidationTable(address)):
            # stderr joins stdout so the log keeps the order in which the stage wrote its lines
            proc = subprocess.Popen(command, cwd=root, env=_stage_env(progress_file), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            try:
                while chunk := proc.stdout.read1(1 << 16):
                    output.feed(chunk)
                returncode = proc.wait()
            finally:
                if proc.poll() is None:             # the task itself was interrupted: don't leave DVC running
                    proc.terminate()
                    proc.wait()
    return returncode, output.close()


@task(cache_policy=NO_CACHE, persist_result=False)
def reproduce_stage(project: str, address: str, force: bool = False,
                    metrics: tuple[str, ...] = (), reports: tuple[str, ...] = ()) -> State:
    """Bring one DVC stage up to date: skip it if `dvc status` says so, else `dvc repro --single-item` it.

    Artifacts (metrics tables, reports) are published only for a stage that ran or was restored from DVC's run
    cache: a skipped stage's outputs are the ones an earlier run already showed. The state's data is the files DVC
    asks to `git add` (its reminder is left out of the task log; the flow names them once, at the end).
    """
    logger = get_run_logger()
    root = Path(project)
    try:
        status = stage_status(root, address)
    except DvcException as exc:                     # e.g. another `dvc repro` holds the repo lock
        raise StageFailed(f"stage '{address}': DVC cannot read its status: {exc}") from None
    if not status.changed and not force:
        logger.info(f"skipped: {status.reason}")
        return Completed(name=SKIPPED, message=f"skipped: {status.reason}", data={"git_add": []})
    reason = status.reason if status.changed else "forced (--force); DVC finds it up to date"
    logger.info(f"running: {reason}")

    command = _dvc_repro_command(address, force)
    logger.info(f"$ dvc {' '.join(command[3:])}")   # command = [python, -m, dvc, ...]
    started = time.monotonic()
    returncode, summary = _run_streamed(command, root, address, logger)
    elapsed = time.monotonic() - started

    if returncode != 0:
        why = summary.stage_error or summary.dvc_error or summary.last_line or "no output"
        raise StageFailed(f"stage '{address}' failed: {why}")   # DVC's exit status (255) says nothing more
    data = {"git_add": summary.git_add}
    if summary.dvc_skipped:
        return Completed(name=SKIPPED, message="skipped: DVC found it up to date", data=data)
    _publish_artifacts(root, address, metrics, reports)
    if summary.restored:
        return Completed(name=RESTORED, message=f"restored from DVC's run cache ({reason})", data=data)
    return Completed(message=f"ran in {elapsed:.1f}s: {reason}", data=data)


def _publish_artifacts(root: Path, address: str, metrics: tuple[str, ...], reports: tuple[str, ...]) -> None:
    try:
        publish_metrics(root, address, metrics)
        publish_reports(root, address, reports)
    except Exception as exc:  # a malformed metrics file or an API hiccup must not fail a stage DVC completed
        get_run_logger().warning(f"could not publish the artifacts of '{address}': {type(exc).__name__}: {exc}")


def _task_for(stage: PlannedStage):
    retries = RETRIED_STAGES.get(stage.name, 0)
    return reproduce_stage.with_options(
        name=stage.address, task_run_name=stage.address, retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=RETRY_BACKOFF_S)(retries) if retries else 0)


@flow(name=FLOW_NAME, persist_result=False)
def xlm_pipeline(project: str = ".", stages: list[str] | None = None, force: bool = False) -> dict[str, str]:
    """Every stage of dvc.yaml (or ``stages`` and what they depend on) as one task each, in DVC's order.

    ``force`` reruns the named ``stages`` (every stage when none are named) even if DVC finds them up to date;
    the stages they depend on still run only if changed. Stops at the first failing stage, like `dvc repro`.
    Ends Completed with ``flow_summary`` as its message and ``{stage: state name}`` as its result (what a call
    returns).
    """
    logger = get_run_logger()
    root = find_project_root(project)
    plan = plan_stages(root, stages)
    logger.info(f"DVC order: {' -> '.join(s.address for s in plan)}")
    forced = {s.address for s in plan} if force and not stages else set()
    if force and stages:
        forced = {s.address for s in plan if s.address in stages or s.name in stages}

    states: dict[str, State] = {}
    for stage in plan:
        state = _task_for(stage)(str(root), stage.address, stage.address in forced, stage.metrics, stage.reports,
                                 wait_for=[states[a] for a in stage.upstream if a in states], return_state=True)
        states[stage.address] = state
        if state.is_failed():
            logger.error(f"stopping: stage '{stage.address}' failed ({state.message})")
            state.result()   # raises the stage's StageFailed: the flow fails with the stage's error line
    names = {address: state.name for address, state in states.items()}
    summary = flow_summary(names)
    logger.info(summary)
    if hint := _git_hint(states):
        logger.info(hint)
    return Completed(message=summary, data=names)   # type: ignore[return-value]  # the UI shows the summary


def flow_summary(names: dict[str, str]) -> str:
    """``4 stages: 1 ran, 3 skipped (up to date) (ran: evaluate)``: what the flow did, Skipped apart from Completed."""
    ran = [a for a, n in names.items() if n == RAN]
    restored = [a for a, n in names.items() if n == RESTORED]
    skipped = [a for a, n in names.items() if n == SKIPPED]
    parts = [f"{len(ran)} ran", f"{len(skipped)} skipped (up to date)"]
    if restored:
        parts.append(f"{len(restored)} restored from DVC's run cache")
    done = ", ".join(ran + restored)
    return (f"{len(names)} stage{'s' if len(names) != 1 else ''}: {', '.join(parts)}"
            + (f" ({'ran' if not restored else 'ran or restored'}: {done})" if done else ""))


def _git_hint(states: dict[str, State]) -> str | None:
    """DVC's reminder after each stage (`git add dvc.lock ...`, `dvc push`), once for the whole flow."""
    files: list[str] = []
    for state in states.values():
        data = state.result(raise_on_failure=False) if state.is_completed() else None
        for name in data.get("git_add", []) if isinstance(data, dict) else []:
            if name not in files:
                files.append(name)
    if not files:
        return None
    return (f"DVC updated {', '.join(files)}: `git add {' '.join(files)}` and commit to record this run; "
            "`dvc push` sends the outputs to a DVC remote, if one is set (DVC's reminder after each stage is left "
            "out of the task logs)")


# --------------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xlm flow", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", metavar="STAGE",
                        help="run these stages and the ones they depend on (default: all of dvc.yaml)")
    parser.add_argument("--force", action="store_true",
                        help="rerun the named stages (all stages without --stages) even if DVC finds them up to date")
    args = parser.parse_args(argv)

    def run() -> None:
        root = find_project_root(Path.cwd())
        plan_stages(root, args.stages)           # unknown stage names fail here, before any Prefect work
        where = check_prefect_api("start one with `prefect server start` in the project folder, or run "
                                  "`PREFECT_API_URL= xlm flow` to use a temporary local server (`dvc repro` runs the "
                                  "same pipeline without Prefect)")
        print(f"flow: {where}", file=sys.stderr, flush=True)
        xlm_pipeline(project=str(root), stages=args.stages, force=args.force)

    return run_cli("flow", run)


if __name__ == "__main__":
    sys.exit(main())
