"""The `pretrain` stage: train the encoder on the train shards; resume exactly after a kill; scale out with torchrun.

dvc.yaml runs ``python -m pipeline.pretrain``: with ``pretrain.nproc: 1`` it trains in that process; with more it
starts the workers with torchrun's own launcher (``torch.distributed.run``, ``--standalone``), and a user error in a
worker stays the worker's one line instead of torchrun's report. Multi-node runs start ``torchrun ... -m
pipeline.pretrain`` on every node themselves. Every rank runs this module; rank 0 alone logs (DVCLive, tqdm), validates
and writes checkpoints and outputs.

Determinism (why a resumed run is byte-identical to an uninterrupted one, and a 2-rank run equals 1 rank with 2
accumulation steps): the data loader's position is plain integers saved in each checkpoint; every micro-batch
carries a stateless seed from which both its MLM mask and its dropout draws are derived, so no RNG state has to be
saved and the split of a global batch into ranks × accumulation steps does not change what is computed.
"""
from __future__ import annotations

import os
import sys


def die_with_the_launcher() -> None:
    """Under torchrun, have the kernel SIGKILL this worker when its launcher dies (Linux).

    torchrun starts its workers in sessions of their own, so a SIGKILL of `dvc repro`'s process group (a
    scheduler's kill, `timeout -s KILL`, an OOM kill of the group) ends the launcher but not the worker: the orphan
    would go on training and writing data/checkpoints while the next `dvc repro` trains into the same folder.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    launcher = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != launcher:  # the launcher died before the request took effect
        os._exit(137)


if __name__ == "__main__":
    die_with_the_launcher()  # first, before the slow imports below: a kill during them must not leave an orphan

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.errors import PipelineError, disk_full_is_an_error, print_error, run_cli
from pipeline.params import StageParams, load_params
from pipeline.pretrain_settings import _diff, model_config, objectives_config, training_fingerprint
from xlm_core import checkpoint as ckpt
from xlm_core.atomic import atomic_file, write_json
from xlm_core.data import DataError, PretrainLoader, iter_eval_batches
from xlm_core.model import ModelConfig, XLMModel
from xlm_core.model_dir import save_model_dir
from xlm_core.objectives import LanguageDiscriminator, ObjectivesConfig, total_loss
from xlm_core.shards import ShardError, ShardSet
from xlm_core.tokenizer import Tokenizer, TokenizerError
from xlm_core.trainer import Trainer, TrainingDiverged, lr_multiplier, seq_len_schedule

# ----------------------------------------------------------------------------------------------------- the module
class PretrainTask(torch.nn.Module):
    """The encoder plus the optional language discriminator, with the loss as its forward.

    DDP/FSDP wrap this one module, so the loss is computed inside the wrapper's forward (as DDP requires).
    """

    def __init__(self, model: XLMModel, objectives: ObjectivesConfig, languages: list[str], adversarial_hidden: int):
        super().__init__()
        self.model = model
        self.objectives = objectives
        self.languages = languages
        self.discriminator = (LanguageDiscriminator(model.config.d_model, len(languages), adversarial_hidden)
                              if objectives.adversarial_enabled else None)

    def forward(self, batch: dict[str, torch.Tensor], objective: str, seed: int, step: int):
        generator = torch.Generator(device=batch["input_ids"].device)
        generator.manual_seed(seed)
        return total_loss(self.model, {objective: batch}, self.objectives, generator, step=step,
                          discriminator=self.discriminator, language_names=self.languages)


def device_type(choice: str, nproc: int) -> str:
    """"cuda" or "cpu" for ``pretrain.device``, once ``pretrain.nproc`` processes are known to fit this machine."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise PipelineError("params.yaml: pretrain.device = 'cuda' but no CUDA GPU is visible; use auto or cpu")
        if nproc > torch.cuda.device_count():
            raise PipelineError(f"params.yaml: pretrain.nproc = {nproc} but only {torch.cuda.device_count()} GPU(s) "
                                f"are visible; lower nproc")
        return "cuda"
    cores = os.cpu_count() or 1
    if nproc > cores:
        raise PipelineError(f"params.yaml: pretrain.nproc = {nproc} exceeds the {cores} CPU cores of this machine; "
                            f"lower nproc (each process needs at least one core)")
    return "cpu"


def pick_device(choice: str, local_rank: int, nproc: int) -> torch.device:
    if device_type(choice, nproc) == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def pick_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    if choice == "bf16" or (choice == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None  # fp32


def measure_peak_flops(device: torch.device, seconds: float = 0.3) -> float:
    """A quick matmul benchmark (FLOP/s) so the logs can show MFU against this machine's own peak."""
    n = 4096 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        iters += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------- distributed
def init_distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return rank, world, local_rank


def wrap(task: PretrainTask, parallel: str, device: torch.device, world: int) -> torch.nn.Module:
    if world == 1:
        return task
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in task.model.blocks:
            fully_shard(block)
        fully_shard(task)
        return task
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(task, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=task.discriminator is not None)


def full_state(task: torch.nn.Module, optimizer: torch.optim.Optimizer, parallel: str, world: int):
    """Unsharded model and optimizer state (collective under FSDP: every rank must call it)."""
    if world > 1 and parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(task, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return task.state_dict(), optimizer.state_dict()


def set_full_state(task: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state, optim_state,
                   parallel: str, world: int) -> None:
    if world > 1 and parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(task, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        return
    task.load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)


# ------------------------------------------------------------------------------------------------------ evaluation
@torch.inference_mode()
def validate(task: PretrainTask, params: StageParams, valid_dir: Path, tokenizer: Tokenizer,
             device: torch.device, max_batches: int, autocast_dtype) -> dict[str, float]:
    """MLM loss/accuracy per language and TLM per pair on the valid shards, with fixed-seed masks."""
    p = params.pretrain
    was_training = task.training
    task.eval()
    out: dict[str, float] = {}
    jobs = []
    if p.objectives.get("mlm", 0) > 0 or p.objectives.get("clm", 0) > 0:
        objective = "mlm" if p.objectives.get("mlm", 0) > 0 else "clm"
        jobs += [(objective, lang) for lang in params.languages]
    if p.objectives.get("tlm", 0) > 0:
        jobs += [("tlm", "-".join(pair)) for pair in params.pairs]
    cast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext())
    for objective, key in jobs:
        losses, accs, weights = 0.0, 0.0, 0
        try:
            batches = iter_eval_batches(valid_dir, params.languages, objective, key, p.seq_len, p.batch_size,
                                        max_batches=max_batches, seed=p.seed, tokenizer=tokenizer)
            for batch in batches:
                batch = batch.to(device)
                with cast:
                    _, logs = task(batch.model_inputs(), objective, batch.chunk_seed, 0)
                n = logs.get(f"{objective}_targets", batch.n_tokens)
                losses += logs[f"{objective}_loss"] * n
                accs += logs[f"{objective}_accuracy"] * n
                weights += n
        except DataError:
            continue  # nothing of this language/pair in the valid split (tiny corpora): no figure
        if weights:
            out[f"{objective}_loss/{key}"] = losses / weights
            out[f"{objective}_accuracy/{key}"] = accs / weights
    task.train(was_training)
    return out


def _validate_and_log(task, params, shards_dir, tokenizer, device, autocast_dtype, logger, step, is_main,
                      all_ranks: bool) -> dict[str, float]:
    """Rank 0 validates (every rank under FSDP, whose forward is collective); rank 0 logs."""
    if not (is_main or all_ranks):
        return {}
    figures = validate(task, params, shards_dir / "valid", tokenizer, device, params.pretrain.eval_batches,
                       autocast_dtype)
    if logger is not None:
        logger.log(step, {f"valid/{k}": v for k, v in figures.items()})
    return figures


# ---------------------------------------------------------------------------------------------------------- logging
class Logger:
    """DVCLive (curves for `dvc plots show`) plus a plain log line (what Prefect's task log and the UI read)."""

    def __init__(self, live_dir: Path, resume_step: int | None, total_steps: int):
        if resume_step is None:
            shutil.rmtree(live_dir, ignore_errors=True)
        else:
            _truncate_live(live_dir, resume_step)
        self.live = _plots_only_live(live_dir, resume=resume_step is not None)
        self.total = total_steps

    def log(self, step: int, figures: dict[str, float]) -> None:
        self.live.step = step
        for name, value in sorted(figures.items()):
            self.live.log_metric(name, value, plot=True)
        self.live.make_summary()

    def close(self) -> None:
        self.live.end()


def _plots_only_live(live_dir: Path, resume: bool):
    """DVCLive as a writer of the step/value TSVs only: dvc.yaml declares the plots and no experiment is saved.

    Its DVC/git integration is skipped: it adds nothing here, and dvclive 3.49 crashes in it (scmrepo SCMError
    "Empty git repo") when the project's git repository has no commit yet, as right after `git init && dvc init`.
    """
    from dvclive import Live

    class PlotsOnlyLive(Live):
        def _init_dvc(self) -> None:
            self._dvc_file = None

    return PlotsOnlyLive(dir=str(live_dir), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)


def _truncate_live(live_dir: Path, step: int) -> None:
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


def progress_line(step: int, total: int, figures: dict[str, float], elapsed: float, done_at_start: int) -> str:
    steps_done = step - done_at_start
    eta = (total - step) * elapsed / steps_done if steps_done else float("nan")
    return (f"step {step}/{total} loss {figures.get('train/loss', float('nan')):.4f} "
            f"tokens/s {figures.get('train/tokens_per_s', 0):.0f} mfu {figures.get('train/mfu', 0):.3f} "
            f"eta {eta:.0f}s")


# -------------------------------------------------------------------------------------------------------- the stage
def pretrain(params: StageParams, shards_dir: Path, tokenizer_dir: Path, checkpoints_dir: Path, model_dir: Path,
             metrics_path: Path, live_dir: Path) -> dict:
    p = params.pretrain
    rank, world, local_rank = init_distributed()
    is_main = rank == 0
    # processes on this node: pretrain.nproc, or what the user's own torchrun started here (multi-node)
    device = pick_device(p.device, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", p.nproc)))
    if p.threads:
        torch.set_num_threads(p.threads)
    autocast_dtype = pick_dtype(p.dtype, device)
    _say(is_main, f"{world} process(es) on {device.type}"
                  + (f", {p.parallel.upper()}" if world > 1 else "") + f", {torch.get_num_threads()} thread(s) each")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    try:
        tokenizer = Tokenizer.load(tokenizer_dir)
    except (TokenizerError, OSError) as exc:
        raise PipelineError(f"{tokenizer_dir}: cannot load the tokenizer ({exc}); run `dvc repro tokenizer`") from None
    cfg = model_config(params, tokenizer.vocab_size)
    max_len = p.seq_len
    if max_len > cfg.max_positions:
        raise PipelineError(f"params.yaml: pretrain.seq_len = {max_len} exceeds the model's max_positions = "
                            f"{cfg.max_positions} (preset {p.model.preset}); lower seq_len")
    if p.batch_size % (world * p.accum_steps):
        raise PipelineError(f"params.yaml: pretrain.batch_size = {p.batch_size} is not divisible by nproc × "
                            f"accum_steps = {world} × {p.accum_steps}; change one of them")
    try:
        loader = PretrainLoader(
            shards_dir / "train", params.languages, ["-".join(pair) for pair in params.pairs],
            dict(p.objectives), p.alpha, p.seq_len, p.batch_size, mode=p.mode, seed=p.seed, rank=rank,
            world_size=world, accum_steps=p.accum_steps, token_budget=p.token_budget, tokenizer=tokenizer)
    except (DataError, ShardError) as exc:
        raise PipelineError(f"{shards_dir / 'train'}: {exc}") from None
    try:  # validation skips a language without valid rows, so a damaged valid shard must be caught here, not there
        ShardSet(shards_dir / "valid", tokenizer=tokenizer).verify()
    except ShardError as exc:
        raise PipelineError(str(exc)) from None
    fingerprint, identity = training_fingerprint(params, tokenizer.sha256, loader.split.fingerprint)

    torch.manual_seed(p.seed)
    model = XLMModel(cfg)
    objectives = objectives_config(params, cfg.n_layers)
    task = PretrainTask(model, objectives, params.languages, p.adversarial.hidden).to(device)

    # Resume from the newest valid checkpoint made with the same settings; otherwise start fresh and say why.
    resume = None
    latest = ckpt.latest_checkpoint(checkpoints_dir)
    for step_, path in ckpt.list_checkpoints(checkpoints_dir):
        if latest is None or step_ > int(latest.name.split("-")[1]):
            _say(is_main, f"ignoring incomplete checkpoint {path} (killed while writing, or damaged)")
    if latest is not None:
        meta = json.loads((latest / "meta.json").read_text())
        if meta.get("fingerprint") == fingerprint:
            try:
                resume = ckpt.load_checkpoint(latest, map_location="cpu")
            except ckpt.CheckpointError as exc:  # committed, yet unreadable (damaged after it was written)
                raise PipelineError(str(exc)) from None
        else:
            changed = _diff(meta.get("identity", {}), identity) or ["(unknown)"]
            _say(is_main, f"settings changed since checkpoint {latest.name} ({', '.join(changed)}): "
                          f"starting fresh")
            if is_main:
                ckpt.clear(checkpoints_dir)
    if resume is None and p.embeddings.vectors and is_main:
        _init_embeddings(model, params, tokenizer)
    if world > 1:
        for tensor in task.state_dict().values():  # rank 0's init (and vectors) everywhere
            dist.broadcast(tensor, src=0)

    module = wrap(task, p.parallel, device, world)
    if p.compile:
        module = torch.compile(module)
    optimizer = torch.optim.AdamW(_param_groups(task, p.optimizer.weight_decay), lr=p.optimizer.lr,
                                  betas=tuple(p.optimizer.betas), eps=p.optimizer.eps, fused=True)
    schedule = lr_multiplier(p.optimizer.schedule, p.optimizer.warmup_steps, p.steps, p.optimizer.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    row_length = seq_len_schedule(p.seq_len, p.seq_len_warmup.start, p.seq_len_warmup.steps)

    def loss_fn(mod, batch):
        torch.manual_seed(batch.chunk_seed ^ 0x5EED)  # dropout draws: per chunk, stateless
        if batch.objective != "tlm":  # a pair is one unit: TLM rows keep their length
            batch = batch.cut_rows(row_length(batch.step))
        return mod(batch.model_inputs(), batch.objective, batch.chunk_seed, batch.step)

    trainer = Trainer(module, optimizer, scheduler, loss_fn, clip_norm=p.optimizer.clip_norm,
                      autocast_dtype=autocast_dtype, max_bad_steps=p.max_bad_steps)
    if resume is not None:
        set_full_state(task, optimizer, resume.model, resume.state["optimizer"], p.parallel, world)
        trainer.load_state_dict({**resume.state, "optimizer": optimizer.state_dict()})
        loader.load_state_dict(resume.meta["loader"])
        _say(is_main, f"resuming from {resume.path.name} (step {resume.step} of {p.steps})")

    start_step = trainer.step
    logger = Logger(live_dir, start_step if resume is not None else None, p.steps) if is_main else None
    peak = measure_peak_flops(device) if is_main else 0.0
    flops = model.flops_per_token(p.seq_len, projected_fraction=p.masking.rate)
    bar = None
    if is_main:
        from tqdm import tqdm

        bar = tqdm(total=p.steps, initial=start_step, desc="pretrain", unit="step", file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0)
    t0 = time.perf_counter()
    window_tokens, window_start = 0, time.perf_counter()
    last_valid: dict[str, float] = {}
    total_tokens = 0
    data_wait = 0.0  # seconds the training loop spent waiting for the loader (its stall)
    try:
        while trainer.step < p.steps:
            wait_start = time.perf_counter()
            micro = [mb.to(device) for mb in next(loader)]
            data_wait += time.perf_counter() - wait_start
            result = trainer.train_step(micro, device_type=device.type)
            step_tokens = sum(mb.n_tokens for mb in micro) * world
            window_tokens += step_tokens
            total_tokens += step_tokens
            step = trainer.step
            if bar is not None:
                bar.update(1)
            if is_main and (step % p.log_every == 0 or step == p.steps):
                elapsed = time.perf_counter() - window_start
                tps = window_tokens / max(elapsed, 1e-9)
                figures = {"train/loss": result.loss, "train/lr": result.lr, "train/grad_norm": result.grad_norm,
                           "train/tokens_per_s": tps, "train/mfu": tps * flops.model / peak if peak else 0.0,
                           "train/hfu": tps * flops.hardware / peak if peak else 0.0,
                           "train/skipped_steps": float(trainer.skipped_total),
                           "train/row_length": float(row_length(step - 1))}
                # "adv_accuracy" and "adv_accuracy/en" cannot both be DVCLive names (a value and a folder)
                figures.update({f"train/{k.replace('/', '_')}": v for k, v in result.logs.items() if k != "loss"})
                logger.log(step, figures)
                bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{tps:.0f}")
                print(progress_line(step, p.steps, figures, time.perf_counter() - t0, start_step),
                      file=sys.stderr, flush=True)
                window_tokens, window_start = 0, time.perf_counter()
            if step % p.eval_every == 0 or step == p.steps:
                last_valid = _validate_and_log(task, params, shards_dir, tokenizer, device, autocast_dtype,
                                               logger, step, is_main, p.parallel == "fsdp" and world > 1)
            if step % p.checkpoint_every == 0 or step == p.steps:
                _checkpoint(task, optimizer, trainer, loader, p, world, is_main, checkpoints_dir, step,
                            fingerprint, identity, cfg)
    except (TrainingDiverged, ckpt.CheckpointError, DataError, ShardError) as exc:  # a damaged train shard too
        raise PipelineError(str(exc)) from None
    finally:
        loader.close()
        if bar is not None:
            bar.close()
    if not last_valid:  # the run was already complete: report the final model's figures anyway
        last_valid = _validate_and_log(task, params, shards_dir, tokenizer, device, autocast_dtype, None,
                                       trainer.step, is_main, p.parallel == "fsdp" and world > 1)
    if world > 1:
        dist.barrier()
    metrics = {}
    if is_main:
        train_seconds = time.perf_counter() - t0
        metrics = {"steps": p.steps, "resumed_from": start_step, "skipped_steps": trainer.skipped_total,
                   "seconds": round(train_seconds, 1), "valid": last_valid,
                   "loader_stall_fraction": round(data_wait / max(train_seconds, 1e-9), 5),
                   "tokens_per_s": round(total_tokens / max(train_seconds, 1e-9), 1),
                   "params": model.num_params(non_embedding=False)}
        logger.close()
        final = ckpt.latest_checkpoint(checkpoints_dir)
        with disk_full_is_an_error("pretrain", f"{model_dir} or {metrics_path}",
                                   outcome=f"training is complete in {final}, only the outputs are written again"):
            write_model_dir(final, model_dir, tokenizer_dir, cfg, params, objectives, identity, ShardSet(shards_dir / "train"),
                            last_valid)
            write_json(metrics_path, metrics)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def _param_groups(task: PretrainTask, weight_decay: float) -> list[dict]:
    groups = task.model.optimizer_param_groups(weight_decay)
    if task.discriminator is not None:
        groups.append({"params": list(task.discriminator.parameters()), "weight_decay": 0.0})
    return groups


def _checkpoint(module, optimizer, trainer, loader, p, world, is_main, root, step, fingerprint, identity, cfg):
    model_state, optim_state = full_state(module, optimizer, p.parallel, world)
    if is_main:
        state = {**trainer.state_dict(), "optimizer": optim_state}
        meta = {"fingerprint": fingerprint, "identity": identity, "model_config": cfg.to_dict(),
                "loader": loader.state_dict()}
        ckpt.save_checkpoint(root, step, model_state, state, meta, keep_last=p.keep_checkpoints)
    if world > 1:
        dist.barrier()


def write_model_dir(final: Path, model_dir: Path, tokenizer_dir: Path, cfg: ModelConfig, params: StageParams,
                    objectives: ObjectivesConfig, identity: dict, train_split: ShardSet, valid: dict) -> None:
    """data/model/ (xlm_core.model_dir) from the final checkpoint: encoder, discriminator, what the run was."""
    state = ckpt.load_checkpoint(final).model
    part = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    adversarial = objectives.adversarial_enabled
    training = {"pretrain": identity["pretrain"], "steps": params.pretrain.steps, "valid": valid,
                "discriminator_layer": objectives.adversarial_layer if adversarial else None,
                "discriminator_hidden": params.pretrain.adversarial.hidden if adversarial else None,
                "train_tokens": {"languages": train_split.languages, "pairs": train_split.pairs}}
    save_model_dir(model_dir, config=cfg, state=part("model."), tokenizer_dir=tokenizer_dir,
                   languages=params.languages, pairs=["-".join(p) for p in params.pairs],
                   discriminator=part("discriminator.") if adversarial else None, training=training)


def _init_embeddings(model: XLMModel, params: StageParams, tokenizer: Tokenizer) -> None:
    from xlm_core.embeddings_init import VectorsError, init_embeddings

    vectors = params.pretrain.embeddings.vectors
    files = {"all": vectors} if isinstance(vectors, str) else dict(vectors)
    pieces = [(i, tokenizer.id_to_piece(i)) for i in range(4, tokenizer.vocab_size - 1)]
    try:
        coverage = init_embeddings(model.tok_emb.weight, pieces, files, seed=params.pretrain.seed,
                                   std=model.config.init_std)
    except VectorsError as exc:
        raise PipelineError(str(exc)) from None
    if not torch.isfinite(model.tok_emb.weight).all():  # "nan"/"inf" parse as numbers, then every loss is NaN
        raise PipelineError(f"pretrain.embeddings.vectors: {', '.join(map(str, files.values()))} hold NaN or "
                            f"infinite values; fix or replace the file(s) in params.yaml")
    shown = ", ".join(f"{k} {v:.1%}" for k, v in coverage.items() if k != "initialised_rows")
    print(f"embeddings: initialised {int(coverage['initialised_rows'])} rows from word vectors; coverage of the "
          f"vocabulary per file: {shown}", file=sys.stderr, flush=True)


def _say(is_main: bool, message: str) -> None:
    if is_main:
        print(f"pretrain: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xlm pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--shards", default="data/shards", type=Path)
    parser.add_argument("--tokenizer", default="data/tokenizer", type=Path)
    parser.add_argument("--checkpoints", default="data/checkpoints", type=Path)
    parser.add_argument("--out", default="data/model", type=Path)
    parser.add_argument("--metrics", default="metrics/pretrain.json", type=Path)
    parser.add_argument("--live", default="dvclive/pretrain", type=Path)
    args = parser.parse_args(argv)
    launched = 0   # the launcher's exit status when this process starts the workers

    def run() -> None:
        nonlocal launched
        params = load_params("pretrain", args.params)
        p = params.pretrain
        if p.nproc > 1 and "LOCAL_RANK" not in os.environ:   # not yet under torchrun: start the workers here
            device_type(p.device, p.nproc)                     # first, so that workers that could not run never start
            launched = launch_workers(p.nproc, sys.argv[1:] if argv is None else argv)
        else:
            pretrain(params, args.shards, args.tokenizer, args.checkpoints, args.out, args.metrics, args.live)

    return run_cli("pretrain", run) or launched


def launch_workers(nproc: int, argv: list[str]) -> int:
    """Run ``nproc`` workers of this module on this node with torchrun's launcher; returns the exit status.

    A worker that meets a user error prints its one line and exits 2 (run_cli); torchrun would then add its own error
    log and a ChildFailedError traceback. Here that report is left out when a worker has said what is wrong, and
    shortened to one line when none could (a crash prints its own traceback; a kill prints nothing).
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run as torchrun

    launch_args = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "-m", "pipeline.pretrain", *argv])
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")   # what torchrun sets, without its banner; pretrain.threads decides
    try:
        torchrun(launch_args)
    except SignalException as exc:   # Ctrl-C, or a scheduler's SIGTERM to the launcher: the workers are stopped
        print_error("pretrain", f"interrupted ({exc.sigval.name}); run `dvc repro` again to resume from the newest "
                                f"checkpoint")
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        if any(f.exitcode == PipelineError.exit_code for f in exc.failures.values()):
            return PipelineError.exit_code
        # The cause: a worker killed by the OS (not by the launcher's own SIGTERM while stopping the others), else the
        # first failure. Failure times have whole seconds, so a tie could otherwise name a bystander.
        killed = [(rank, f) for rank, f in sorted(exc.failures.items())
                  if f.exitcode < 0 and -f.exitcode != signal.SIGTERM]
        rank, failure = killed[0] if killed else exc.get_first_failure()
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with status {failure.exitcode} (its output above says why)")
        print_error("pretrain", f"worker rank {rank} {how}; run `dvc repro` again to resume from the newest checkpoint")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
