"""``xlm flow``: run dvc.yaml as a Prefect 3 flow, one task per DVC stage, to watch the pipeline live in the Prefect UI.

DVC stays in charge. The stages, their order and their dependencies come from DVC's own stage graph; each task asks
DVC whether its stage is up to date (``dvc status``) and, if not, runs ``dvc repro --single-item <stage>``, so dvc.lock
remains the one record of what was built from what, and ``dvc repro`` after ``xlm flow`` has nothing to do (and the
reverse). Prefect adds what DVC has no place for: each stage's output streamed into its task's logs, a progress bar
with loss / tokens/s / ETA while a stage prints ``step i/n ...`` lines (pretrain), a table of each stage's metrics
file, the evaluation report, retries for the network stage, and a history of runs.

    xlm flow                          # every stage of dvc.yaml, in DVC's order
    xlm flow --stages pretrain        # pretrain and what it depends on (like `dvc repro pretrain`)
    xlm flow --stages pretrain --force   # rerun pretrain even if DVC finds it up to date

Settings (server address, analytics off) are in prefect.toml at the project root; see the README.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# No telemetry from this process, whatever the Prefect profile says (set before Prefect is imported; a user who
# exported DO_NOT_TRACK=0 keeps their choice). The server side is off through prefect.toml.
os.environ.setdefault("DO_NOT_TRACK", "1")

import yaml  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import (  # noqa: E402
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.states import Completed, State  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from pipeline.errors import PipelineError, run_cli  # noqa: E402

FLOW_NAME = "xlm-pipeline"
# Stages whose failures are usually transient (network): Prefect retries them with exponential backoff.
RETRIED_STAGES = {"download": 3}
RETRY_BACKOFF_S = 10.0             # waits of 10, 20, 40 s between the tries
TQDM_LOG_EVERY_S = 10.0            # a tqdm bar redrawn with \r becomes at most one log line per this many seconds
PROGRESS_UPDATE_EVERY_S = 2.0      # the progress artifact is written at most this often (plus the final step)
# Reports shown as markdown artifacts after their stage, besides any *.md the stage declares in dvc.yaml.
STAGE_REPORTS = {"evaluate": ["reports/eval.md"]}


class StageFailed(PipelineError):
    """A stage exited non-zero; the message carries the stage's own error line."""


# ----------------------------------------------------------------------------------------------- DVC: plan and status
@dataclass(frozen=True)
class PlannedStage:
    address: str                   # what `dvc repro` takes: "clean", or "sub/dvc.yaml:clean" outside the root
    name: str
    upstream: tuple[str, ...]      # addresses of the planned stages whose outputs this one reads
    metrics: tuple[str, ...]       # its `metrics:` files, relative to the project root
    reports: tuple[str, ...]       # markdown files to show after it runs


def find_project_root(start: str | Path = ".") -> Path:
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Path(Repo.find_root(str(start))).resolve()
    except NotDvcRepoError:
        raise PipelineError(f"{Path(start).resolve()} is not inside a DVC project; run `xlm flow` from the "
                            "folder that holds dvc.yaml (or `dvc init` one)") from None


def plan_stages(project: Path, targets: list[str] | None = None) -> list[PlannedStage]:
    """The stages `dvc repro [targets]` would consider, in the order it would run them (DVC's own planner)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    with Repo(str(project)) as repo:
        try:
            graph = get_active_graph(repo.index.graph)
            chosen = collect_stages(repo, [_api_target(project, t) for t in targets]) if targets else None
            order = plan_repro(graph, chosen)
        except DvcException as exc:
            known = ", ".join(_address(project, s) for s in repo.index.stages)
            raise PipelineError(f"DVC cannot plan {targets or 'dvc.yaml'}: {exc} (stages: {known})") from None
        planned = set(order)
        return [PlannedStage(
            address=_address(project, stage),
            name=stage.name,
            # edges go from a stage to the stages producing its dependencies
            upstream=tuple(_address(project, dep) for dep in graph.successors(stage) if dep in planned),
            metrics=tuple(_relative(project, out.fs_path) for out in stage.outs if out.metric),
            reports=tuple(dict.fromkeys(
                [_relative(project, out.fs_path) for out in stage.outs if out.fs_path.endswith(".md")]
                + STAGE_REPORTS.get(stage.name, []))),
        ) for stage in order]


@dataclass(frozen=True)
class StageStatus:
    changed: bool
    reason: str                    # "up to date" or what changed, e.g. "changed params: pretrain.lr (0.1 -> 0.2)"


def stage_status(project: Path, address: str) -> StageStatus:
    """What `dvc status <stage>` says, in one line (and param changes down to the key that moved)."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        target = _api_target(project, address)
        stage = repo.stage.collect(target)[0]
        report = repo.status(targets=[target])
        if not report:
            return StageStatus(False, "up to date (dvc.lock matches its deps, params and outs)")
        lock = getattr(stage.dvcfile, "lockfile_contents", None)     # dvc.yaml stages; .dvc files have none
        if lock is not None and stage.name not in (lock.get("stages") or {}):
            return StageStatus(True, "never run (not in dvc.lock yet)")
        entries = next(iter(report.values()))
        return StageStatus(True, "; ".join(_describe(project, entry, stage) for entry in entries))


def _describe(project: Path, entry: str | dict, stage) -> str:
    if isinstance(entry, str):                          # "always changed", "changed command", "changed checksum"
        return entry
    parts = []
    for kind, paths in entry.items():                   # {"changed deps": {"data/raw": "modified", ...}}
        for path, what in paths.items():                # DVC names paths relative to the cwd
            if isinstance(what, dict):                  # a params file: {"pretrain": "modified"}
                parts.append(f"changed params: {', '.join(_param_changes(stage, path) or list(what))}")
            else:
                parts.append(f"{kind}: {_relative(project, os.path.abspath(path))} {what}")
    return "; ".join(parts)


def _param_changes(stage, params_file: str) -> list[str]:
    """dvc.lock records whole sections (`- pretrain`); name the keys inside them that changed: pretrain.lr (a -> b)."""
    from dvc.dependency.param import ParamsDependency

    changes = []
    for dep in stage.deps:
        if not isinstance(dep, ParamsDependency) or str(dep) != params_file:
            continue
        locked = _flatten(dep.hash_info.value or {})
        current = _flatten(dep.read_params(flatten=False))
        for key in dict.fromkeys([*locked, *current]):
            old, new = locked.get(key, "(absent)"), current.get(key, "(absent)")
            if old != new:
                changes.append(f"{key} ({old} -> {new})")
    return changes


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _address(project: Path, stage) -> str:
    """The stage as `dvc repro` names it from the project root (DVC's own `addressing` is relative to the cwd)."""
    dvcfile = _relative(project, stage.dvcfile.path)
    return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"


def _api_target(project: Path, address: str) -> str:
    """An absolute target for DVC's Python API, which resolves relative ones against the cwd, not the repo."""
    dvcfile, _, name = address.rpartition(":")
    return f"{project / (dvcfile or 'dvc.yaml')}:{name}"


def _relative(project: Path, path: str) -> str:
    return os.path.relpath(path, project)


# ------------------------------------------------------------------------------------- the stage's output, streamed
@dataclass
class StageOutputSummary:
    stage_error: str | None = None   # our stages: "error: [stage] what, where, how to fix"
    dvc_error: str | None = None     # DVC: "ERROR: failed to reproduce 'x': ..."
    last_line: str | None = None
    dvc_skipped: bool = False        # DVC found nothing to do after all
    restored: bool = False           # DVC restored the outputs from its run cache instead of running the command


class StageOutput:
    """Splits a stage's raw output into log lines as it arrives.

    Lines ending in \\n (or \\r\\n) are logged as they come. tqdm redraws its bar with \\r many times a second:
    those redraws are logged at most once every ``every_s`` seconds; the bar's final state (tqdm ends it with \\n)
    always is, and so is the last redraw of a bar the stage never finished.
    """

    def __init__(self, emit: Callable[[str], None], every_s: float = TQDM_LOG_EVERY_S):
        self.emit, self.every_s = emit, every_s
        self.summary = StageOutputSummary()
        self._buffer = b""
        self._last_redraw_logged = float("-inf")
        self._unlogged_redraw: str | None = None   # the newest redraw the throttle dropped

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        self._split(final=False)

    def close(self) -> StageOutputSummary:
        self._split(final=True)
        if self._buffer:                           # a last line without a line break
            self._line(self._buffer.decode("utf-8", errors="replace"), redraw=False)
            self._buffer = b""
        if self._unlogged_redraw is not None:      # a bar cut short: show where it got to
            self._log(self._unlogged_redraw)
            self._unlogged_redraw = None
        return self.summary

    def _split(self, final: bool) -> None:
        while True:
            ends = [i for i in (self._buffer.find(b"\n"), self._buffer.find(b"\r")) if i >= 0]
            if not ends:
                return
            cut = min(ends)
            width, redraw = 1, self._buffer[cut] == ord("\r")
            if redraw and cut + 1 == len(self._buffer) and not final:
                return                             # maybe the first half of \r\n: wait for the next byte
            if redraw and self._buffer[cut + 1:cut + 2] == b"\n":
                width, redraw = 2, False
            segment, self._buffer = self._buffer[:cut], self._buffer[cut + width:]
            self._line(segment.decode("utf-8", errors="replace"), redraw)

    def _line(self, line: str, redraw: bool) -> None:
        line = line.rstrip()
        if not line.strip():
            return
        if redraw:
            now = time.monotonic()
            if now - self._last_redraw_logged < self.every_s:
                self._unlogged_redraw = line
                return
            self._last_redraw_logged = now
        self._unlogged_redraw = None
        self._log(line)

    def _log(self, line: str) -> None:
        text = line.strip()
        self.summary.last_line = text
        if (at := text.find("error: [")) >= 0:   # also when glued to an unfinished progress bar
            self.summary.stage_error = text[at:]
        elif text.startswith("ERROR:"):
            self.summary.dvc_error = text
        elif re.match(r"Stage '.*' didn't change, skipping", text):
            self.summary.dvc_skipped = True
        elif re.match(r"Stage '.*' is cached - skipping run", text):
            self.summary.restored = True
        self.emit(line)


def log_level(line: str) -> int:
    head = line.lstrip()[:8].lower()
    if head.startswith(("error", "traceback")):
        return logging.ERROR
    if head.startswith("warn"):
        return logging.WARNING
    return logging.INFO


# ------------------------------------------------------------------------------------------- live training progress
STEP_LINE = re.compile(r"\bstep (?P<step>\d+)/(?P<total>\d+)\b")
FIGURE = {name: re.compile(pattern) for name, pattern in {
    "loss": r"\bloss (\S+)", "tokens_per_s": r"\btokens/s (\S+)", "eta_s": r"\beta (\d+(?:\.\d+)?)s\b"}.items()}


class ProgressArtifact:
    """A Prefect progress artifact fed by ``step i/n loss x tokens/s y ... eta zs`` lines (pipeline/pretrain.py's).

    The description carries the latest loss, tokens/s and ETA. Written at most every ``every_s`` seconds and at the
    last step; one artifact per run under the key ``<stage>-progress`` (the UI keeps the history by key).
    """

    def __init__(self, stage: str, every_s: float = PROGRESS_UPDATE_EVERY_S):
        self.key = f"{_artifact_key(stage)}-progress"
        self.stage, self.every_s = stage, every_s
        self.artifact_id = None
        self.updates = 0
        self._written_at = float("-inf")
        self._pending: tuple[float, str] | None = None
        self._broken = False

    def observe(self, line: str) -> None:
        match = STEP_LINE.search(line)
        if not match or int(match["total"]) <= 0:
            return
        step, total = int(match["step"]), int(match["total"])
        figures = {name: m.group(1) for name, pattern in FIGURE.items() if (m := pattern.search(line))}
        self._pending = (min(100.0, 100.0 * step / total), self._describe(step, total, figures))
        if step >= total or time.monotonic() - self._written_at >= self.every_s:
            self.flush()

    def flush(self) -> None:
        """Write the latest observed progress (if not yet written)."""
        if self._pending is None or self._broken:
            return
        progress, description = self._pending
        self._pending = None
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(progress, key=self.key, description=description)
            else:
                update_progress_artifact(self.artifact_id, progress, description=description)
        except Exception as exc:  # the UI is a window on the run: never let it break the stage
            self._broken = True
            get_run_logger().warning(f"progress artifact disabled: {exc}")
            return
        self.updates += 1
        self._written_at = time.monotonic()

    def _describe(self, step: int, total: int, figures: dict[str, str]) -> str:
        parts = [f"**{self.stage}** step {step}/{total}"]
        if "loss" in figures:
            parts.append(f"loss {figures['loss']}")
        if "tokens_per_s" in figures:
            parts.append(f"{figures['tokens_per_s']} tokens/s")
        if "eta_s" in figures:
            parts.append(f"ETA {_duration(float(figures['eta_s']))}")
        return " · ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# ------------------------------------------------------------------------------------- metrics and report artifacts
def publish_metrics(project: Path, stage: str, metrics_files: tuple[str, ...]) -> None:
    """One table artifact per metrics file: a row per (flattened) metric."""
    for rel in metrics_files:
        path = project / rel
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        rows = [{"metric": key, "value": value if isinstance(value, (int, float, str, bool)) else json.dumps(value)}
                for key, value in _flatten(values or {}).items()]
        suffix = "" if len(metrics_files) == 1 else f"-{_artifact_key(Path(rel).stem)}"
        create_table_artifact(rows, key=f"{_artifact_key(stage)}-metrics{suffix}",
                              description=f"`{rel}` after stage `{stage}`")


def publish_reports(project: Path, stage: str, reports: tuple[str, ...]) -> None:
    for rel in reports:
        path = project / rel
        if path.is_file():
            create_markdown_artifact(path.read_text(encoding="utf-8"),
                                     key=f"{_artifact_key(Path(rel).stem)}-report",
                                     description=f"`{rel}` after stage `{stage}`")


def _artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "stage"


# ------------------------------------------------------------------------------------------------ the task, the flow
def _dvc_repro_command(address: str, force: bool) -> list[str]:
    return [sys.executable, "-m", "dvc", "repro", "--single-item", address, *(["--force"] if force else [])]


def _stage_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")   # the stage's prints reach the task logs as they happen
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


@task(cache_policy=NO_CACHE, persist_result=False)
def reproduce_stage(project: str, address: str, force: bool = False,
                    metrics: tuple[str, ...] = (), reports: tuple[str, ...] = ()) -> State:
    """Bring one DVC stage up to date: skip it if `dvc status` says so, else `dvc repro --single-item` it."""
    from dvc.exceptions import DvcException

    logger = get_run_logger()
    root = Path(project)
    try:
        status = stage_status(root, address)
    except DvcException as exc:                     # e.g. another `dvc repro` holds the repo lock
        raise StageFailed(f"stage '{address}': DVC cannot read its status: {exc}") from None
    if not status.changed and not force:
        logger.info(f"skipped: {status.reason}")
        _publish_artifacts(root, address, metrics, ())
        return Completed(name="Skipped", message=f"skipped: {status.reason}")
    reason = status.reason if status.changed else "forced (--force); DVC finds it up to date"
    logger.info(f"running: {reason}")

    command = _dvc_repro_command(address, force)
    logger.info(f"$ dvc {' '.join(command[3:])}")   # command = [python, -m, dvc, ...]
    progress = ProgressArtifact(address)

    def emit(line: str) -> None:
        logger.log(log_level(line), "%s", line)
        progress.observe(line)

    output = StageOutput(emit)
    started = time.monotonic()
    # stderr joins stdout so the log keeps the order in which the stage wrote its lines
    proc = subprocess.Popen(command, cwd=root, env=_stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while chunk := proc.stdout.read1(1 << 16):
            output.feed(chunk)
        returncode = proc.wait()
    finally:
        if proc.poll() is None:                     # the task itself was interrupted: don't leave DVC running
            proc.terminate()
            proc.wait()
    summary = output.close()
    progress.flush()
    elapsed = time.monotonic() - started

    if returncode != 0:
        why = summary.stage_error or summary.dvc_error or summary.last_line or "no output"
        raise StageFailed(f"stage '{address}' failed: {why}")   # DVC's exit status (255) says nothing more
    _publish_artifacts(root, address, metrics, reports)
    if summary.dvc_skipped:
        return Completed(name="Skipped", message="skipped: DVC found it up to date")
    if summary.restored:
        return Completed(name="Restored", message=f"restored from DVC's run cache ({reason})")
    return Completed(message=f"ran in {elapsed:.1f}s: {reason}")


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
    return {address: state.name for address, state in states.items()}


# --------------------------------------------------------------------------------------------------------------- CLI
def check_prefect_api() -> str:
    """One line saying which Prefect API this run reports to; a clear error if it is not answering."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    url = settings.api.url
    if not url:
        if not settings.server.ephemeral.enabled:
            raise PipelineError("no Prefect server configured: set PREFECT_API_URL (see prefect.toml) or "
                                "PREFECT_SERVER_EPHEMERAL_ENABLED=true")
        return ("PREFECT_API_URL is empty: using a temporary local Prefect server; the run is stored in "
                f"{settings.home} and shows up in the UI once you run `prefect server start`")
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise PipelineError(
            f"no Prefect server answers at {url} ({type(problem).__name__}: {problem}); start one with "
            "`prefect server start` in the project folder, or run `PREFECT_API_URL= xlm flow` to use a temporary "
            "local server (`dvc repro` runs the same pipeline without Prefect)")
    return f"reporting to the Prefect server at {url} (UI: {url.removesuffix('/api')})"


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
        print(f"flow: {check_prefect_api()}", file=sys.stderr, flush=True)
        xlm_pipeline(project=str(root), stages=args.stages, force=args.force)

    return run_cli("flow", run)


if __name__ == "__main__":
    sys.exit(main())
