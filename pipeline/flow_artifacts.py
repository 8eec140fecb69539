"""What ``xlm flow`` shows besides logs: live training progress and validation, metrics tables and reports, as
Prefect artifacts.

Progress comes from records, not from parsing the stage's output: the flow names a fresh file in ``XLM_PROGRESS_FILE``
for each stage it runs, and a training stage (pipeline/pretrain.py, through xlm_core.train.sinks) appends one JSON
object per line to it: ``{"kind": "train" | "valid", "step", "total", "elapsed_s", "figures": {"train/loss", ...}}``;
a validation record may add ``"unigram": {"valid/mlm_loss/en": ...}``, the unigram level of some of its figures.
"""
from __future__ import annotations

import base64
import collections
import contextvars
import json
import mimetypes
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
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate

from pipeline.dvc_adapter import flatten
from xlm_core.train.sinks import PROGRESS_FILE_ENV

__all__ = ["PROGRESS_FILE_ENV", "ProgressArtifact", "ProgressTail", "ValidationTable", "artifact_key",
           "publish_metrics", "publish_reports", "self_contained_markdown"]
PROGRESS_UPDATE_EVERY_S = 2.0      # the progress artifact is written at most this often (plus the final step)
PROGRESS_POLL_S = 0.25             # how often the progress file is read for new records while the stage runs
LOSS_WINDOW = 20                   # the progress artifact's loss: the mean of this many latest train records
TABLE_WIDTH = 110                  # characters: a wider report table is split (the UI hides columns past its width)


# ------------------------------------------------------------------------------------------- live training progress
class ProgressArtifact:
    """A Prefect progress artifact fed by progress records.

    The description carries the running-mean loss (of the last ``LOSS_WINDOW`` train records: one step's loss is
    noise), the latest tokens/s, ETA (from the rate of steps since the first record this run saw, so a resumed run's
    ETA is not skewed by the steps it skipped) and the last validation loss. Written at most every ``every_s``
    seconds and at the last step; one artifact per run under the key ``<stage>-progress`` (the UI keeps the history
    by key).
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
        self._losses: collections.deque = collections.deque(maxlen=LOSS_WINDOW)
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
            if isinstance(figures.get("train/loss"), (int, float)):
                self._losses.append(float(figures["train/loss"]))
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
        if self._losses:
            parts.append(f"loss {sum(self._losses) / len(self._losses):.4f} (mean of the last {len(self._losses)} "
                         f"log{'s' if len(self._losses) > 1 else ''})")
        if "train/tokens_per_s" in figures:
            parts.append(f"{figures['train/tokens_per_s']:.0f} tokens/s")
        if eta is not None:
            parts.append(f"ETA {_duration(eta)}")
        # valid/<objective>_loss/<language or pair>: their mean, the one number that says whether validation improves
        losses = [v for k, v in self._valid.items() if k.split("/")[1:2] and k.split("/")[1].endswith("_loss")]
        if losses:
            parts.append(f"valid loss {sum(losses) / len(losses):.4f} (mean of {len(losses)})")
        return " · ".join(parts)


class ValidationTable:
    """A markdown artifact ``<stage>-validation``: the latest validation record as a table, rewritten in place at
    each one (a row per metric, a column per language or pair).

    A cell holds the trained model's figure beside the unigram level (the best context-free guess) where the record
    has it, else beside the previous evaluation's, and says whether it is better or worse.
    """

    def __init__(self, stage: str):
        self.key = f"{artifact_key(stage)}-validation"
        self.stage = stage
        self.artifact_id = None
        self.updates = 0
        self._previous: tuple[int, dict] | None = None     # (step, figures) of the evaluation before
        self._broken = False

    def observe(self, record: dict) -> None:
        if record.get("kind") != "valid" or self._broken:
            return
        try:
            step, total = int(record["step"]), int(record["total"])
            figures = {str(k): float(v) for k, v in dict(record.get("figures") or {}).items()}
            unigram = {str(k): float(v) for k, v in dict(record.get("unigram") or {}).items()}
        except (KeyError, TypeError, ValueError):
            return
        if not figures:
            return
        markdown = render_validation(self.stage, step, total, figures, unigram, self._previous)
        self._previous = (step, figures)
        description = f"`{self.stage}` validation at step {step}/{total}"
        try:
            if self.artifact_id is None:
                self.artifact_id = create_markdown_artifact(markdown, key=self.key, description=description)
            else:
                with get_client(sync_client=True) as client:
                    client.update_artifact(self.artifact_id, ArtifactUpdate(data=markdown, description=description))
        except Exception as exc:  # the UI is a window on the run: never let it break the stage
            self._broken = True
            get_run_logger().warning(f"validation artifact disabled: {exc}")
            return
        self.updates += 1

    def flush(self) -> None:
        pass                                                # written at each validation record


def render_validation(stage: str, step: int, total: int, figures: dict[str, float], unigram: dict[str, float],
                      previous: tuple[int, dict] | None) -> str:
    """``valid/<metric>/<language or pair>`` figures as markdown: a table of languages, one of pairs (and one of
    whole-model figures), a row per language or pair and a column per metric, so it stays narrow at any count."""
    groups: dict[str, dict[str, dict[str, str]]] = {}    # "language" | "pair" | "model" -> key -> metric -> cell
    metrics: dict[str, list[str]] = {}
    for name, value in figures.items():
        if name.endswith("/unigram"):   # pretrain's reference line for the charts: here it is in every cell already
            continue
        parts = name.split("/")[1:] if name.startswith("valid/") else name.split("/")
        metric, key = parts[0], "/".join(parts[1:]) or "all"
        group = "model" if key == "all" else "pair" if "-" in key else "language"
        if metric not in metrics.setdefault(group, []):
            metrics[group].append(metric)
        before = previous[1].get(name) if previous else None
        groups.setdefault(group, {}).setdefault(key, {})[metric] = _validation_cell(
            metric, value, unigram.get(name), before, previous[0] if previous else None)
    order = {"lower": "lower is better", "higher": "higher is better", None: ""}
    lines = [f"### `{stage}` validation at step {step}/{total}", ""]
    for group in ("language", "pair", "model"):
        if group not in groups:
            continue
        heads = [f"{m} ({order[_better(m)]})" if _better(m) else m for m in metrics[group]]
        lines += ["| " + " | ".join([group, *heads]) + " |", "|---|" + "---|" * len(heads)]
        for key, cells in groups[group].items():
            lines.append("| " + " | ".join([key, *(cells.get(m, "") for m in metrics[group])]) + " |")
        lines.append("")
    lines += ["Each cell: the trained model's figure, then in brackets the unigram level (the best context-free "
              "guess at the same targets) where the record has it, else the previous evaluation's figure; "
              "better / worse compares the two."]
    return "\n".join(_split_wide_tables(lines)) + "\n"


def _better(metric: str) -> str | None:
    if metric.endswith("loss") or "perplexity" in metric:
        return "lower"
    if "accuracy" in metric:
        return "higher"
    return None


def _validation_cell(metric: str, value: float, unigram: float | None, before: float | None,
                     before_step: int | None) -> str:
    if unigram is not None:
        reference, what = unigram, "unigram"
    elif before is not None:
        reference, what = before, f"step {before_step}:"
    else:
        return f"{value:.4f}"
    better = _better(metric)
    verdict = ""
    if better and value != reference:
        verdict = " **better**" if (value < reference) == (better == "lower") else " worse"
    elif better:
        verdict = " same"
    return f"{value:.4f} ({what} {reference:.4f}){verdict}"


class ProgressTail:
    """Reads new whole lines of a progress file into each observer's ``observe`` while the stage runs (a thread).

    The thread runs in a copy of the task's context, so the artifacts it writes belong to the task run.
    """

    def __init__(self, path: Path, *observers: ProgressArtifact | ValidationTable, poll_s: float = PROGRESS_POLL_S):
        self.path, self.observers, self.poll_s = path, observers, poll_s
        self._offset, self._partial = 0, b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                        name=f"{path.name}-tail", daemon=True)

    def __enter__(self) -> "ProgressTail":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.read()                                         # what the stage wrote after the last poll
        for observer in self.observers:
            observer.flush()

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
                for observer in self.observers:
                    observer.observe(record)


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
    """One markdown artifact per report, self-contained (``self_contained_markdown``)."""
    for rel in reports:
        path = project / rel
        if path.is_file():
            create_markdown_artifact(self_contained_markdown(path.read_text(encoding="utf-8"), path.parent),
                                     key=f"{artifact_key(Path(rel).stem)}-report",
                                     description=f"`{rel}` after stage `{stage}`")


_IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)")
_TAG = re.compile(r"<(/?[A-Za-z][\w.-]*(?:\s[^<>]*)?/?)>")      # <mask>, </s>; not autolinks (<https://...>)
_CODE_SPAN = re.compile(r"(`+).+?\1")
_TABLE_SEPARATOR = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")


def self_contained_markdown(text: str, folder: Path) -> str:
    """A report as the Prefect UI can show it, which reads no file beside the artifact and renders HTML tags.

    Images at relative (or local absolute) paths are inlined as ``data:`` URIs, read from ``folder`` (the report's
    own); tag-like text outside code (``<mask>``, ``</s>``) is escaped so it shows literally; a table wider than
    ``TABLE_WIDTH`` characters is split into tables that repeat its first column (the UI hides columns past its
    width without a scrollbar). Fenced code blocks are left as they are.
    """
    lines, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            lines.append(line)
        else:
            lines.append(line if fenced else _outside_code(line, folder))
    return "\n".join(_split_wide_tables(lines))


def _outside_code(line: str, folder: Path) -> str:
    pieces, at = [], 0
    for code in _CODE_SPAN.finditer(line):
        pieces += [_render_plain(line[at:code.start()], folder), code.group(0)]
        at = code.end()
    return "".join([*pieces, _render_plain(line[at:], folder)])


def _render_plain(text: str, folder: Path) -> str:
    return _IMAGE.sub(lambda m: _inline_image(m, folder), _TAG.sub(r"&lt;\1&gt;", text))


def _inline_image(match: re.Match, folder: Path) -> str:
    src = match.group("src")
    if re.match(r"[a-z][a-z0-9+.-]*:", src, re.IGNORECASE):     # http(s):, data: -- the browser can fetch it
        return match.group(0)
    path = folder / src
    mime = mimetypes.guess_type(path.name)[0] or ""
    if not mime.startswith("image/") or not path.is_file():
        return f"*({match.group('alt') or 'image'}: `{src}` not found beside the report)*"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"![{match.group('alt')}](data:{mime};base64,{data}{match.group('title') or ''})"


def _split_wide_tables(lines: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(lines):
        if lines[i].lstrip().startswith("|") and i + 1 < len(lines) and _TABLE_SEPARATOR.match(lines[i + 1]):
            end = i + 2
            while end < len(lines) and lines[end].lstrip().startswith("|"):
                end += 1
            out += _fit_table(lines[i:end])
            i = end
        else:
            out.append(lines[i])
            i += 1
    return out


def _fit_table(lines: list[str]) -> list[str]:
    rows = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))] for line in lines]
    n = len(rows[0])
    rows = [row + [""] * (n - len(row)) for row in rows]
    widths = [max(len(row[c]) for j, row in enumerate(rows) if j != 1) + 3 for c in range(n)]
    if sum(widths) <= TABLE_WIDTH or n <= 2:
        return lines
    runs: list[list[int]] = []        # columns whose headers start alike ("accuracy (...)") stay together if they fit
    for c in range(1, n):
        if runs and _header_word(rows[0][c]) == _header_word(rows[0][runs[-1][-1]]):
            runs[-1].append(c)
        else:
            runs.append([c])
    pieces = [piece for run in runs
              for piece in ([run] if widths[0] + sum(widths[c] for c in run) <= TABLE_WIDTH else [[c] for c in run])]
    groups, group = [], []
    for piece in pieces:
        if group and widths[0] + sum(widths[c] for c in group + piece) > TABLE_WIDTH:
            groups.append(group)
            group = []
        group = group + piece
    groups.append(group)
    out = []
    for k, group in enumerate(groups):
        out += [""] if k else []
        out += ["| " + " | ".join(row[c] for c in (0, *group)) + " |" for row in rows]
    return out


def _header_word(header: str) -> str:
    return re.sub(r"\s*\(.*", "", header)


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "stage"
