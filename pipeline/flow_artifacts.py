"""What ``xlm flow`` shows besides logs: live training progress, metrics tables and reports, as Prefect artifacts.

Progress comes from records, not from parsing the stage's output: the flow names a fresh file in ``XLM_PROGRESS_FILE``
for each stage it runs, and a training stage (pipeline/pretrain.py, through xlm_core.train.sinks) appends one JSON
object per line to it: ``{"kind": "train" | "valid", "step", "total", "elapsed_s", "figures": {"train/loss", ...}}``.
"""
from __future__ import annotations

import contextvars
import json
import re
import threading
import time
from pathlib import Path

import yaml
from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from pipeline.dvc_adapter import flatten
from xlm_core.train.sinks import PROGRESS_FILE_ENV

__all__ = ["PROGRESS_FILE_ENV", "ProgressArtifact", "ProgressTail", "artifact_key", "publish_metrics",
           "publish_reports"]
PROGRESS_UPDATE_EVERY_S = 2.0      # the progress artifact is written at most this often (plus the final step)
PROGRESS_POLL_S = 0.25             # how often the progress file is read for new records while the stage runs


# ------------------------------------------------------------------------------------------- live training progress
class ProgressArtifact:
    """A Prefect progress artifact fed by progress records.

    The description carries the latest loss, tokens/s, ETA (from the rate of steps since the first record this run
    saw, so a resumed run's ETA is not skewed by the steps it skipped) and the last validation loss. Written at most
    every ``every_s`` seconds and at the last step; one artifact per run under the key ``<stage>-progress`` (the UI
    keeps the history by key).
    """

    def __init__(self, stage: str, every_s: float = PROGRESS_UPDATE_EVERY_S):
        self.key = f"{artifact_key(stage)}-progress"
        self.stage, self.every_s = stage, every_s
        self.artifact_id = None
        self.updates = 0
        self._written_at = float("-inf")
        self._pending: tuple[float, str] | None = None
        self._first: tuple[int, float] | None = None       # (step, elapsed_s) of the first train record
        self._train: dict = {}                              # the figures of the last train and valid records
        self._valid: dict = {}
        self._broken = False

    def observe(self, record: dict) -> None:
        try:
            step, total = int(record["step"]), int(record["total"])
            elapsed, figures = float(record.get("elapsed_s", 0.0)), dict(record.get("figures") or {})
        except (KeyError, TypeError, ValueError):
            return                                          # not a progress record: nothing to show
        if total <= 0:
            return
        if record.get("kind") == "valid":
            self._valid = figures
        else:
            self._train = figures
            if self._first is None:
                self._first = (step, elapsed)
        eta = None
        if self._first is not None and step > self._first[0]:
            eta = (total - step) * (elapsed - self._first[1]) / (step - self._first[0])
        self._pending = (min(100.0, 100.0 * step / total), self._describe(step, total, eta))
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

    def _describe(self, step: int, total: int, eta: float | None) -> str:
        figures = self._train
        parts = [f"**{self.stage}** step {step}/{total}"]
        if "train/loss" in figures:
            parts.append(f"loss {figures['train/loss']:.4f}")
        if "train/tokens_per_s" in figures:
            parts.append(f"{figures['train/tokens_per_s']:.0f} tokens/s")
        if eta is not None:
            parts.append(f"ETA {_duration(eta)}")
        # valid/<objective>_loss/<language or pair>: their mean, the one number that says whether validation improves
        losses = [v for k, v in self._valid.items() if k.split("/")[1:2] and k.split("/")[1].endswith("_loss")]
        if losses:
            parts.append(f"valid loss {sum(losses) / len(losses):.4f} (mean of {len(losses)})")
        return " · ".join(parts)


class ProgressTail:
    """Reads new whole lines of a progress file into ``progress.observe`` while the stage runs (a thread).

    The thread runs in a copy of the task's context, so the artifact it writes belongs to the task run.
    """

    def __init__(self, path: Path, progress: ProgressArtifact, poll_s: float = PROGRESS_POLL_S):
        self.path, self.progress, self.poll_s = path, progress, poll_s
        self._offset, self._partial = 0, b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                        name=f"{progress.key}-tail", daemon=True)

    def __enter__(self) -> "ProgressTail":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.read()                                         # what the stage wrote after the last poll
        self.progress.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.read()

    def read(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")   # a line still being written waits
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self.progress.observe(record)


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
                for key, value in flatten(values or {}).items()]
        suffix = "" if len(metrics_files) == 1 else f"-{artifact_key(Path(rel).stem)}"
        create_table_artifact(rows, key=f"{artifact_key(stage)}-metrics{suffix}",
                              description=f"`{rel}` after stage `{stage}`")


def publish_reports(project: Path, stage: str, reports: tuple[str, ...]) -> None:
    for rel in reports:
        path = project / rel
        if path.is_file():
            create_markdown_artifact(path.read_text(encoding="utf-8"),
                                     key=f"{artifact_key(Path(rel).stem)}-report",
                                     description=f"`{rel}` after stage `{stage}`")


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "stage"
