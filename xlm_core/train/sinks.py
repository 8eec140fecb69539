"""Where training figures go: DVCLive's TSVs (the curves of `dvc plots show`), a JSON-lines progress file (read by
the Prefect flow), and stderr (a tqdm bar and one plain line per log interval). The ``TrainLog`` hook computes the
training figures and hands them to every sink."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from xlm_core.atomic import atomic_file

PROGRESS_FILE_ENV = "XLM_PROGRESS_FILE"


class Sink:
    """``log(kind, step, figures)`` with kind "train" or "valid"; ``advance(step)`` after every optimizer step."""

    def advance(self, step: int) -> None:
        pass

    def log(self, kind: str, step: int, figures: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class DVCLiveSink(Sink):
    """DVCLive as a writer of the step/value TSVs only: dvc.yaml declares the plots and no experiment is saved.

    A fresh run starts with an empty folder; a resumed one first drops the rows logged after its checkpoint.
    """

    def __init__(self, live_dir: Path, resume_step: int | None):
        if resume_step is None:
            shutil.rmtree(live_dir, ignore_errors=True)
        else:
            truncate_live(live_dir, resume_step)
        self.live = _plots_only_live(live_dir, resume=resume_step is not None)

    def log(self, kind: str, step: int, figures: dict[str, float]) -> None:
        self.live.step = step
        for name, value in sorted(figures.items()):
            self.live.log_metric(name, value, plot=True)
        self.live.make_summary()

    def close(self) -> None:
        self.live.end()


def _plots_only_live(live_dir: Path, resume: bool):
    """``Live(save_dvc_exp=False, dvcyaml=None, report=None)`` with its DVC/git integration skipped.

    The integration adds nothing here, and dvclive 3.49 crashes in it (scmrepo SCMError "Empty git repo", its
    issue #522) when the project's git repository has no commit yet, as right after `git init && dvc init`: its
    ``__init__`` calls ``scm.get_rev()`` before any check, and no public argument skips that, hence the override.
    """
    from dvclive import Live

    class PlotsOnlyLive(Live):
        def _init_dvc(self) -> None:
            self._dvc_file = None

    return PlotsOnlyLive(dir=str(live_dir), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)


def truncate_live(live_dir: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from, so the curves have no duplicated steps.

    A row without its line end was being appended when the run was killed: its last value may be cut short, so it
    goes too. Each file is rewritten atomically (a kill now leaves the old file or the new one).
    """
    for tsv in Path(live_dir).rglob("*.tsv"):
        text = tsv.read_text()
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            lines = lines[:-1]
        if not lines:  # not even a whole header: dvclive writes the file anew with the next row
            tsv.unlink()
            continue
        header, rows = lines[0], lines[1:]
        cols = header.split("\t")
        if "step" not in cols:
            continue
        idx = cols.index("step")
        kept = [r for r in rows if len(r.split("\t")) == len(cols) and r.split("\t")[idx].isdigit()
                and int(r.split("\t")[idx]) <= step]
        with atomic_file(tsv, "w", encoding="utf-8") as fh:
            fh.write("\n".join([header, *kept]) + "\n")


class ProgressFileSink(Sink):
    """One JSON object per line, flushed per line: ``{"kind", "step", "total", "elapsed_s", "figures"}``.

    Appended to, so a file that several runs share holds all their records in order (`xlm flow` names a fresh
    file for each stage run); a reader takes whole lines only, as `pipeline.flow_artifacts.ProgressTail` does.
    """

    def __init__(self, path: Path, total: int):
        self.total = total
        self.start = time.perf_counter()
        self.fh = open(path, "a", encoding="utf-8")

    def log(self, kind: str, step: int, figures: dict[str, float]) -> None:
        record = {"kind": kind, "step": step, "total": self.total,
                  "elapsed_s": round(time.perf_counter() - self.start, 3), "figures": figures}
        self.fh.write(json.dumps(record, sort_keys=True) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def progress_file_sink(total: int) -> list[Sink]:
    """The progress-file sink when ``XLM_PROGRESS_FILE`` names a file, else none."""
    path = os.environ.get(PROGRESS_FILE_ENV)
    return [ProgressFileSink(Path(path), total)] if path else []


class StderrProgress(Sink):
    """A tqdm bar, and per log interval the plain line Prefect's task log shows (``step 10/3600 loss ...``)."""

    def __init__(self, total: int, start_step: int):
        from tqdm import tqdm

        self.total, self.start_step = total, start_step
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, initial=start_step, desc="pretrain", unit="step", file=sys.stderr,
                        dynamic_ncols=True, mininterval=1.0)

    def advance(self, step: int) -> None:
        self.bar.update(1)

    def log(self, kind: str, step: int, figures: dict[str, float]) -> None:
        if kind != "train":
            return
        self.bar.set_postfix(loss=f"{figures['train/loss']:.3f}", tok_s=f"{figures['train/tokens_per_s']:.0f}")
        print(progress_line(step, self.total, figures, time.perf_counter() - self.start, self.start_step),
              file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def progress_line(step: int, total: int, figures: dict[str, float], elapsed: float, done_at_start: int) -> str:
    steps_done = step - done_at_start
    eta = (total - step) * elapsed / steps_done if steps_done else float("nan")
    return (f"step {step}/{total} loss {figures.get('train/loss', float('nan')):.4f} "
            f"tokens/s {figures.get('train/tokens_per_s', 0):.0f} mfu {figures.get('train/mfu', 0):.3f} "
            f"eta {eta:.0f}s")


class TrainLog:
    """A Trainer hook: every ``every`` steps (and at the last) the training figures, to every sink.

    Tokens/s is over the interval, all ranks together (``world`` × this rank's tokens: the ranks' batches are equal);
    MFU and HFU divide the model's and the hardware's FLOPs per token by the measured ``peak_flops``.
    """

    def __init__(self, sinks: Sequence[Sink], every: int, total: int, world: int, flops, peak_flops: float,
                 row_length: Callable[[int], int]):
        self.sinks, self.every, self.total, self.world = list(sinks), every, total, world
        self.flops, self.peak, self.row_length = flops, peak_flops, row_length
        self.tokens = 0   # all ranks, since the run (this process) started
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def __call__(self, trainer, result) -> None:
        step = trainer.step
        step_tokens = result.tokens * self.world
        self.tokens += step_tokens
        self.window_tokens += step_tokens
        for sink in self.sinks:
            sink.advance(step)
        if not (step % self.every == 0 or step == self.total):
            return
        tps = self.window_tokens / max(time.perf_counter() - self.window_start, 1e-9)
        figures = {"train/loss": result.loss, "train/lr": result.lr, "train/grad_norm": result.grad_norm,
                   "train/tokens_per_s": tps, "train/mfu": tps * self.flops.model / self.peak if self.peak else 0.0,
                   "train/hfu": tps * self.flops.hardware / self.peak if self.peak else 0.0,
                   "train/skipped_steps": float(trainer.skipped_total),
                   "train/row_length": float(self.row_length(step - 1))}
        # "adv_accuracy" and "adv_accuracy/en" cannot both be DVCLive names (a value and a folder)
        figures.update({f"train/{k.replace('/', '_')}": v for k, v in result.logs.items() if k != "loss"})
        self.log("train", step, figures)
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def log(self, kind: str, step: int, figures: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(kind, step, figures)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
