"""Honest utilisation (issue 17): the peak MFU/HFU divide by (datasheet, or measured once per machine in CPU time and
cached), figures above 1 left out with one line saying why, and the run warnings TrainLog raises (throughput halving,
a discriminator that wins) or pretrain raises at the end (validation at the unigram level), each triggered and not."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from xlm_core.train import runtime
from xlm_core.train.sinks import WARNING, AdversaryWatch, Sink, ThroughputWatch, TrainLog, below_unigram

FLOPS = SimpleNamespace(model=6.0, hardware=8.0)


class Recorded(Sink):
    """A sink that keeps what it is given."""

    def __init__(self):
        self.records: list[tuple[str, int, dict]] = []

    def log(self, kind: str, step: int, figures: dict[str, float]) -> None:
        self.records.append((kind, step, dict(figures)))


def _train_log(peak: float, flops=FLOPS, every: int = 2, total: int = 100, **kwargs):
    sink = Recorded()
    return TrainLog([sink], every=every, total=total, world=1, flops=flops, peak_flops=peak,
                    row_length=lambda step: 16, **kwargs), sink


def _step(log: TrainLog, step: int, tokens: int = 100, **logs) -> None:
    result = SimpleNamespace(loss=1.0, lr=0.1, grad_norm=1.0, tokens=tokens, logs=logs)
    log(SimpleNamespace(step=step, skipped_total=0), result)


@pytest.fixture
def threads():
    """Restore torch's intra-op threads after a test that changes them."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --- the peak ------------------------------------------------------------------------------------------------------

def test_known_gpus_use_the_datasheet_and_others_are_measured():
    assert runtime.datasheet_peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert runtime.datasheet_peak("NVIDIA H100 80GB HBM3", None) == pytest.approx(494.7e12)   # fp32 runs in TF32
    assert runtime.datasheet_peak("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert runtime.datasheet_peak("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert runtime.datasheet_peak("NVIDIA L40S", torch.bfloat16) == 362e12       # not the L40's, not the L4's
    assert runtime.datasheet_peak("NVIDIA L40", torch.bfloat16) == 181e12
    assert runtime.datasheet_peak("NVIDIA L4", torch.bfloat16) == 121e12
    assert runtime.datasheet_peak("NVIDIA H100 80GB HBM3 MIG 1g.10gb", torch.bfloat16) is None   # a slice
    assert runtime.datasheet_peak("Tesla T4", torch.bfloat16) is None


def test_the_cpu_peak_is_measured_once_per_machine_and_scales_with_threads(tmp_path, threads, monkeypatch):
    monkeypatch.delenv(runtime.PEAK_ENV, raising=False)
    torch.set_num_threads(1)
    first = runtime.peak_flops(torch.device("cpu"), None, tmp_path)
    assert "measured now, cached in" in first.source and first.flops > 1e8
    [(key, entry)] = json.loads((tmp_path / runtime.CACHE_FILE).read_text()).items()
    for part in (runtime.cpu_model(), f"{os.cpu_count()} cpus", torch.__version__, "fp32"):
        assert part in key
    assert entry["flops"] == first.flops
    start = time.perf_counter()
    again = runtime.peak_flops(torch.device("cpu"), None, tmp_path)
    assert time.perf_counter() - start < 0.5 and "cached in" in again.source and again.flops == first.flops
    torch.set_num_threads(2)
    assert runtime.peak_flops(torch.device("cpu"), None, tmp_path).flops == 2 * first.flops
    bf16 = runtime.peak_flops(torch.device("cpu"), torch.bfloat16, tmp_path)   # another dtype: its own entry
    assert "measured now" in bf16.source and len(json.loads((tmp_path / runtime.CACHE_FILE).read_text())) == 2


def test_a_damaged_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.delenv(runtime.PEAK_ENV, raising=False)
    (tmp_path / runtime.CACHE_FILE).write_text("{not json")
    assert "measured now" in runtime.peak_flops(torch.device("cpu"), None, tmp_path).source


def test_the_peak_can_be_given(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.PEAK_ENV, "2.5e11")
    assert runtime.peak_flops(torch.device("cpu"), None, tmp_path).flops == 2.5e11
    assert not (tmp_path / runtime.CACHE_FILE).exists()
    for bad in ("fast", "0", "-1", "nan"):
        monkeypatch.setenv(runtime.PEAK_ENV, bad)
        with pytest.raises(runtime.RuntimeSettingsError, match=runtime.PEAK_ENV):
            runtime.peak_flops(torch.device("cpu"), None, tmp_path)


def test_a_competing_process_does_not_lower_the_measured_peak(threads):
    """CPU time leaves out the time a busy loop takes from us; the old wall-clock figure did not."""
    quiet = runtime.measure_thread_peak(seconds=0.5)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        loaded = runtime.measure_thread_peak(seconds=0.5)
    finally:
        hog.kill()
        hog.wait()
    assert loaded > 0.6 * quiet


# --- MFU/HFU never above 1 -----------------------------------------------------------------------------------------

def test_hfu_above_1_leaves_both_out_from_then_on_with_one_warning(capsys):
    log, sink = _train_log(peak=1.0)   # 1 FLOP/s: every real throughput is "above the peak"
    for step in range(1, 9):
        _step(log, step)
    train = [figures for kind, _, figures in sink.records if kind == "train"]
    assert len(train) == 4 and not any("train/mfu" in f or "train/hfu" in f for f in train)
    assert all(f["train/tokens_per_s"] > 0 for f in train)
    assert len(log.warnings) == 1 and "unreliable" in log.warnings[0] and "left out" in log.warnings[0]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(WARNING)]
    assert lines == [WARNING + log.warnings[0]]


def test_utilisation_within_1_is_logged_and_mfu_alone_above_1_is_left_out(capsys):
    log, sink = _train_log(peak=1e15)
    for step in range(1, 5):
        _step(log, step)
    train = [figures for kind, _, figures in sink.records if kind == "train"]
    assert all(0 < f["train/mfu"] <= 1 and 0 < f["train/hfu"] <= 1 for f in train) and not log.warnings
    # model FLOPs 10x the hardware's (the vocabulary head counted at every position): MFU 2, HFU 0.2
    log, _ = _train_log(peak=5000.0, flops=SimpleNamespace(model=10.0, hardware=1.0))
    assert log.utilisation(4, 1000.0) == {"train/hfu": 0.2}
    assert log.utilisation(6, 1000.0) == {"train/hfu": 0.2}
    assert log.utilisation(8, 100.0) == {"train/mfu": 0.2, "train/hfu": 0.02}
    err = capsys.readouterr().err
    assert err.count("MFU is 2.00") == 1 and "left out" in err and WARNING not in err and not log.warnings


def test_no_peak_no_utilisation():
    log, _ = _train_log(peak=0.0)
    assert log.utilisation(2, 1000.0) == {}


# --- throughput falling by half --------------------------------------------------------------------------------------

def test_throughput_halving_for_two_intervals_warns_once():
    watch = ThroughputWatch()
    said = [watch.observe(step, tps) for step, tps in enumerate([100, 110, 90, 105, 40, 45, 30, 20], start=1)]
    assert said[:5] == [None] * 5 and "fell by half" in said[5] and said[6:] == [None, None]


@pytest.mark.parametrize("series", [
    [100, 100, 100, 40, 100, 40, 100, 45],   # single dips
    [100, 100, 100, 60, 60, 55, 60, 60],     # slower, not half
    [30, 100, 100, 100, 100],                # a slow first interval (start-up) is no drop
    [100, 40, 40],                            # too early to know the usual level
])
def test_throughput_without_a_lasting_halving_says_nothing(series):
    watch = ThroughputWatch()
    assert [watch.observe(step, tps) for step, tps in enumerate(series, start=1)] == [None] * len(series)


def test_trainlog_sees_a_real_slowdown_but_not_paused_time(capsys):
    log, _ = _train_log(peak=0.0, every=2)
    for step in range(1, 21):
        time.sleep(0.005 if step <= 10 else 0.05)   # 10x slower from step 11
        _step(log, step)
    assert len(log.warnings) == 1 and "fell by half" in log.warnings[0]
    assert capsys.readouterr().err.count(WARNING + "throughput fell by half") == 1

    log, _ = _train_log(peak=0.0, every=2)
    for step in range(1, 21):
        time.sleep(0.005)
        _step(log, step)
        if step % 4 == 0:
            with log.paused():   # what pretrain does around validation and checkpoints
                time.sleep(0.1)
    assert log.warnings == []


# --- the adversary winning -----------------------------------------------------------------------------------------

def test_a_discriminator_that_wins_after_the_warm_up_warns_once():
    log, _ = _train_log(peak=0.0, adversary_window=10)
    for step in range(1, 31):
        _step(log, step, adv_accuracy=1.0 if step % 2 else 0.95, adv_lambda=0.1)
    assert len(log.warnings) == 1 and "discriminator is right on 97.5%" in log.warnings[0]


@pytest.mark.parametrize("logs", [
    lambda step: {"adv_accuracy": 0.6, "adv_lambda": 0.1},            # the adversary does its job
    lambda step: {"adv_accuracy": 1.0, "adv_lambda": 0.1 * step / 30},  # still in λ's warm-up
    lambda step: {"adv_accuracy": 1.0, "adv_lambda": 0.0},            # λ 0: the encoder is not asked to hide it
    lambda step: {"mlm_loss": 3.0},                                   # no adversary
])
def test_a_discriminator_that_does_not_win_or_is_not_yet_opposed_says_nothing(logs):
    log, _ = _train_log(peak=0.0, adversary_window=10)
    for step in range(1, 31):
        _step(log, step, **logs(step))
    assert log.warnings == []


def test_the_adversary_watch_needs_a_full_window():
    watch = AdversaryWatch(window=5)
    assert [watch.observe(s, {"adv_accuracy": 1.0, "adv_lambda": 0.1}) for s in range(4)] == [None] * 4
    assert "right on 100.0%" in watch.observe(5, {"adv_accuracy": 1.0, "adv_lambda": 0.1})


# --- validation at the unigram level ---------------------------------------------------------------------------------

def test_validation_at_or_below_the_unigram_level_warns_per_language():
    floor = {"en": (0.10, 80.0), "fr": (0.12, 90.0), "ru": (0.08, 120.0)}
    valid = {"mlm_accuracy/en": 0.10, "mlm_loss/en": 3.0,     # accuracy equal to the unigram's
             "mlm_accuracy/fr": 0.30, "mlm_loss/fr": 4.6,     # perplexity 99.5 above the unigram's 90
             "mlm_accuracy/ru": 0.25, "mlm_loss/ru": 3.5}     # clears both: 0.25 > 0.08, 33 < 120
    warnings = below_unigram(valid, floor)
    assert len(warnings) == 2 and "MLM on en" in warnings[0] and "MLM on fr" in warnings[1]
    assert below_unigram({k: v for k, v in valid.items() if k.endswith("ru")}, floor) == []
    assert below_unigram({}, floor) == []   # no validation figure: nothing to judge
