"""Where training figures go: DVCLive's TSVs (the curves of `dvc plots show`), a JSON-lines progress file (read by
the Prefect flow), and stderr (a tqdm bar and one plain line per log interval). The ``TrainLog`` hook computes the
training figures and hands them to every sink."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

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

    A validation record also carries ``"unigram"``: the unigram level (the best context-free guess at the same
    targets, ``xlm_core.metrics.unigram_score``) of those of its figures ``set_unigram`` was given, under the same
    names (``{"valid/mlm_loss/en": 6.2, ...}``); the flow's validation table sets each figure beside it.
    Appended to, so a file that several runs share holds all their records in order (`xlm flow` names a fresh
    file for each stage run); a reader takes whole lines only, as `pipeline.flow_artifacts.ProgressTail` does.
    """

    def __init__(self, path: Path, total: int):
        self.total = total
        self.start = time.perf_counter()
        self.unigram: dict[str, float] = {}
        self.fh = open(path, "a", encoding="utf-8")

    def set_unigram(self, levels: dict[str, float]) -> None:
        """The unigram level of validation figures, by figure name; they do not change during a run."""
        self.unigram.update({name: float(value) for name, value in levels.items()})

    def log(self, kind: str, step: int, figures: dict[str, float]) -> None:
        record = {"kind": kind, "step": step, "total": self.total,
                  "elapsed_s": round(time.perf_counter() - self.start, 3), "figures": figures}
        if kind == "valid" and (unigram := {k: v for k, v in self.unigram.items() if k in figures}):
            record["unigram"] = unigram
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
        if kind == "valid":
            for line in validation_lines(step, figures):
                _line(line)
            return
        if kind != "train":
            return
        self.bar.set_postfix(loss=f"{figures['train/loss']:.3f}", tok_s=f"{figures['train/tokens_per_s']:.0f}")
        _line(progress_line(step, self.total, figures, time.perf_counter() - self.start, self.start_step))

    def close(self) -> None:
        self.bar.close()


def validation_lines(step: int, figures: dict[str, float]) -> list[str]:
    """One line per validation metric, every language (or pair) on it: ``valid 1200 mlm_accuracy: en 0.412 ...``."""
    by_metric: dict[str, list[str]] = {}
    for name, value in sorted(figures.items()):
        _, metric, key = (name.split("/") + ["", ""])[:3]
        by_metric.setdefault(metric, []).append(f"{key} {value:.4g}")
    return [f"valid step {step} {metric}: {', '.join(cells)}" for metric, cells in by_metric.items()]


def progress_line(step: int, total: int, figures: dict[str, float], elapsed: float, done_at_start: int) -> str:
    steps_done = step - done_at_start
    eta = (total - step) * elapsed / steps_done if steps_done else float("nan")
    mfu = figures.get("train/mfu")   # left out when above 1 (TrainLog): "n/a", never a made-up 0
    return (f"step {step}/{total} loss {figures.get('train/loss', float('nan')):.4f} "
            f"tokens/s {figures.get('train/tokens_per_s', 0):.0f} mfu {'n/a' if mfu is None else f'{mfu:.3f}'} "
            f"eta {eta:.0f}s")


WARNING = "warning: [pretrain] "   # the prefix of every line that says the run looks broken


class ThroughputWatch:
    """Tokens/s falling below half its usual level (the median of the up to 20 intervals before) for two log
    intervals in a row: a competing process, throttling or a stalled loader. One interval is not enough (a
    garbage collection, a page-cache miss); the first three only set the level. Says so once per run."""

    def __init__(self, settle: int = 3, recent: int = 20):
        self.settle, self.history = settle, deque(maxlen=recent)
        self.low, self.warned = 0, False

    def observe(self, step: int, tokens_per_s: float) -> str | None:
        usual = statistics.median(self.history) if len(self.history) >= self.settle else None
        self.history.append(tokens_per_s)
        if usual is None or self.warned:
            return None
        self.low = self.low + 1 if tokens_per_s < usual / 2 else 0
        if self.low < 2:
            return None
        self.warned = True
        return (f"throughput fell by half mid-run: {tokens_per_s:,.0f} tokens/s at step {step} against a usual "
                f"{usual:,.0f} (the median of the intervals before); another process competing for this machine, "
                f"thermal throttling or a stalled data loader (metrics/pretrain.json: loader_stall_fraction)")


class AdversaryWatch:
    """The language discriminator right on ≥ ``threshold`` of the sequences, averaged over its last ``window``
    steps, once λ has reached its constant value (during λ's warm-up a discriminator that wins is expected): the
    encoder is not hiding the language, which is what the adversary is on for. Says so once per run."""

    def __init__(self, window: int = 50, threshold: float = 0.95):
        self.recent: deque[tuple[float, float]] = deque(maxlen=window)
        self.threshold, self.warned = threshold, False

    def observe(self, step: int, logs: Mapping[str, float]) -> str | None:
        if "adv_accuracy" not in logs:   # a step without the adversary (off, or not an MLM step)
            return None
        self.recent.append((logs["adv_accuracy"], logs.get("adv_lambda", 0.0)))
        if self.warned or len(self.recent) < (self.recent.maxlen or 0):
            return None
        lambdas = [lam for _, lam in self.recent]
        if min(lambdas) <= 0 or min(lambdas) < max(lambdas) * (1 - 1e-6):   # λ off, or still warming up
            return None
        accuracy = sum(acc for acc, _ in self.recent) / len(self.recent)
        if accuracy < self.threshold:
            return None
        self.warned = True
        return (f"the language discriminator is right on {accuracy:.1%} of the sequences over the last "
                f"{len(self.recent)} adversarial steps (to step {step}, λ {lambdas[-1]:g}) with the adversary on: "
                f"the encoder is not hiding the language; raise pretrain.adversarial.lambda_max")


def below_unigram(valid: Mapping[str, float], floor: Mapping[str, tuple[float, float]]) -> list[str]:
    """A warning per language whose validation MLM accuracy is at or below the unigram level's, or whose perplexity
    is at or above it (``floor``: language -> (accuracy, perplexity) of the best context-free guess at the same
    targets): the model does no better than piece frequencies."""
    out = []
    for lang, (floor_acc, floor_ppl) in floor.items():
        acc, loss = valid.get(f"mlm_accuracy/{lang}"), valid.get(f"mlm_loss/{lang}")
        if acc is None or loss is None:
            continue
        ppl = math.exp(min(loss, 700.0))
        if acc <= floor_acc or ppl >= floor_ppl:
            out.append(f"validation MLM on {lang} is at or below the unigram level (accuracy {acc:.3f} vs "
                       f"{floor_acc:.3f}, perplexity {ppl:.4g} vs {floor_ppl:.4g}): the model does no better than "
                       f"piece frequencies on {lang}; train longer (pretrain.steps) or check the {lang} data")
    return out


def _line(text: str) -> None:
    """A line of its own on stderr: tqdm.write lifts the progress bar off it (a plain print would append it to the
    bar's text) and draws the bar again below it."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)
    sys.stderr.flush()


class TrainLog:
    """A Trainer hook: every ``every`` steps (and at the last) the training figures, to every sink.

    Tokens/s is over the interval, all ranks together (``world`` × this rank's tokens: the ranks' batches are equal),
    without the time spent in ``paused()`` (validation, checkpoints). MFU and HFU divide the model's and the
    hardware's FLOPs per token by ``peak_flops`` (``runtime.peak_flops``; ``peak_text``: it and where it comes from).
    Neither is ever logged above 1: HFU above 1 means the peak is wrong (the hardware did more than it can), so both
    are left out from then on, with one warning; MFU alone above 1 is left out with one note (its model FLOPs count
    the vocabulary head at every position, which the MLM head computes only at the masked ones). Warnings (one line
    each, ``warning: [pretrain] ...`` on stderr unless ``quiet``) are kept in ``warnings``.
    """

    def __init__(self, sinks: Sequence[Sink], every: int, total: int, world: int, flops, peak_flops: float,
                 row_length: Callable[[int], int], peak_text: str = "", quiet: bool = False,
                 adversary_window: int = 50):
        self.sinks, self.every, self.total, self.world = list(sinks), every, total, world
        self.flops, self.peak, self.row_length = flops, peak_flops, row_length
        self.peak_text, self.quiet = peak_text or f"{peak_flops:.4g} FLOP/s", quiet
        self.tokens = 0   # all ranks, since the run (this process) started
        self.window_tokens, self.window_start = 0, time.perf_counter()
        self.warnings: list[str] = []
        self.peak_unreliable, self.mfu_noted = False, False
        self.throughput, self.adversary = ThroughputWatch(), AdversaryWatch(window=adversary_window)

    def __call__(self, trainer, result) -> None:
        step = trainer.step
        step_tokens = result.tokens * self.world
        self.tokens += step_tokens
        self.window_tokens += step_tokens
        for sink in self.sinks:
            sink.advance(step)
        self._check(self.adversary.observe(step, result.logs))
        if not (step % self.every == 0 or step == self.total):
            return
        tps = self.window_tokens / max(time.perf_counter() - self.window_start, 1e-9)
        figures = {"train/loss": result.loss, "train/lr": result.lr, "train/grad_norm": result.grad_norm,
                   "train/tokens_per_s": tps, **self.utilisation(step, tps),
                   "train/skipped_steps": float(trainer.skipped_total),
                   "train/row_length": float(self.row_length(step - 1))}
        # "adv_accuracy" and "adv_accuracy/en" cannot both be DVCLive names (a value and a folder)
        figures.update({f"train/{k.replace('/', '_')}": v for k, v in result.logs.items() if k != "loss"})
        self.log("train", step, figures)
        self._check(self.throughput.observe(step, tps))
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def utilisation(self, step: int, tokens_per_s: float) -> dict[str, float]:
        """``train/mfu`` and ``train/hfu`` at ``tokens_per_s``, each only where it is at most 1 (see the class)."""
        if not self.peak or self.peak_unreliable:
            return {}
        mfu, hfu = tokens_per_s * self.flops.model / self.peak, tokens_per_s * self.flops.hardware / self.peak
        if hfu > 1:
            self.peak_unreliable = True
            self.warn(f"HFU is {hfu:.2f} at step {step}, above 1: the peak it is measured against, {self.peak_text}, "
                      f"is unreliable; train/mfu and train/hfu are left out from here on (set XLM_PEAK_FLOPS to the "
                      f"hardware's peak, or delete a cached measurement to take it again)")
            return {}
        if mfu > 1:
            if not self.mfu_noted and not self.quiet:
                _line(f"pretrain: MFU is {mfu:.2f} at step {step} (HFU {hfu:.2f}): its model FLOPs count the "
                      f"vocabulary head at every position, the MLM head runs only at the masked ones; train/mfu is "
                      f"left out where above 1")
            self.mfu_noted = True
            return {"train/hfu": hfu}
        return {"train/mfu": mfu, "train/hfu": hfu}

    def warn(self, message: str) -> None:
        """One line on stderr (the main process's), and into ``warnings``."""
        self.warnings.append(message)
        if not self.quiet:
            _line(WARNING + message)

    def _check(self, message: str | None) -> None:
        if message:
            self.warn(message)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time in this block is not training time: tokens/s (and its drop warning) leave it out."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.window_start += time.perf_counter() - start

    def log(self, kind: str, step: int, figures: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(kind, step, figures)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
