"""The Trainer: optimizer steps over micro-batches with the guards long runs need, and the ``fit`` loop.

Parallelism (DDP/FSDP2) and compilation are applied to the model from outside; the trainer only asks the wrapped
module not to sync gradients between accumulation micro-steps (``parallelize.gradient_sync``). The pieces with state
(model and optimizer, scheduler and counters, loader) are ``Stateful``: the checkpoint manager gathers and restores
them.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from xlm_core.errors import XLMError
from xlm_core.settings import seq_len_doublings
from xlm_core.train.parallelize import gradient_sync


class TrainingDiverged(XLMError, RuntimeError):
    """Too many non-finite losses in a row: continuing would only waste compute."""


def lr_multiplier(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Linear warm-up, then the chosen decay; the returned function maps a step (0-based) to a factor of the peak lr.

    ``inverse_sqrt`` is XLM's: after warm-up the factor is sqrt(warmup / step).
    """
    warmup_steps = max(0, warmup_steps)

    def factor(step: int) -> float:
        s = step + 1
        if warmup_steps and s <= warmup_steps:
            return s / warmup_steps
        if schedule == "constant":
            return 1.0
        if schedule == "inverse_sqrt":
            return math.sqrt(max(1, warmup_steps) / s)
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            decay = 1.0 - progress
        elif schedule == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            raise ValueError(f"unknown schedule {schedule!r}")
        return min_ratio + (1.0 - min_ratio) * decay

    return factor


def seq_len_schedule(seq_len: int, start: int, warmup_steps: int) -> Callable[[int], int]:
    """Sequence-length warm-up (Li et al., 2022): a step (0-based) -> the row length it trains on.

    The length doubles from `start` in equal stretches of the warm-up and is `seq_len` from step `warmup_steps` on
    (seq_len / start must be a power of two). Early MLM on short rows is what lets a small model leave the
    unigram plateau: with uniform attention over 128 positions a neighbour's signal is diluted 128-fold, over 16
    only 16-fold, so attention learns to look at neighbours in a few hundred steps instead of thousands.
    """
    if warmup_steps <= 0 or start >= seq_len:
        return lambda step: seq_len
    doublings = seq_len_doublings(seq_len, start)

    def length(step: int) -> int:
        if step >= warmup_steps:
            return seq_len
        return start << (step * doublings // warmup_steps)

    return length


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool
    lr: float
    tokens: int = 0   # tokens of this rank's micro-batches
    logs: dict[str, float] = field(default_factory=dict)


# A hook runs after every optimizer step: ``hook(trainer, result)``; it decides itself whether to act at this step.
Hook = Callable[["Trainer", StepResult], None]


class Trainer:
    """Owns the optimizer, the scheduler and the loader around a (possibly wrapped) model.

    ``loss_fn(model, micro_batch) -> (loss, logs)`` computes one micro-batch's loss; the trainer scales it by the
    number of micro-batches so gradients equal those of the whole batch at once. ``state_dict`` holds the scheduler
    and the counters; the optimizer's state is the checkpoint manager's (unsharded with the model's under FSDP).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler,
                 loss_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]],
                 clip_norm: float = 1.0, autocast_dtype: torch.dtype | None = None, max_bad_steps: int = 5,
                 loader: Iterator[Sequence[Any]] | None = None, device: torch.device | None = None):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn
        self.clip_norm = clip_norm
        self.autocast_dtype = autocast_dtype
        self.max_bad_steps = max_bad_steps
        self.loader = loader          # yields one optimizer step's micro-batches at a time
        self.device = device or torch.device("cpu")
        self.step = 0                 # optimizer steps taken (skipped ones included: the data moved on)
        self.bad_in_a_row = 0
        self.skipped_total = 0
        self.data_wait_s = 0.0        # time fit spent waiting for the loader (its stall)

    def _autocast(self, device_type: str):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def fit(self, steps: int, hooks: Sequence[Hook] = ()) -> None:
        """Train until ``steps`` optimizer steps are done (counting those before a resume), hooks after each."""
        while self.step < steps:
            wait_start = time.perf_counter()
            micro = [mb.to(self.device) for mb in next(self.loader)]
            self.data_wait_s += time.perf_counter() - wait_start
            result = self.train_step(micro, device_type=self.device.type)
            for hook in hooks:
                hook(self, result)

    def train_step(self, micro_batches: Sequence[Any], device_type: str = "cpu") -> StepResult:
        self.model.train()
        n = len(micro_batches)
        total = torch.zeros((), device=next(self.model.parameters()).device)
        logs: dict[str, float] = {}
        for i, mb in enumerate(micro_batches):
            with gradient_sync(self.model, enabled=i == n - 1):
                with self._autocast(device_type):
                    loss, mb_logs = self.loss_fn(self.model, mb)
                (loss / n).backward()
            total += loss.detach() / n
            for k, v in mb_logs.items():
                logs[k] = logs.get(k, 0.0) + v / n
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        if self.clip_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.detach().norm() for p in self.model.parameters() if p.grad is not None]))
        loss_value = float(total)
        lr = self.optimizer.param_groups[0]["lr"]
        finite = math.isfinite(loss_value) and math.isfinite(float(grad_norm))
        if finite:
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:  # one bad batch (or an overflow) should not poison the weights: skip it, but not forever
            self.bad_in_a_row += 1
            self.skipped_total += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.bad_in_a_row >= self.max_bad_steps:
            raise TrainingDiverged(
                f"loss was not finite for {self.bad_in_a_row} steps in a row (last at step {self.step}); lower "
                f"pretrain.optimizer.lr, set pretrain.optimizer.clip_norm, or use dtype fp32")
        tokens = sum(int(getattr(mb, "n_tokens", 0)) for mb in micro_batches)
        return StepResult(loss=loss_value, grad_norm=float(grad_norm), skipped=not finite, lr=lr, tokens=tokens,
                          logs=logs)

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "step": self.step, "bad_in_a_row": self.bad_in_a_row,
                "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.bad_in_a_row = int(state["bad_in_a_row"])
        self.skipped_total = int(state["skipped_total"])
