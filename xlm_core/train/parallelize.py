"""Data parallelism applied from outside the model: process-group init, DDP or FSDP2 wrapping, the full (unsharded)
state of model and optimizer, and the gradient-sync toggle that gradient accumulation needs under either."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; joins the process group when there are several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, local_rank


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def broadcast_from_rank0(module: torch.nn.Module) -> None:
    """Rank 0's weights (its init, and any word vectors) on every rank."""
    if is_distributed():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def wrap(task: torch.nn.Module, parallel: str, device: torch.device, world: int) -> torch.nn.Module:
    """DDP, or FSDP2 (``fully_shard`` per transformer block, then the whole task); the task itself with one rank."""
    if world == 1:
        return task
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in task.model.blocks:
            fully_shard(block)
        fully_shard(task)
        return task
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Some steps leave parameters without a gradient: the MLM ones the discriminator, a translation-ranking step the
    # MLM head (and the blocks above translation_ranking.layer); DDP must then look for them, or the next step fails.
    objectives = getattr(task, "objectives", None)
    unused = getattr(task, "discriminator", None) is not None or getattr(objectives, "tr_weight", 0.0) > 0
    return DDP(task, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)


@contextlib.contextmanager
def gradient_sync(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Inside, backward passes reduce gradients across ranks only if ``enabled``: accumulation micro-steps skip it.

    DDP has ``no_sync()``; an FSDP2 module has ``set_requires_gradient_sync``; an unwrapped module syncs nothing.
    """
    base = getattr(module, "_orig_mod", module)  # under torch.compile
    if enabled:
        yield
    elif hasattr(base, "no_sync"):
        with base.no_sync():
            yield
    elif hasattr(base, "set_requires_gradient_sync"):
        base.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            base.set_requires_gradient_sync(True)
    else:
        yield


class FullState:
    """Model and optimizer as one ``Stateful`` whose state is unsharded: what a checkpoint holds on any world size.

    Under FSDP2 both directions are collective (every rank must call them); each rank loads the full state itself.
    """

    def __init__(self, task: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool):
        self.task = task
        self.optimizer = optimizer
        self.sharded = sharded

    def state_dict(self) -> dict[str, Any]:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            model, optim = get_state_dict(self.task, self.optimizer,
                                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {"model": model, "optimizer": optim}
        return {"model": self.task.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            tuples = [{k for k, v in group.items() if isinstance(v, tuple)} for group in self.optimizer.param_groups]
            set_state_dict(self.task, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
            # It hands the optimizer lists where it had tuples (betas): the same values, but other pickle bytes in
            # the next checkpoint, and a resumed run's checkpoints must be those of an uninterrupted one.
            for group, keys in zip(self.optimizer.param_groups, tuples):
                group.update({k: tuple(group[k]) for k in keys})
            return
        self.task.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Wait for every rank, then leave the process group."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
