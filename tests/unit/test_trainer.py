"""The Trainer's guards (accumulation scaling, non-finite steps, clipping), its fit loop, and the lr schedules."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from xlm_core.train.trainer import Trainer, TrainingDiverged, lr_multiplier


def _linear(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 1)


def _trainer(model: torch.nn.Module, loss_fn, clip_norm: float = 0.0, max_bad_steps: int = 5, lr: float = 1.0,
             **kwargs) -> Trainer:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)   # plain SGD: the update is -lr × the gradient
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return Trainer(model, optimizer, scheduler, loss_fn, clip_norm=clip_norm, max_bad_steps=max_bad_steps, **kwargs)


def _mse(model, batch):
    x, y = batch
    loss = torch.nn.functional.mse_loss(model(x), y)
    return loss, {"mse": float(loss.detach())}


def _batch(rows: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, generator=g), torch.randn(rows, 1, generator=g)


def test_two_micro_batches_give_the_gradients_of_one_batch_of_both():
    x, y = _batch(8)
    whole, split = _linear(), _linear()
    whole_result = _trainer(whole, _mse).train_step([(x, y)])
    split_result = _trainer(split, _mse).train_step([(x[:4], y[:4]), (x[4:], y[4:])])
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert split_result.loss == pytest.approx(whole_result.loss, abs=1e-6)
    assert split_result.grad_norm == pytest.approx(whole_result.grad_norm, abs=1e-6)


def test_a_non_finite_loss_skips_the_step_and_too_many_in_a_row_raise():
    model = _linear()
    before = [p.detach().clone() for p in model.parameters()]
    poisoned = lambda m, batch: (m(batch[0]).sum() * float("nan"), {})  # noqa: E731
    trainer = _trainer(model, poisoned, max_bad_steps=3)
    for _ in range(2):
        result = trainer.train_step([_batch(4)])
        assert result.skipped and math.isnan(result.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))   # the weights were not touched
    assert (trainer.step, trainer.skipped_total, trainer.bad_in_a_row) == (2, 2, 2)
    trainer.loss_fn = _mse                                                     # a good step resets the run
    assert not trainer.train_step([_batch(4)]).skipped and trainer.bad_in_a_row == 0
    trainer.loss_fn = poisoned
    trainer.train_step([_batch(4)])
    trainer.train_step([_batch(4)])
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        trainer.train_step([_batch(4)])


def test_clipping_bounds_the_update_and_reports_the_norm_before_it():
    model = _linear()
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    x, y = _batch(8)
    result = _trainer(model, _mse, clip_norm=0.5).train_step([(x, 1000 * y)])   # a huge gradient
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert result.grad_norm > 10
    assert float(torch.linalg.vector_norm(after - before)) == pytest.approx(0.5, rel=1e-4)


@dataclass
class _MicroBatch:
    x: torch.Tensor
    y: torch.Tensor
    n_tokens: int = 4

    def to(self, device):
        return _MicroBatch(self.x.to(device), self.y.to(device), self.n_tokens)


def test_fit_runs_to_the_step_count_with_hooks_after_every_step():
    batches = iter([[_MicroBatch(*_batch(4, seed))] for seed in range(100)])
    seen = []
    trainer = _trainer(_linear(), lambda m, mb: _mse(m, (mb.x, mb.y)), loader=batches, lr=0.01)
    trainer.fit(3, hooks=[lambda t, result: seen.append((t.step, result.tokens))])
    assert seen == [(1, 4), (2, 4), (3, 4)]
    trainer.fit(5)
    assert trainer.step == 5
    assert torch.equal(next(batches)[0].x, _batch(4, 5)[0])   # the loader moved on by exactly 5 steps


def test_the_trainer_state_restores_the_counters_and_the_schedule():
    trainer = _trainer(_linear(), _mse)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lr_multiplier("linear", 2, 10))
    for _ in range(3):
        trainer.train_step([_batch(4)])
    other = _trainer(_linear(), _mse)
    other.scheduler = torch.optim.lr_scheduler.LambdaLR(other.optimizer, lr_multiplier("linear", 2, 10))
    other.load_state_dict(trainer.state_dict())
    assert other.step == 3 and other.scheduler.get_last_lr() == trainer.scheduler.get_last_lr()


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.25, 0.5, 0.75, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]),
    ("cosine", [0.25, 0.5, 0.75, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(1, 9)]),
    ("inverse_sqrt", [0.25, 0.5, 0.75, 1.0] + [math.sqrt(4 / s) for s in range(5, 13)]),
])
def test_lr_multiplier_warms_up_linearly_then_decays_as_chosen(schedule, expected):
    factor = lr_multiplier(schedule, warmup_steps=4, total_steps=12)
    assert [factor(step) for step in range(12)] == pytest.approx(expected)


def test_lr_multiplier_decays_to_its_floor_and_refuses_unknown_schedules():
    assert lr_multiplier("linear", 0, 10, min_ratio=0.1)(9) == pytest.approx(0.1)
    assert lr_multiplier("cosine", 0, 10, min_ratio=0.1)(99) == pytest.approx(0.1)   # past the end: the floor
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier("step", 0, 10)(5)
