"""Training checkpoints that survive being killed at any instant.

Layout of one checkpoint, ``<root>/step-000001200/``:

- ``model.safetensors``: the weights (safetensors: no pickle, safe to hand to anyone);
- ``state.pt``: optimizer, scheduler and step counters, saved with ``torch.save`` of plain containers and loaded with
  ``torch.load(weights_only=True)`` (no arbitrary code on load);
- ``meta.json``: step, the training fingerprint, the model config and any JSON state (data loader position, counters);
- ``COMMIT``: written last, holding the size and sha256 of every other file.

The folder is written under a temporary name and renamed into place; a checkpoint counts only when its COMMIT
marker is present and matches the files, so one killed mid-write (or truncated later by a full disk) is ignored and
the previous one is used. Only the newest ``keep_last`` are kept.

``CheckpointManager`` is the one reader of the folder during training: it finds the checkpoint to resume from,
saves every ``Stateful`` piece of a run and loads them back.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
from safetensors.torch import load_file, save_file

from xlm_core.atomic import atomic_dir, disk_full_reason, is_disk_full, sha256_file
from xlm_core.errors import XLMError
from xlm_core.train.parallelize import barrier

_NAME = re.compile(r"^step-(\d{9})$")
# A run with new settings moves the old checkpoints aside under this suffix and deletes them only once it has written
# its own first checkpoint: a start that fails before (bad vectors, a NaN loss, a kill) leaves them in place.
STALE_SUFFIX = ".stale"
COMMIT = "COMMIT"
FILES = ("model.safetensors", "state.pt", "meta.json")


class CheckpointError(XLMError):
    """A checkpoint cannot be used (damaged, or written by a different configuration) or written (disk full)."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    model: dict[str, torch.Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:09d}"


def save_checkpoint(root: str | Path, step: int, model_state: dict[str, torch.Tensor], state: dict[str, Any],
                    meta: dict[str, Any], keep_last: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, then prune all but the newest ``keep_last`` committed ones."""
    root = Path(root)
    target = checkpoint_dir(root, step)
    # Tied weights share storage; safetensors refuses shared tensors, so store contiguous copies by name.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
    try:
        with atomic_dir(target) as tmp:
            save_file(tensors, str(tmp / "model.safetensors"))
            with open(tmp / "state.pt", "wb") as fh:  # a file object: a full disk then surfaces as its OSError
                torch.save(_canonical(state), fh)
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2, sort_keys=True) + "\n")
            digest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                      for name in FILES}
            (tmp / COMMIT).write_text(json.dumps(digest, indent=2, sort_keys=True) + "\n")
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        newest = latest_checkpoint(root)
        raise CheckpointError(
            f"disk full while writing checkpoint {target} ({disk_full_reason(exc)}); free space on the disk holding "
            f"{root} and run again: training resumes from "
            f"{newest.name if newest is not None else 'the start (no complete checkpoint yet)'}") from None
    prune(root, keep_last)
    return target


def _canonical(obj: Any) -> Any:
    """A copy of ``obj`` whose pickle bytes depend on its values only.

    Pickle memoizes by object identity: a string met twice is written once, then referenced. After a resume the
    optimizer's keys are strings unpickled from the checkpoint, no longer the interned literals an uninterrupted run
    holds, so the same state gave different ``state.pt`` bytes. Here equal strings become one interned object and no
    container is shared, so the bytes are the same either way.
    """
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        return {_canonical(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_canonical(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_canonical(v) for v in obj)
    return obj


def is_committed(path: Path, verify_hash: bool = True) -> bool:
    marker = path / COMMIT
    try:
        digest = json.loads(marker.read_text())
        for name in FILES:
            f = path / name
            if f.stat().st_size != digest[name]["bytes"]:
                return False
            if verify_hash and sha256_file(f) != digest[name]["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """All checkpoint folders by step (committed or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint whose COMMIT marker matches its files; damaged or half-written ones are skipped."""
    for _step, path in reversed(list_checkpoints(root)):
        if is_committed(path):
            return path
    return None


def prune(root: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` committed checkpoints, plus leftovers of killed writes."""
    root = Path(root)
    committed = [p for _s, p in list_checkpoints(root) if is_committed(p, verify_hash=False)]
    for path in committed[:-keep_last] if keep_last > 0 else committed:
        _delete(path)
    if root.is_dir():
        for child in root.iterdir():
            if ".tmp-" in child.name or ".old-" in child.name:
                shutil.rmtree(child, ignore_errors=True)


def _delete(path: Path) -> None:
    """Rename, then delete: a kill during the deletion leaves a ``.old-`` folder the next prune removes, never a
    half-deleted ``step-*`` folder that would stay in data/checkpoints for good."""
    trash = path.with_name(f"{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    if not is_committed(path):
        raise CheckpointError(f"checkpoint {path} is incomplete or damaged (its COMMIT marker does not match its "
                              f"files); delete it to fall back to an earlier one")
    try:
        model = load_file(str(path / "model.safetensors"), device=str(map_location))
        state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
        meta = json.loads((path / "meta.json").read_text())
    except Exception as exc:  # damaged in a way the sizes and hashes did not reveal
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); delete it") from exc
    return Checkpoint(path=path, step=int(meta["step"]), model=model, state=state, meta=meta)


def set_aside(root: str | Path) -> int:
    """Rename every ``step-*`` folder to ``step-*.stale`` (out of list_checkpoints' and prune's sight)."""
    moved = 0
    for _step, path in list_checkpoints(root):
        os.replace(path, path.with_name(path.name + STALE_SUFFIX))
        moved += 1
    return moved


def settle_set_aside(root: str | Path) -> None:
    """Checkpoints set aside by a new run: deleted once that run committed a checkpoint of its own, else put back."""
    root = Path(root)
    aside = sorted(root.glob(f"step-*{STALE_SUFFIX}")) if root.is_dir() else []
    if not aside:
        return
    replaced = any(is_committed(p, verify_hash=False) for _s, p in list_checkpoints(root))
    for path in aside:
        if replaced:
            _delete(path)
        else:
            os.replace(path, path.with_name(path.name[:-len(STALE_SUFFIX)]))


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointManager:
    """A run's checkpoints under ``root``: which one to resume from, and saving/loading every piece of the run.

    The pieces (``track``): ``weights`` (model and optimizer, unsharded: ``parallelize.FullState``) go to
    ``model.safetensors`` and ``state.pt``; ``trainer`` (scheduler, counters) to ``state.pt``; ``loader`` (its
    position, plain integers) to ``meta.json`` beside ``meta`` (the run's fingerprint and identity).
    """

    def __init__(self, root: str | Path, *, keep_last: int = 2, is_main: bool = True,
                 say: Callable[[str], None] = lambda message: None):
        self.root = Path(root)
        self.keep_last = keep_last
        self.is_main = is_main
        self.say = say
        self.resumable: Optional[Path] = None
        self.stale: Optional[tuple[str, dict]] = None   # (name, identity) of a checkpoint of other settings, cleared
        self._pieces: dict[str, Any] = {}
        self._meta: dict[str, Any] = {}

    def find_resumable(self, fingerprint: str) -> Optional[int]:
        """The step of the newest valid checkpoint made with ``fingerprint``, or None.

        Incomplete checkpoints (killed while writing, damaged) are named and skipped. When the newest valid one was
        made with other settings, ``stale`` keeps its name and identity (to say what changed) and rank 0 sets the
        checkpoints aside (``set_aside``): the run starts fresh, and they are deleted at its first save.
        """
        if self.is_main:
            settle_set_aside(self.root)   # a previous start under new settings that failed before its first save
        latest = latest_checkpoint(self.root)
        latest_step = int(_NAME.match(latest.name).group(1)) if latest is not None else -1
        for step, path in list_checkpoints(self.root):
            if step > latest_step:
                self.say(f"ignoring incomplete checkpoint {path} (killed while writing, or damaged)")
        if latest is None:
            return None
        try:
            meta = json.loads((latest / "meta.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {latest} cannot be read ({exc}); delete it") from None
        if meta.get("fingerprint") == fingerprint:
            self.resumable = latest
            return latest_step
        self.stale = (latest.name, meta.get("identity", {}))
        if self.is_main:
            set_aside(self.root)
        return None

    def track(self, *, weights: Stateful, trainer: Stateful, loader: Stateful, meta: dict[str, Any]) -> None:
        self._pieces = {"weights": weights, "trainer": trainer, "loader": loader}
        self._meta = dict(meta)

    def save(self, step: int) -> Path:
        """Checkpoint ``step``: collective (every rank gathers the full state), rank 0 writes."""
        full = self._pieces["weights"].state_dict()
        target = checkpoint_dir(self.root, step)
        if self.is_main:
            state = {"optimizer": full["optimizer"], **self._pieces["trainer"].state_dict()}
            meta = {**self._meta, "loader": self._pieces["loader"].state_dict()}
            save_checkpoint(self.root, step, full["model"], state, meta, keep_last=self.keep_last)
            settle_set_aside(self.root)   # this run has a checkpoint now: the other settings' ones go
        barrier()
        return target

    def load(self) -> int:
        """Restore every piece from the checkpoint ``find_resumable`` chose; returns its step."""
        checkpoint = load_checkpoint(self.resumable, map_location="cpu")
        state = dict(checkpoint.state)
        self._pieces["weights"].load_state_dict({"model": checkpoint.model, "optimizer": state.pop("optimizer")})
        self._pieces["trainer"].load_state_dict(state)
        self._pieces["loader"].load_state_dict(checkpoint.meta["loader"])
        return checkpoint.step

    def final_weights(self) -> dict[str, torch.Tensor]:
        """The model state of the newest checkpoint: what the run's outputs are written from."""
        newest = latest_checkpoint(self.root)
        if newest is None:
            raise CheckpointError(f"{self.root}: no complete checkpoint to write the model from; run again")
        return load_checkpoint(newest).model
