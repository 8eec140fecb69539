"""FSDP2 against DDP on CPU: 2 gloo ranks train the same 5 steps (2 accumulation micro-steps each, the language
discriminator on) and the gathered full weights agree within 1e-5; DDP through translation-ranking steps."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from xlm_core.model import XLMModel
from xlm_core.model_config import ModelConfig
from xlm_core.objectives import build_dual_batch
from xlm_core.settings import AdversarialConfig, ObjectivesConfig, TranslationRankingConfig
from xlm_core.train import parallelize
from xlm_core.train.task import PretrainTask
from xlm_core.train.trainer import Trainer, lr_multiplier

WORLD, STEPS, ACCUM, ROWS, LENGTH = 2, 5, 2, 8, 16   # ROWS: the global batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _micro_batches(step: int, rank: int) -> list[dict]:
    """This rank's share of step ``step``'s global batch, in ACCUM micro-batches (the same data on either path)."""
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(5, 100, (ROWS, LENGTH), generator=g)
    langs = torch.randint(0, 2, (ROWS,), generator=g)
    per_rank = ROWS // WORLD
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    ids, langs = ids[mine], langs[mine]
    size = per_rank // ACCUM
    return [{"input_ids": ids[i:i + size], "lang_ids": langs[i:i + size], "seed": 1000 * step + 10 * rank + i // size}
            for i in range(0, per_rank, size)]


def _join_gloo_group(rank: int, port: int) -> None:
    """This process as rank ``rank`` of a WORLD-process gloo group on 127.0.0.1:``port``, one thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    parallelize.init_distributed()


def _train(rank: int, parallel: str, port: int, out: str) -> None:
    _join_gloo_group(rank, port)
    try:
        torch.manual_seed(0)
        cfg = ModelConfig.preset("tiny", vocab_size=100, n_languages=2, dropout=0.0, attention_dropout=0.0)
        objectives = ObjectivesConfig(adversarial=AdversarialConfig(weight=0.1, warmup_steps=0, layer=1))
        task = PretrainTask(XLMModel(cfg), objectives, ["en", "fr"], adversarial_hidden=16)
        parallelize.broadcast_from_rank0(task)
        module = parallelize.wrap(task, parallel, torch.device("cpu"), WORLD)
        optimizer = torch.optim.AdamW(task.param_groups(0.01), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier("linear", 2, STEPS))

        def loss_fn(mod, mb):
            return mod({"input_ids": mb["input_ids"], "lang_ids": mb["lang_ids"]}, "mlm", mb["seed"], 0)

        trainer = Trainer(module, optimizer, scheduler, loss_fn, clip_norm=1.0)
        for step in range(STEPS):
            assert not trainer.train_step(_micro_batches(step, rank)).skipped
        state = parallelize.FullState(task, optimizer, sharded=parallel == "fsdp").state_dict()["model"]
        if rank == 0:
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp_on_two_gloo_ranks_trains_to_the_weights_of_ddp(tmp_path):
    weights = {}
    for parallel in ("ddp", "fsdp"):
        out = tmp_path / f"{parallel}.safetensors"
        mp.spawn(_train, args=(parallel, _free_port(), str(out)), nprocs=WORLD, join=True)
        weights[parallel] = load_file(str(out))
    assert weights["ddp"].keys() == weights["fsdp"].keys()
    torch.manual_seed(0)
    initial = XLMModel(ModelConfig.preset("tiny", vocab_size=100, n_languages=2, dropout=0.0,
                                          attention_dropout=0.0)).state_dict()
    assert any(not torch.equal(weights["ddp"][f"model.{k}"], v) for k, v in initial.items())  # it did train
    for name, ddp in weights["ddp"].items():
        torch.testing.assert_close(weights["fsdp"][name], ddp, rtol=0, atol=1e-5, msg=name)


def _train_with_tr(rank: int, port: int, out: str) -> None:
    """DDP, no discriminator, mlm and tr steps in turn; tr pools below the last block, so the MLM head and the top
    block get no gradient in a tr step (DDP without find_unused_parameters fails at the step after)."""
    _join_gloo_group(rank, port)
    try:
        torch.manual_seed(0)
        cfg = ModelConfig.preset("tiny", vocab_size=100, n_languages=2, dropout=0.0, attention_dropout=0.0)
        objectives = ObjectivesConfig(tr_weight=1.0, translation_ranking=TranslationRankingConfig(layer=1))
        task = PretrainTask(XLMModel(cfg), objectives, ["en", "fr"], adversarial_hidden=16)
        parallelize.broadcast_from_rank0(task)
        module = parallelize.wrap(task, "ddp", torch.device("cpu"), WORLD)
        optimizer = torch.optim.AdamW(task.param_groups(0.01), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier("linear", 2, STEPS))

        def loss_fn(mod, mb):
            return mod({k: v for k, v in mb.items() if k not in ("seed", "objective")}, mb["objective"], mb["seed"], 0)

        trainer = Trainer(module, optimizer, scheduler, loss_fn, clip_norm=1.0)
        for step in range(STEPS):
            if step % 2:
                g = torch.Generator().manual_seed(step * 10 + rank)
                sides = [torch.randint(5, 100, (4, 6), generator=g).tolist() for _ in range(2)]
                micro = [{**build_dual_batch(sides[0][i:i + 2], sides[1][i:i + 2], 0, 1, max_len=8),
                          "objective": "tr", "seed": step} for i in (0, 2)]
            else:
                micro = [{**mb, "objective": "mlm"} for mb in _micro_batches(step, rank)]
            assert not trainer.train_step(micro).skipped
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in task.state_dict().items()}, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_on_two_gloo_ranks_trains_through_translation_ranking_steps(tmp_path):
    out = tmp_path / "ddp_tr.safetensors"
    mp.spawn(_train_with_tr, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    ranks = [load_file(f"{out}.{rank}") for rank in range(WORLD)]
    assert ranks[0].keys() == ranks[1].keys()
    for name, weight in ranks[0].items():   # gradients were averaged at every step: the ranks stay identical
        torch.testing.assert_close(ranks[1][name], weight, rtol=0, atol=0, msg=name)
