"""Where training runs: the device for this process, the autocast dtype, and the peak FLOP/s that MFU/HFU divide by."""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from xlm_core.atomic import write_json
from xlm_core.errors import XLMError


class RuntimeSettingsError(XLMError):
    """The requested device or process count does not fit this machine."""


def device_type(choice: str, nproc: int, section: str = "pretrain") -> str:
    """"cuda" or "cpu" for ``<section>.device``, once ``nproc`` processes are known to fit this machine."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeSettingsError(f"params.yaml: {section}.device = 'cuda' but no CUDA GPU is visible; use auto "
                                       f"or cpu")
        if nproc > torch.cuda.device_count():
            raise RuntimeSettingsError(f"params.yaml: {section}.nproc = {nproc} but only {torch.cuda.device_count()} "
                                       f"GPU(s) are visible; lower nproc")
        return "cuda"
    cores = os.cpu_count() or 1
    if nproc > cores:
        raise RuntimeSettingsError(f"params.yaml: {section}.nproc = {nproc} exceeds the {cores} CPU cores of this "
                                   f"machine; lower nproc (each process needs at least one core)")
    return "cpu"


def pick_device(choice: str, local_rank: int, nproc: int) -> torch.device:
    """This process's device; on CUDA also TF32 matmuls (fp32 parameters keep their precision in the optimizer)."""
    if device_type(choice, nproc) == "cuda":
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def pick_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if choice == "bf16" or (choice == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def measure_peak_flops(device: torch.device, dtype: torch.dtype | None = None, n: int | None = None,
                       repeats: int = 10) -> float:
    """The best FLOP/s of an n × n × n ``torch.mm`` over ``repeats`` runs, in wall-clock time: the benchmarks' peak
    (on a quiet machine), and ``peak_flops``'s for a GPU without a datasheet figure. Training logs use
    ``peak_flops``: wall-clock time on a busy CPU swings with the load. Defaults: bf16 and n 4096 on CUDA, fp32 and
    n 1024 on CPU."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = n or (4096 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: kernel selection, allocation
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Dense (no sparsity) tensor-core peaks of NVIDIA's datasheets, TFLOP/s: (name fragment, bf16, tf32). fp32 training on
# CUDA runs its matmuls in TF32 (pick_device allows it), so TF32 is its peak. The first fragment found in the device's
# name wins, hence "H100 PCIe" before "H100" and "L40S", "L40" before "L4". A GPU not listed (or a MIG slice of one)
# is measured instead.
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0, 378.0), ("H100 NVL", 835.0, 417.5), ("H100", 989.0, 494.7),
                   ("H200 NVL", 835.0, 417.5), ("H200", 989.0, 494.7), ("A100", 312.0, 156.0),
                   ("L40S", 362.0, 183.0), ("L40", 181.0, 90.5), ("L4", 121.0, 60.0))
PEAK_ENV = "XLM_PEAK_FLOPS"     # a figure the user knows better (FLOP/s of the whole device, as this process uses it)
CACHE_ENV = "XLM_CACHE_DIR"     # default: $XDG_CACHE_HOME/xlm-pipeline, else ~/.cache/xlm-pipeline
CACHE_FILE = "peak_flops.json"


@dataclass(frozen=True)
class Peak:
    """The FLOP/s this process can reach at most, the yardstick of MFU/HFU, and where the figure comes from."""

    flops: float
    source: str

    def describe(self) -> str:
        return f"{flops_text(self.flops)} ({self.source})"


def flops_text(flops: float) -> str:
    """``306.8 GFLOP/s``, ``989 TFLOP/s``, ``1 MFLOP/s``: four significant digits in the unit that fits."""
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if flops >= scale:
            return f"{flops / scale:.4g} {unit}FLOP/s"
    return f"{flops:.4g} FLOP/s"


def peak_flops(device: torch.device, dtype: torch.dtype | None = None, cache_dir: Path | None = None) -> Peak:
    """The peak for training in ``dtype`` (the autocast dtype; None = fp32) on ``device`` with this process's threads.

    Why not one quick matmul at stage start, as before: its wall-clock time swings with whatever else runs on the
    machine, and a peak measured in a busy moment made short runs report HFU 1.8. Instead, in order: ``XLM_PEAK_FLOPS``;
    on CUDA the datasheet figure of a known GPU; otherwise a measurement made once per machine and cached. On CPU the
    measurement times one thread's matmuls in process CPU time, which a competing process cannot stretch (it only
    delays the wall clock), and multiplies by ``torch.get_num_threads()``: the hardware's share this run asked for.
    """
    override = os.environ.get(PEAK_ENV)
    if override is not None:
        try:
            value = float(override)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise RuntimeSettingsError(f"{PEAK_ENV}={override!r}: must be a positive number of FLOP/s, e.g. 1.2e11")
        return Peak(value, f"set by {PEAK_ENV}")
    kind = "bf16" if dtype == torch.bfloat16 else "fp32"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        figure = datasheet_peak(name, dtype)
        if figure is not None:
            return Peak(figure, f"datasheet of {name}, dense {'bf16' if kind == 'bf16' else 'tf32'}")
        flops, how = cached_measurement(f"cuda | {name} | torch {torch.__version__} | {kind}",
                                        lambda: measure_peak_flops(device, dtype or torch.float32, repeats=50),
                                        cache_dir)
        return Peak(flops, f"{name}, best of 50 {kind} matmuls, {how}")
    per_thread, how = cached_measurement(
        f"cpu | {cpu_model()} | {os.cpu_count()} cpus | torch {torch.__version__} | {kind} | per thread",
        lambda: measure_thread_peak(dtype or torch.float32), cache_dir)
    threads = torch.get_num_threads()
    return Peak(per_thread * threads, f"{threads} thread(s) × {flops_text(per_thread)}, the best {kind} "
                                      f"matmul of one thread timed in CPU time, {how}")


def datasheet_peak(device_name: str, dtype: torch.dtype | None) -> float | None:
    """FLOP/s of a known GPU for ``dtype`` (bf16, else TF32); None for an unknown one or a MIG slice (a fraction)."""
    if "MIG" in device_name:
        return None
    for fragment, bf16, tf32 in GPU_PEAK_TFLOPS:
        if fragment in device_name:
            return (bf16 if dtype == torch.bfloat16 else tf32) * 1e12
    return None


def measure_thread_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 1.0,
                        min_repeats: int = 5) -> float:
    """The best FLOP/s of one thread's n × n × n ``torch.mm``, each timed in process CPU time, over ``seconds``.

    CPU time counts only the time this process ran: time spent descheduled under load does not lower the figure.
    The intra-op threads are set to 1 meanwhile (one thread's work is what CPU time measures exactly) and restored.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)   # warm-up: allocation, kernel selection
        best, repeats, start = float("inf"), 0, time.perf_counter()
        while repeats < min_repeats or time.perf_counter() - start < seconds:
            cpu = time.process_time()
            torch.mm(a, b)
            spent = time.process_time() - cpu
            if spent > 0:   # a clock tick coarser than the matmul says nothing
                best = min(best, spent)
            repeats += 1
    finally:
        torch.set_num_threads(threads)
    if not math.isfinite(best):
        raise RuntimeError("measure_thread_peak: the process CPU clock did not advance; use a larger n")
    return 2 * n ** 3 / best


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), part of the cache key: another machine measures anew."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def peak_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xlm-pipeline"


def cached_measurement(key: str, measure: Callable[[], float], cache_dir: Path | None = None) -> tuple[float, str]:
    """``measure()`` once per key: the value and how it was obtained ("cached in ...", "measured now, cached in ...").

    An unreadable cache counts as empty and an unwritable one only costs the next run a new measurement: neither is
    worth failing a training run for. Delete the file (or its key) to measure again.
    """
    path = (cache_dir or peak_cache_dir()) / CACHE_FILE
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        entries = {}
    entry = entries.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and math.isfinite(entry["flops"]) \
            and entry["flops"] > 0:
        return float(entry["flops"]), f"cached in {path}"
    value = measure()
    entries[key] = {"flops": value, "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        write_json(path, entries)
    except OSError as exc:
        return value, f"measured now, not cached ({exc.strerror or exc})"
    return value, f"measured now, cached in {path}"
