"""Where training runs: the device for this process, the autocast dtype, and the machine's measured matmul peak."""
from __future__ import annotations

import os
import time

import torch

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
    """The best FLOP/s of an n × n × n ``torch.mm`` over ``repeats`` runs: this machine's own peak, against which
    the logs and the benchmarks compute MFU. Defaults: bf16 and n 4096 on CUDA, fp32 and n 1024 on CPU."""
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
