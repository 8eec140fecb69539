"""Equal wall-clock, equal data: our training against Hugging Face ``Trainer`` + ``XLMRobertaForMaskedLM``.

    dvc repro shard                                  # the default corpus's shards and tokenizer (or any project's)
    python bench/quality_vs_hf.py --minutes 10       # 10 minutes of training each, then held-out MLM per language

Both models have the same architecture and init: the project's ``pretrain.model`` from its params.yaml (the default
2 × 128, init std 0.05; ``--preset small`` takes the plain 4 × 256 preset instead), dropout 0. Same tokenizer (the
project's sentencepiece model; HF's tokenizer is the one the export stage writes) and the same data in the same order:
HF's ``Trainer`` reads the very blocks our loader yields (``xlm_core.data.PretrainLoader``, MLM only, stream mode,
language sampling α = 0.5), through an ``IterableDataset``, and masks them with its own
``DataCollatorForLanguageModeling`` at the same rate (80/10/10). The project's batch size, mask rate and peak lr are
used on both sides. Optimiser settings are equal too: AdamW (β 0.9/0.98, ε 1e-6, weight decay 0.01 on Linear weights
only, fused), gradient clipping at 1.0, and one learning-rate schedule in wall-clock time: linear
warm-up over the first 5 % of the budget, then a linear decay that reaches zero when the budget runs out (the budget
schedule of Geiping & Goldstein's "Cramming": the number of steps each side will reach is not known in advance, and a
constant rate leaves the last steps' language dominating the output bias). Each side trains until its budget is spent
(HF through a callback that ends training and a ``create_scheduler`` override), in this process, one after the other.

What differs is what each stack brings: ours runs its own step (``xlm_core``) and, as the pipeline does, its sequence-
length warm-up (rows of 16 tokens doubling to the full length over the same share of the budget as
``pretrain.seq_len_warmup.steps / pretrain.steps``, in wall-clock time here); HF's ``Trainer`` has no such schedule and
trains on full rows. ``--row-warmup 0`` turns ours off too, for the step-for-step comparison of the two stacks alone.

Both are then scored by the same code, the evaluate stage's (``xlm_core.metrics.masked_lm_score``: every target
becomes ``<mask>``, masks seeded per batch) on full-length held-out rows: HF's weights are mapped into our model with
``xlm_core.hf.from_hf``, which tests show gives HF's logits. Output: a table per language and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from xlm_core.hf_tokenizer import read_spm_model, special_tokens_map, tokenizer_config, tokenizer_json  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.pretrain_settings import model_config  # noqa: E402
from xlm_core.data import PretrainLoader, iter_eval_batches  # noqa: E402
from xlm_core.hf import from_hf, hf_config  # noqa: E402
from xlm_core.metrics import masked_lm_score  # noqa: E402
from xlm_core.model import XLMModel  # noqa: E402
from xlm_core.model_config import ModelConfig  # noqa: E402
from xlm_core.objectives import mlm_loss  # noqa: E402
from xlm_core.settings import MaskingConfig  # noqa: E402
from xlm_core.tokenizer import Tokenizer  # noqa: E402
from xlm_core.train.trainer import Trainer, seq_len_schedule  # noqa: E402

BETAS, EPS, WEIGHT_DECAY, CLIP = (0.9, 0.98), 1e-6, 0.01, 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", type=Path, default=ROOT, help="a project whose shard stage has run (default: here)")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget of each side")
    p.add_argument("--languages", nargs="+", default=None, help="default: every language in the train shards")
    p.add_argument("--preset", default=None, help="a plain preset (e.g. small) instead of the project's model")
    p.add_argument("--seq", type=int, default=None, help="default: the project's pretrain.seq_len")
    p.add_argument("--batch", type=int, default=None, help="default: the project's pretrain.batch_size")
    p.add_argument("--lr", type=float, default=None, help="default: the project's pretrain.optimizer.lr")
    p.add_argument("--mask-rate", type=float, default=None, help="default: the project's pretrain.masking.rate")
    p.add_argument("--row-warmup", type=float, default=None,
                   help="ours: share of the budget in sequence-length warm-up (0 = off); default: the project's "
                        "seq_len_warmup.steps / steps")
    p.add_argument("--warmup-frac", type=float, default=0.05, help="share of the budget spent warming up")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--split", default="test", help="held-out split scored (test or valid)")
    p.add_argument("--eval-batches", type=int, default=16, help="held-out batches of seq × batch tokens per language")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", choices=["ours", "hf"], default=None, help="train one side only (for a quick check)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def make_loader(args: argparse.Namespace, train_dir: Path, languages: list[str], tokenizer: Tokenizer,
                ) -> PretrainLoader:
    return PretrainLoader(train_dir, languages, [], {"mlm": 1.0}, args.alpha, args.seq, args.batch, mode="stream",
                          seed=args.seed, tokenizer=tokenizer)


def project_defaults(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    """Fill the unset arguments from the project's params.yaml; return the model both sides train."""
    params = load_params("pretrain", args.project / "params.yaml")
    p = params.pretrain
    args.seq = args.seq or p.seq_len
    args.batch = args.batch or p.batch_size
    args.lr = args.lr or p.optimizer.lr
    args.mask_rate = args.mask_rate or p.masking.rate
    if args.row_warmup is None:
        args.row_warmup = p.seq_len_warmup.steps / p.steps if p.seq_len_warmup.start < args.seq else 0.0
    args.row_start = p.seq_len_warmup.start
    if args.preset:
        return ModelConfig.preset(args.preset, vocab_size=vocab_size, dropout=0.0, attention_dropout=0.0,
                                  max_positions=max(args.seq, 128))
    config = model_config(params, vocab_size)
    return replace(config, dropout=0.0, attention_dropout=0.0, use_lang_emb=False)


class BudgetSchedule:
    """LR factor from the elapsed share f of the wall-clock budget: a linear warm-up over the first ``warmup_frac``,
    times a linear decay to 0 at the end, min(1, f / warmup_frac) · (1 − f). Warm-up in time, not steps, so the slower
    side is not left warming up for a larger share of its budget."""

    def __init__(self, warmup_frac: float, budget_s: float):
        self.warmup_frac, self.budget_s, self.start = max(1e-6, warmup_frac), budget_s, None

    def begin(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """The share of the budget spent since ``begin()``, in [0, 1]."""
        return 0.0 if self.start is None else min(1.0, (time.perf_counter() - self.start) / self.budget_s)

    def __call__(self, step: int) -> float:
        f = self.elapsed()
        return min(1.0, f / self.warmup_frac) * (1.0 - f)


def budget_row_length(seq_len: int, start: int, warmup_frac: float, clock: BudgetSchedule) -> Callable[[], int]:
    """Our sequence-length warm-up in wall-clock time: the pipeline's step schedule on 10,000 ticks per budget."""
    length = seq_len_schedule(seq_len, min(start, seq_len), round(warmup_frac * 10_000))
    return lambda: length(int(10_000 * clock.elapsed()))


def adamw(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, fused=True)


def decay_groups(model: torch.nn.Module) -> list[dict]:
    """Our rule for any model: weight decay on Linear weights only, never on embeddings (the tied decoder of an MLM
    head is the word embedding), biases or LayerNorms. Given to HF too, so both sides regularise the same tensors."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay = {id(m.weight): m.weight for m in model.modules()
             if isinstance(m, torch.nn.Linear) and id(m.weight) not in embeddings}
    rest = {id(p): p for p in model.parameters() if id(p) not in decay}
    return [{"params": list(decay.values()), "weight_decay": WEIGHT_DECAY},
            {"params": list(rest.values()), "weight_decay": 0.0}]


def train_ours(args: argparse.Namespace, config: ModelConfig, loader: PretrainLoader, budget_s: float
               ) -> tuple[XLMModel, dict]:
    torch.manual_seed(args.seed)
    model = XLMModel(config)
    optimizer = adamw(decay_groups(model), args.lr)
    schedule = BudgetSchedule(args.warmup_frac, budget_s)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    masking = MaskingConfig(rate=args.mask_rate)
    row_length = budget_row_length(args.seq, args.row_start, args.row_warmup, schedule)

    def loss_fn(mod, batch):
        generator = torch.Generator().manual_seed(batch.chunk_seed)
        return mlm_loss(mod, batch.cut_rows(row_length()).model_inputs(), masking, generator)

    trainer = Trainer(model, optimizer, scheduler, loss_fn, clip_norm=CLIP)
    start = time.perf_counter()
    schedule.begin()
    tokens = 0
    while time.perf_counter() - start < budget_s:
        micro_batches = next(loader)
        result = trainer.train_step(micro_batches)
        tokens += sum(b.n_tokens for b in micro_batches)
        if trainer.step % 50 == 0:
            print(f"  ours step {trainer.step}: loss {result.loss:.3f}  {tokens / (time.perf_counter() - start):.0f} "
                  f"tokens/s", file=sys.stderr)
    elapsed = time.perf_counter() - start
    return model.eval(), {"steps": trainer.step, "train_s": elapsed,
                          "tokens_per_s": trainer.step * args.batch * args.seq / elapsed}


class LoaderBlocks(torch.utils.data.IterableDataset):
    """Our loader's blocks, one sequence at a time, in its order: HF's Trainer batches them back to the same steps."""

    def __init__(self, loader: PretrainLoader):
        self.loader = loader

    def __iter__(self):
        for micro_batches in self.loader:
            for batch in micro_batches:
                for row in batch.input_ids:
                    yield {"input_ids": row}


def hf_tokenizer(tokenizer: Tokenizer, max_length: int, folder: Path):
    """The tokenizer files the export stage writes, loaded with AutoTokenizer (the peer's own masking needs it)."""
    from transformers import AutoTokenizer

    spm = read_spm_model(tokenizer.model_path.read_bytes())
    files = {"tokenizer.json": tokenizer_json(spm, tokenizer.vocab_size),
             "tokenizer_config.json": tokenizer_config(tokenizer.vocab_size, max_length),
             "special_tokens_map.json": special_tokens_map()}
    for name, obj in files.items():
        (folder / name).write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    (folder / "sentencepiece.bpe.model").write_bytes(tokenizer.model_path.read_bytes())
    return AutoTokenizer.from_pretrained(str(folder))


def train_hf(args: argparse.Namespace, config: ModelConfig, loader: PretrainLoader, tokenizer: Tokenizer,
             budget_s: float, work: Path) -> tuple[XLMModel, dict]:
    from transformers import (DataCollatorForLanguageModeling, Trainer as HFTrainer, TrainerCallback,
                              TrainingArguments, XLMRobertaConfig, XLMRobertaForMaskedLM)

    hf_tok = hf_tokenizer(tokenizer, config.max_positions, work)
    torch.manual_seed(args.seed)
    hf_cfg = hf_config(config)
    model = XLMRobertaForMaskedLM(XLMRobertaConfig(**hf_cfg, attn_implementation="sdpa"))

    schedule = BudgetSchedule(args.warmup_frac, budget_s)

    class BudgetTrainer(HFTrainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, schedule)
            return self.lr_scheduler

    class Budget(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kwargs):
            self.start = time.perf_counter()
            schedule.begin()

        def on_step_end(self, targs, state, control, **kwargs):
            if time.perf_counter() - self.start >= budget_s:
                control.should_training_stop = True
            if state.global_step % 50 == 0:
                print(f"  hf step {state.global_step}", file=sys.stderr)

        def on_train_end(self, targs, state, control, **kwargs):
            self.end = time.perf_counter()

    budget = Budget()
    targs = TrainingArguments(
        output_dir=str(work / "hf-out"), max_steps=10 ** 7, per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, max_grad_norm=CLIP,
        use_cpu=True, seed=args.seed, report_to="none",   # ours trains on the CPU too
        save_strategy="no", logging_steps=50, dataloader_num_workers=0, dataloader_pin_memory=False,
        disable_tqdm=True)
    collator = DataCollatorForLanguageModeling(hf_tok, mlm=True, mlm_probability=args.mask_rate)
    trainer = BudgetTrainer(model=model, args=targs, train_dataset=LoaderBlocks(loader), data_collator=collator,
                            callbacks=[budget], optimizers=(adamw(decay_groups(model), args.lr), None))
    trainer.train()
    elapsed = budget.end - budget.start
    steps = trainer.state.global_step
    ours_state, ours_config = from_hf(model.state_dict(), {**hf_cfg, "model_type": "xlm-roberta"})
    scored = XLMModel(ours_config)
    scored.load_state_dict(ours_state)
    return scored.eval(), {"steps": steps, "train_s": elapsed, "tokens_per_s": steps * args.batch * args.seq / elapsed}


def held_out(model: XLMModel, args: argparse.Namespace, test_dir: Path, languages: list[str],
             tokenizer: Tokenizer) -> dict[str, dict[str, float]]:
    out = {}
    for lang in languages:
        batches = iter_eval_batches(test_dir, languages, "mlm", lang, args.seq, args.batch,
                                    max_batches=args.eval_batches, seed=args.seed, tokenizer=tokenizer)
        score, _ = masked_lm_score(model, batches, 0.15, torch.device("cpu"))
        out[lang] = {"loss": score.loss, "accuracy": score.accuracy, "targets": score.targets}
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shards = args.project / "data" / "shards"
    tokenizer = Tokenizer.load(args.project / "data" / "tokenizer")
    if not (shards / "train").is_dir():
        raise SystemExit(f"{shards / 'train'}: not found; run `dvc repro shard` in {args.project} first")
    languages = args.languages or _train_languages(shards, tokenizer)
    config = project_defaults(args, tokenizer.vocab_size)
    budget_s = args.minutes * 60
    runs, scores = {}, {}
    with tempfile.TemporaryDirectory(prefix="xlm-quality-") as tmp:
        sides = [args.only] if args.only else ["hf", "ours"]
        for side in sides:
            print(f"training {side} for {args.minutes:g} min ...", file=sys.stderr)
            loader = make_loader(args, shards / "train", languages, tokenizer)
            try:
                if side == "ours":
                    model, runs[side] = train_ours(args, config, loader, budget_s)
                else:
                    model, runs[side] = train_hf(args, config, loader, tokenizer, budget_s, Path(tmp))
            finally:
                loader.close()
            scores[side] = held_out(model, args, shards / args.split, languages, tokenizer)

    print(f"\nequal wall-clock: {args.minutes:g} min each; {config.n_layers} × {config.d_model} (FFN {config.d_ff}, "
          f"init std {config.init_std}), vocab {config.vocab_size}, seq {args.seq} × batch {args.batch}, lr {args.lr:g}, "
          f"mask {args.mask_rate:g}; ours' row warm-up: {args.row_warmup:.0%} of the budget; held-out split: "
          f"{args.split}, {args.eval_batches} batches per language")
    for side, run in runs.items():
        print(f"  {side:<5} {run['steps']:>6} steps  {run['tokens_per_s']:>7.0f} tokens/s")
    header = f"{'language':<10}" + "".join(f"{side + ' loss':>11}{side + ' acc':>10}" for side in runs)
    print(header + ("   ours lower?" if len(runs) == 2 else ""))
    for lang in languages:
        cells = "".join(f"{scores[s][lang]['loss']:>11.3f}{scores[s][lang]['accuracy']:>10.1%}" for s in runs)
        verdict = ""
        if len(runs) == 2:
            verdict = "   yes" if scores["ours"][lang]["loss"] < scores["hf"][lang]["loss"] else "   NO"
        print(f"{lang:<10}{cells}{verdict}")
    result = {"bench": "quality_vs_hf", "minutes": args.minutes, "runs": runs, "held_out": scores,
              "split": args.split, "model": {"n_layers": config.n_layers, "d_model": config.d_model,
                                             "d_ff": config.d_ff, "init_std": config.init_std},
              "seq": args.seq, "batch": args.batch, "lr": args.lr, "mask_rate": args.mask_rate,
              "ours_row_warmup": args.row_warmup}
    if len(runs) == 2:
        result["ours_lower_on_every_language"] = all(
            scores["ours"][lang]["loss"] < scores["hf"][lang]["loss"] for lang in languages)
        result["perplexity_ratio_hf_over_ours"] = {
            lang: math.exp(scores["hf"][lang]["loss"] - scores["ours"][lang]["loss"]) for lang in languages}
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


def _train_languages(shards: Path, tokenizer: Tokenizer) -> list[str]:
    from xlm_core.data import open_split

    return list(open_split(shards / "train", tokenizer=tokenizer).lang_tokens)


if __name__ == "__main__":
    main()
