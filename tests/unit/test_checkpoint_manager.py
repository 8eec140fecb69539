"""CheckpointManager: which checkpoint a run resumes from, and every Stateful piece saved and restored."""
from __future__ import annotations

import torch

from xlm_core.train.checkpoint import CheckpointManager, checkpoint_dir, list_checkpoints, settle_set_aside
from xlm_core.train.parallelize import FullState
from xlm_core.train.trainer import Trainer, lr_multiplier


class _Position:
    """A loader's position: plain integers."""

    def __init__(self, offset: int = 0):
        self.offset = offset

    def state_dict(self) -> dict:
        return {"offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.offset = state["offset"]


def _run(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier("linear", 1, 10))
    trainer = Trainer(model, optimizer, scheduler, lambda m, x: (m(x).square().mean(), {}))
    return model, optimizer, trainer, _Position()


def _manager(root, pieces, fingerprint="fp", said=None):
    model, optimizer, trainer, position = pieces
    manager = CheckpointManager(root, keep_last=2, say=(said.append if said is not None else lambda m: None))
    manager.track(weights=FullState(model, optimizer, sharded=False), trainer=trainer, loader=position,
                  meta={"fingerprint": fingerprint, "identity": {"lr": 0.1 if fingerprint == "fp" else 0.2}})
    return manager


def test_a_saved_run_is_found_and_restored_piece_by_piece(tmp_path):
    pieces = _run(0)
    model, optimizer, trainer, position = pieces
    for _ in range(3):
        trainer.train_step([torch.randn(4, 3)])
    position.offset = 12
    _manager(tmp_path, pieces).save(trainer.step)

    fresh = _run(1)
    manager = _manager(tmp_path, fresh)
    assert manager.find_resumable("fp") == 3 and manager.load() == 3
    f_model, f_optimizer, f_trainer, f_position = fresh
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), f_model.parameters()))
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], f_optimizer.state_dict()["state"][0]["exp_avg"])
    assert (f_trainer.step, f_position.offset) == (3, 12)
    assert f_trainer.scheduler.get_last_lr() == trainer.scheduler.get_last_lr()


def test_a_half_written_newer_checkpoint_is_named_and_skipped(tmp_path):
    pieces = _run(0)
    _manager(tmp_path, pieces).save(5)
    half = checkpoint_dir(tmp_path, 9)
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"cut short")
    said = []
    assert _manager(tmp_path, _run(1), said=said).find_resumable("fp") == 5
    assert len(said) == 1 and "ignoring incomplete checkpoint" in said[0] and "step-000000009" in said[0]


def test_a_checkpoint_of_other_settings_is_reported_and_set_aside(tmp_path):
    _manager(tmp_path, _run(0)).save(5)
    manager = _manager(tmp_path, _run(1), fingerprint="other")
    assert manager.find_resumable("other") is None
    assert manager.stale == ("step-000000005", {"lr": 0.1})
    assert list_checkpoints(tmp_path) == []


def _tree(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_other_settings_checkpoints_survive_a_failed_start_and_go_at_the_first_save(tmp_path):
    _manager(tmp_path, _run(0)).save(5)
    _manager(tmp_path, _run(0)).save(10)
    before = _tree(tmp_path)
    # a start under new settings that fails before its first checkpoint (bad vectors, a NaN loss, a kill)
    manager = _manager(tmp_path, _run(1), fingerprint="other")
    assert manager.find_resumable("other") is None and list_checkpoints(tmp_path) == []   # set aside, not deleted
    settle_set_aside(tmp_path)                       # what pretrain does on any failure (and the next start on a kill)
    assert _tree(tmp_path) == before
    # killed before settling: the next start puts them back first, then the old settings resume
    assert _manager(tmp_path, _run(1), fingerprint="other").find_resumable("other") is None
    assert _manager(tmp_path, _run(2)).find_resumable("fp") == 10 and _tree(tmp_path) == before
    # the new run's first checkpoint retires them
    manager = _manager(tmp_path, _run(1), fingerprint="other")
    assert manager.find_resumable("other") is None
    manager.save(1)
    assert [step for step, _p in list_checkpoints(tmp_path)] == [1]
    assert not list(tmp_path.glob("*.stale"))
