"""A DVC stage's raw output (``dvc repro`` of one stage, stderr joined to stdout) as log lines for ``xlm flow``."""
from __future__ import annotations

import logging
import re
import shlex
import time
from dataclasses import dataclass, field
from typing import Callable

TQDM_LOG_EVERY_S = 10.0            # a tqdm bar redrawn with \r becomes at most one log line per this many seconds

# Terminal control: CSI (tqdm's cursor-up \x1b[A, colours), OSC, two-byte escapes; other C0 controls but the tab.
_ESCAPES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])|[\x00-\x08\x0b-\x1f\x7f]")
# A tqdm bar: "clean:  40%|####  | 4/10 [...]" or, without a total, "clean: 7it [...]"
_BAR = re.compile(r"\d+%\||\d+(?:\.\d+)?[kMGTPEZY]?\w* \[\d+:\d\d")
_BAR_DONE = re.compile(r"100%\||(?<![\d.])(\d+(?:\.\d+)?[kMGTPEZY]?)/\1(?![\d.])")
# A whole bar up to its closing bracket, to split off a line the stage printed right after an unfinished bar
_WHOLE_BAR = re.compile(r".*?(?:\d+%\|[^|]*\|[^\[\]]*|\d+(?:\.\d+)?[kMGTPEZY]?\w* )\[\d+:\d\d[^\]]*\]")
# DVC's reminders after a stage ran (the flow says it once, at the end, instead)
_DVC_HINTS = ("To track the changes with git, run:", "To enable auto staging, run:", "Use `dvc push` to send your")


@dataclass
class StageOutputSummary:
    stage_error: str | None = None   # our stages: "error: [stage] what, where, how to fix"
    dvc_error: str | None = None     # DVC: "ERROR: failed to reproduce 'x': ..."
    last_line: str | None = None
    dvc_skipped: bool = False        # DVC found nothing to do after all
    restored: bool = False           # DVC restored the outputs from its run cache instead of running the command
    git_add: list[str] = field(default_factory=list)   # the files DVC's left-out reminder asks to `git add`


class StageOutput:
    """Splits a stage's raw output into log lines as it arrives.

    Lines ending in \\n (or \\r\\n) are logged as they come. tqdm redraws its bar with \\r many times a second:
    those redraws (and an unfinished bar ending in \\n, as nested bars draw) are logged at most once every
    ``every_s`` seconds; the bar's final state always is, and so is the last redraw of a bar the stage never
    finished. Terminal escapes (tqdm's cursor-up \\x1b[A) are dropped; a line printed right after an unfinished bar
    is logged apart from it; DVC's `git add` / `dvc push` reminders are left out (their files: ``summary.git_add``).
    """

    def __init__(self, emit: Callable[[str], None], every_s: float = TQDM_LOG_EVERY_S):
        self.emit, self.every_s = emit, every_s
        self.summary = StageOutputSummary()
        self._buffer = b""
        self._last_redraw_logged = float("-inf")
        self._unlogged_redraw: str | None = None   # the newest redraw the throttle dropped
        self._in_dvc_hint = False

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
        line = _ESCAPES.sub("", line).rstrip()
        if not line.strip():
            return
        if (bar := _WHOLE_BAR.match(line)) and line[bar.end():].strip():   # "shard: 20%|...]error: [shard] ..."
            self._unlogged_redraw = None
            self._log(bar.group(0))                # where the bar was when the line came
            line = line[bar.end():]
        if not redraw and self._dvc_hint(line.strip()):
            return
        redraw = redraw or bool(_BAR.search(line) and not _BAR_DONE.search(line))
        if redraw:
            now = time.monotonic()
            if now - self._last_redraw_logged < self.every_s:
                self._unlogged_redraw = line
                return
            self._last_redraw_logged = now
        self._unlogged_redraw = None
        self._log(line)

    def _dvc_hint(self, text: str) -> bool:
        """True for the lines of DVC's reminders (blank lines between them are dropped before)."""
        if text.startswith(_DVC_HINTS):
            self._in_dvc_hint = True
        elif self._in_dvc_hint and text.startswith("git add "):
            self.summary.git_add += [f for f in shlex.split(text[8:]) if f not in self.summary.git_add]
        elif not (self._in_dvc_hint and text == "dvc config core.autostage true"):
            self._in_dvc_hint = False
            return False
        return True

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
