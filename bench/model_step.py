"""Speed of one full MLM training step (mask, forward, backward, AdamW) for our model vs Hugging Face's XLM-R.

    python bench/model_step.py                       # the issue's config: vocab 32k, d 256, 4 layers, seq 128 × 32
    python bench/model_step.py --dropout 0.1 0.0 --repeats 7 --json bench/results/model_step.json

Candidates run in the same process, interleaved (A B A B ...), and the figure is the median per candidate: these
machines are noisy, so only same-run ratios mean anything. To add a candidate (a compiled model, bf16, another
attention kernel), write a `make_*_step(args, dropout) -> Callable[[], None]` and list it in `candidates()`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from xlm_core.model import ModelConfig, XLMModel  # noqa: E402
from xlm_core.objectives import MaskingConfig, mask_tokens, mlm_loss  # noqa: E402

Step = Callable[[], None]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dropout", type=float, nargs="+", default=[0.1, 0.0],
                   help="dropout values to measure (used for both hidden and attention dropout)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per candidate")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per candidate, interleaved")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 runs every candidate under torch.autocast(device, bfloat16)")
    p.add_argument("--peak-gflops", type=float, default=None,
                   help="matmul peak of the threads used, for MFU/HFU (default: the project's 2-core machines, "
                        "185 fp32 / 410 bf16 with 2 threads, half that with 1)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def model_config(args: argparse.Namespace, dropout: float) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
                       d_ff=args.d_ff, max_positions=max(args.seq, 512), dropout=dropout, attention_dropout=dropout)


def token_batch(args: argparse.Namespace) -> torch.Tensor:
    """`<s> pieces </s>`, no padding: the steady state of a packed pretraining batch."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, args.vocab - 1, (args.batch, args.seq), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    return ids


def adamw(params) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError):  # fused AdamW needs a recent torch on CPU
        return torch.optim.AdamW(params, lr=1e-4)


def make_ours_step(args: argparse.Namespace, dropout: float) -> Step:
    model = XLMModel(model_config(args, dropout)).train()
    optimizer = adamw(model.optimizer_param_groups(weight_decay=0.01))
    batch = {"input_ids": token_batch(args)}
    masking, generator = MaskingConfig(), torch.Generator().manual_seed(1)

    def step() -> None:
        loss, _ = mlm_loss(model, batch, masking, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_hf_step(args: argparse.Namespace, dropout: float) -> Step:
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    from xlm_core.hf import hf_config

    config = XLMRobertaConfig(**hf_config(model_config(args, dropout)), attn_implementation="sdpa")
    model = XLMRobertaForMaskedLM(config).train()
    assert model.config._attn_implementation == "sdpa"
    optimizer = adamw(model.parameters())
    input_ids = token_batch(args)
    masking, generator = MaskingConfig(), torch.Generator().manual_seed(1)

    def step() -> None:
        masked = mask_tokens(input_ids, args.vocab, masking, generator)
        labels = torch.full_like(input_ids, -100).view(-1).index_copy(0, masked.target_index, masked.targets)
        model(input_ids=masked.input_ids, labels=labels.view_as(input_ids)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def with_autocast(step: Step, dtype: str) -> Step:
    if dtype == "fp32":
        return step

    def autocast_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step()

    return autocast_step


def candidates(args: argparse.Namespace) -> dict[str, Step]:
    steps: dict[str, Step] = {}
    for dropout in args.dropout:
        steps[f"ours dropout={dropout}"] = make_ours_step(args, dropout)
        if not args.no_hf:
            steps[f"hf-sdpa dropout={dropout}"] = make_hf_step(args, dropout)
    return {name: with_autocast(step, args.dtype) for name, step in steps.items()}


def interleaved_times(steps: dict[str, Step], warmup: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds per step. CPU time (this process, all threads) is the steadier figure when other work
    shares the machine; wall time is what a run takes."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: {"wall_s": [], "cpu_s": []} for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            times[name]["cpu_s"].append(time.process_time() - cpu)
            times[name]["wall_s"].append(time.perf_counter() - wall)
    return times


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = args.batch * args.seq
    threads = torch.get_num_threads()
    if args.dtype == "bf16" and not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        print(f"warning: CPU capability {torch.backends.cpu.get_cpu_capability()} has no native bf16 matmul; "
              f"bf16 steps will be 10-100x slower than fp32 here", file=sys.stderr)
    peak = args.peak_gflops or {"fp32": 185.0, "bf16": 410.0}[args.dtype] * min(threads, 2) / 2
    times = interleaved_times(candidates(args), args.warmup, args.repeats)
    flops_model = XLMModel(model_config(args, 0.0))
    results = {}
    for name, t in times.items():
        wall, cpu = statistics.median(t["wall_s"]), statistics.median(t["cpu_s"])
        results[name] = {"median_wall_s": wall, "median_cpu_s": cpu, "tokens_per_s": tokens / wall,
                         "tokens_per_cpu_s": tokens / cpu, **t}
        if name.startswith("ours"):
            results[name].update(flops_model.estimate_mfu(tokens / wall, peak * 1e9, seq_len=args.seq,
                                                         projected_fraction=MaskingConfig().mask_rate))
    print(f"threads={threads}  dtype={args.dtype}  tokens/step={tokens}  peak={peak:.0f} GFLOP/s  "
          f"torch {torch.__version__}  (medians of {args.repeats} interleaved steps)")
    print(f"{'candidate':<24}{'wall s':>8}{'tokens/s':>10}{'vs hf':>8}{'cpu s':>8}{'vs hf':>8}{'MFU':>6}{'HFU':>6}")
    for name, r in results.items():
        hf = results.get(name.replace("ours", "hf-sdpa")) if name.startswith("ours") else None
        ratio = f"{hf['median_wall_s'] / r['median_wall_s']:.2f}x" if hf else ""
        cpu_ratio = f"{hf['median_cpu_s'] / r['median_cpu_s']:.2f}x" if hf else ""
        mfu = f"{r['mfu']:.0%}" if "mfu" in r else ""
        hfu = f"{r['hfu']:.0%}" if "hfu" in r else ""
        print(f"{name:<24}{r['median_wall_s']:>8.3f}{r['tokens_per_s']:>10.0f}{ratio:>8}{r['median_cpu_s']:>8.3f}"
              f"{cpu_ratio:>8}{mfu:>6}{hfu:>6}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))
    return results


if __name__ == "__main__":
    main()
