"""The `pretrain` stage: train the encoder on the train shards; resume exactly after a kill; scale out with torchrun.

dvc.yaml runs ``python -m pipeline.pretrain``: with ``pretrain.nproc: 1`` it trains in that process; with more it
starts the workers with torchrun's own launcher (pipeline.launch). Multi-node runs start ``torchrun ... -m
pipeline.pretrain`` on every node themselves. Every rank runs this module; rank 0 alone logs (xlm_core.train.sinks),
validates and writes checkpoints and outputs. Here params become the library's configs (xlm_core.train), the
Trainer fits, and the final checkpoint becomes data/model.
"""
from __future__ import annotations

import sys

from pipeline.launch import die_with_the_launcher, launch_workers

if __name__ == "__main__":
    die_with_the_launcher()  # first, before the slow imports below: a kill during them must not leave an orphan

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from pipeline.errors import PipelineError, disk_full_is_an_error, run_cli  # noqa: E402
from pipeline.params import StageParams, load_params  # noqa: E402
from pipeline.pretrain_settings import changed_settings, model_config, objectives_config, training_fingerprint  # noqa: E402
from xlm_core.atomic import write_json  # noqa: E402
from xlm_core.data import DataError, PretrainLoader, iter_eval_batches  # noqa: E402
from xlm_core.embeddings_init import coverage_line, init_model_embeddings  # noqa: E402
from xlm_core.model import XLMModel  # noqa: E402
from xlm_core.metrics import unigram_score  # noqa: E402
from xlm_core.model_dir import save_model_dir  # noqa: E402
from xlm_core.shards import ShardSet  # noqa: E402
from xlm_core.tokenizer import Tokenizer, TokenizerError  # noqa: E402
from xlm_core.train import parallelize, runtime  # noqa: E402
from xlm_core.train.checkpoint import CheckpointManager, settle_set_aside  # noqa: E402
from xlm_core.train.sinks import DVCLiveSink, StderrProgress, TrainLog, below_unigram, progress_file_sink  # noqa: E402
from xlm_core.train.task import PretrainTask, micro_batch_loss  # noqa: E402
from xlm_core.train.trainer import Trainer, lr_multiplier, seq_len_schedule  # noqa: E402
from xlm_core.train.validation import validate, validation_jobs  # noqa: E402


def pretrain(params: StageParams, shards_dir: Path, tokenizer_dir: Path, checkpoints_dir: Path, model_dir: Path,
             metrics_path: Path, live_dir: Path) -> dict:
    p = params.pretrain
    rank, world, local_rank = parallelize.init_distributed()
    is_main = rank == 0
    say = (lambda message: print(f"pretrain: {message}", file=sys.stderr, flush=True)) if is_main else (lambda m: None)
    # processes on this node: pretrain.nproc, or what the user's own torchrun started here (multi-node)
    device = runtime.pick_device(p.device, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", p.nproc)))
    if p.threads:
        torch.set_num_threads(p.threads)
    autocast_dtype, sharded = runtime.pick_dtype(p.dtype, device), world > 1 and p.parallel == "fsdp"
    say(f"{world} process(es) on {device.type}" + (f", {p.parallel.upper()}" if world > 1 else "")
        + f", {torch.get_num_threads()} thread(s) each")
    # MFU/HFU's yardstick, taken before the loader's threads start (their CPU time would lower a measured peak)
    peak = runtime.peak_flops(device, autocast_dtype) if is_main else None
    if peak:
        say(f"MFU/HFU against a peak of {peak.describe()}")

    try:
        tokenizer = Tokenizer.load(tokenizer_dir)
    except (TokenizerError, OSError) as exc:
        raise PipelineError(f"{tokenizer_dir}: cannot load the tokenizer ({exc}); run `dvc repro tokenizer`") from None
    cfg = model_config(params, tokenizer.vocab_size)
    pairs = ["-".join(pair) for pair in params.pairs]
    loader = PretrainLoader(shards_dir / "train", params.languages, pairs, dict(p.objectives), p.alpha, p.seq_len,
                            p.batch_size, mode=p.mode, seed=p.seed, rank=rank, world_size=world,
                            accum_steps=p.accum_steps, token_budget=p.token_budget, tokenizer=tokenizer,
                            tr_pairs=p.translation_ranking.pairs, tr_max_len=p.translation_ranking.max_len)
    # validation skips a language without valid rows, so a damaged valid shard must be caught here, not there
    ShardSet(shards_dir / "valid", tokenizer=tokenizer).verify()
    fingerprint, identity = training_fingerprint(params, tokenizer.sha256, loader.split.fingerprint)

    torch.manual_seed(p.seed)  # the order of RNG use decides the init: encoder, then discriminator
    model = XLMModel(cfg)
    objectives = objectives_config(params, cfg.n_layers)
    task = PretrainTask(model, objectives, params.languages, p.adversarial.hidden).to(device)

    # Resume from the newest valid checkpoint made with the same settings; otherwise start fresh and say why.
    checkpoints = CheckpointManager(checkpoints_dir, keep_last=p.keep_checkpoints, is_main=is_main, say=say)
    resume_step = checkpoints.find_resumable(fingerprint)
    if checkpoints.stale is not None:
        changed = changed_settings(checkpoints.stale[1], identity) or ["(unknown)"]
        say(f"settings changed since checkpoint {checkpoints.stale[0]} ({', '.join(changed)}): starting fresh (the "
            f"old checkpoints are kept until this run writes its first one)")
    if resume_step is None and p.embeddings.vectors and is_main:
        coverage = init_model_embeddings(model, p.embeddings.vectors, tokenizer, p.seed)
        print(coverage_line(coverage), file=sys.stderr, flush=True)
    parallelize.broadcast_from_rank0(task)

    module = parallelize.wrap(task, p.parallel, device, world)
    if p.compile:
        module = torch.compile(module)
    o = p.optimizer
    optimizer = torch.optim.AdamW(task.param_groups(o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(o.schedule, o.warmup_steps, p.steps,
                                                                            o.min_lr_ratio))
    row_length = seq_len_schedule(p.seq_len, p.seq_len_warmup.start, p.seq_len_warmup.steps)
    trainer = Trainer(module, optimizer, scheduler, micro_batch_loss(row_length), clip_norm=o.clip_norm,
                      autocast_dtype=autocast_dtype, max_bad_steps=p.max_bad_steps, loader=loader, device=device)
    checkpoints.track(weights=parallelize.FullState(task, optimizer, sharded), trainer=trainer, loader=loader,
                      meta={"fingerprint": fingerprint, "identity": identity, "model_config": cfg.to_dict()})
    if resume_step is not None:
        checkpoints.load()
        say(f"resuming from {checkpoints.resumable.name} (step {resume_step} of {p.steps})")

    start_step = trainer.step
    progress_files = progress_file_sink(p.steps) if is_main else []
    sinks = [DVCLiveSink(live_dir, start_step if resume_step is not None else None),
             *progress_files, StderrProgress(p.steps, start_step)] if is_main else []
    # The validation figures' unigram level (only MLM has one; smoothed targets lean to rare pieces, for which the
    # uniform one is no floor): beside each validation in `xlm flow`'s table, and the final figures' warning.
    floor = valid_unigram(params, shards_dir, tokenizer, cfg.vocab_size) \
        if is_main and dict(p.objectives).get("mlm", 0) > 0 and p.masking.smoothing == 0 else {}
    for sink in progress_files:
        sink.set_unigram({name: value for lang, (accuracy, perplexity) in floor.items() for name, value in
                          ((f"valid/mlm_accuracy/{lang}", accuracy), (f"valid/mlm_loss/{lang}", math.log(perplexity)))})
    flops = model.flops_per_token(p.seq_len, projected_fraction=p.masking.rate)
    log = TrainLog(sinks, p.log_every, p.steps, world, flops, peak.flops * world if peak else 0.0, row_length,
                   peak_text=peak.describe() if peak else "", quiet=not is_main)
    jobs = validation_jobs(p.objectives, params.languages, pairs)
    last_valid: dict[str, float] = {}

    def validate_now() -> dict[str, float]:  # rank 0; every rank under FSDP (its forward is collective)
        return {} if not (is_main or sharded) else validate(
            task, jobs, shards_dir / "valid", params.languages, seq_len=p.seq_len, batch_size=p.batch_size,
            max_batches=p.eval_batches, seed=p.seed, tokenizer=tokenizer, device=device, autocast_dtype=autocast_dtype)

    # The unigram level as a flat reference line beside each validation curve (the languages' mean; per language
    # it is in `xlm flow`'s validation table and in the final warning).
    reference = {"valid/mlm_accuracy/unigram": sum(a for a, _ in floor.values()) / len(floor),
                 "valid/mlm_loss/unigram": sum(math.log(q) for _, q in floor.values()) / len(floor)} if floor else {}

    def log_validation(step: int, figures: dict[str, float]) -> None:
        log.log("valid", step, {**{f"valid/{k}": v for k, v in figures.items()}, **reference})

    def validate_and_checkpoint(trainer_: Trainer, _result) -> None:
        step = trainer_.step
        with log.paused():   # not training time: tokens/s (and the warning when it halves) leave it out
            if step % p.eval_every == 0 or step == p.steps:
                last_valid.update(validate_now())   # the same figures each time: the newest replace the last
                log_validation(step, last_valid)
            if step % p.checkpoint_every == 0 or step == p.steps:
                checkpoints.save(step)

    t0 = time.perf_counter()
    try:
        if start_step == 0 and p.steps > 0:   # step 0: the random-init level each curve starts from
            with log.paused():
                log_validation(0, validate_now())
        trainer.fit(p.steps, hooks=[log, validate_and_checkpoint])
    except BaseException:
        log.close()   # the bar, DVCLive and the progress file end cleanly before the error line
        raise
    finally:
        loader.close()
    if not last_valid:  # the run was already complete: report the final model's figures anyway
        last_valid = validate_now()
    parallelize.barrier()
    metrics = {}
    if is_main:
        train_seconds = time.perf_counter() - t0
        for message in below_unigram(last_valid, floor) if floor else []:
            log.warn(message)
        metrics = {"steps": p.steps, "resumed_from": start_step, "skipped_steps": trainer.skipped_total,
                   "seconds": round(train_seconds, 1), "valid": last_valid,
                   "loader_stall_fraction": round(trainer.data_wait_s / max(train_seconds, 1e-9), 5),
                   "tokens_per_s": round(log.tokens / max(train_seconds, 1e-9), 1),
                   "params": model.num_params(non_embedding=False)}
        log.close()
        with disk_full_is_an_error("pretrain", f"{model_dir} or {metrics_path}", outcome=f"training is complete in "
                                   f"{checkpoints_dir}, only the outputs are written again"):
            write_model_dir(model_dir, checkpoints.final_weights(), cfg, params, objectives, identity,
                            tokenizer_dir, ShardSet(shards_dir / "train"), last_valid)
            write_json(metrics_path, metrics)
    parallelize.shutdown()
    return metrics


def valid_unigram(params: StageParams, shards_dir: Path, tokenizer: Tokenizer,
                  vocab_size: int) -> dict[str, tuple[float, float]]:
    """Per language, (accuracy, perplexity) of the best context-free guess at validation's MLM targets (the same
    batches and seeds as ``validate``): the level the final figures must clear, else the run learned nothing."""
    p = params.pretrain
    floor = {}
    for lang in params.languages:
        batches = iter_eval_batches(shards_dir / "valid", params.languages, "mlm", lang, p.seq_len, p.batch_size,
                                    max_batches=p.eval_batches, seed=p.seed, tokenizer=tokenizer)
        try:
            score = unigram_score(batches, vocab_size, p.masking.rate)
        except DataError:
            continue   # no valid text in this language: validate has no figure for it either
        if score.targets:
            floor[lang] = (score.accuracy, score.perplexity)
    return floor


def write_model_dir(model_dir: Path, weights: dict, cfg, params: StageParams, objectives, identity: dict,
                    tokenizer_dir: Path, train_split: ShardSet, valid: dict) -> None:
    """data/model/ (xlm_core.model_dir): the encoder, the discriminator, and what evaluate/export need of the run."""
    part = lambda prefix: {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}  # noqa: E731
    adversarial = objectives.adversarial_enabled
    training = {"pretrain": identity["pretrain"], "steps": params.pretrain.steps, "valid": valid,
                "discriminator_layer": objectives.adversarial.layer if adversarial else None,
                "discriminator_hidden": params.pretrain.adversarial.hidden if adversarial else None,
                "train_tokens": {"languages": train_split.languages, "pairs": train_split.pairs}}
    save_model_dir(model_dir, config=cfg, state=part("model."), tokenizer_dir=tokenizer_dir,
                   languages=params.languages, pairs=["-".join(p) for p in params.pairs],
                   discriminator=part("discriminator.") if adversarial else None, training=training)


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
            runtime.device_type(p.device, p.nproc)             # first, so that workers that could not run never start
            launched = launch_workers(p.nproc, "pipeline.pretrain", sys.argv[1:] if argv is None else argv)
        else:
            try:
                pretrain(params, args.shards, args.tokenizer, args.checkpoints, args.out, args.metrics, args.live)
            except BaseException:
                if os.environ.get("RANK", "0") == "0":
                    settle_set_aside(args.checkpoints)   # a failed start puts other settings' checkpoints back
                raise

    return run_cli("pretrain", run) or launched


if __name__ == "__main__":
    sys.exit(main())
