"""Tokens/s, MFU and peak RSS of full MLM training steps: ours against Hugging Face's XLM-R, side by side in one run.

    python bench/train_step.py                               # the issue's config, fp32 and bf16 where the CPU has it
    python bench/train_step.py --dtypes fp32 --dropout 0.1 0.0 --repeats 7 --json bench/results/train_step.json

A step is mask → forward → backward → AdamW (fused) at vocab 32k, d 256, 4 layers, 4 heads, FFN 1024,
seq 128 × batch 32, 15 % MLM by default. Candidates:

- ``ours``          xlm_core.model.XLMModel, eager (SDPA attention, vocabulary head on the masked positions only);
- ``ours-compile``  the same model under ``torch.compile`` (the first warm-up step compiles; not timed);
- ``hf-eager``      transformers ``XLMRobertaForMaskedLM``, ``attn_implementation="eager"``;
- ``hf-sdpa``       the same with ``attn_implementation="sdpa"``.

They run in one process, interleaved (A B C D A B C D ...), and each figure is a median with its min/max: these machines
are noisy, so only same-run ratios mean anything. The matmul peak (``torch.mm`` of 2048², all threads, per dtype) is
measured in the same run, before and after the steps (the higher is kept), and every row gets:

- MFU: 6 · N (all parameters, tied decoder once) · tokens/s ÷ peak, the usual model FLOPs utilisation;
- HFU: the work actually done ÷ peak: ours projects only the masked 15 % onto the vocabulary, HF every position
  (``XLMModel.flops_per_token``); attention's 12 · L · T · d counted for both.

Peak RSS is taken per candidate in a child process (``--rss-of``) that runs its warm-up and two steps alone, so one
candidate's memory does not hide another's. bf16 rows run under ``torch.autocast("cpu", bfloat16)``; on a CPU without
native bf16 (no avx512_bf16/amx_bf16) they would measure emulation, so they are skipped with the reason (``--force-bf16``
measures them anyway). Output: a table, then one JSON line per row.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from xlm_core.model import XLMModel  # noqa: E402
from xlm_core.model_config import ModelConfig  # noqa: E402
from xlm_core.masking import mask_tokens  # noqa: E402
from xlm_core.objectives import mlm_loss  # noqa: E402
from xlm_core.settings import MaskingConfig  # noqa: E402
from xlm_core.train.runtime import measure_peak_flops  # noqa: E402

Step = Callable[[], None]
CANDIDATES = ("ours", "ours-compile", "hf-eager", "hf-sdpa")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dropout", type=float, nargs="+", default=[0.1],
                   help="dropout values to measure (hidden and attention dropout alike; XLM-R uses 0.1)")
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=list(CANDIDATES))
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per candidate (compile happens in the first)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per candidate, interleaved")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, all cores)")
    p.add_argument("--force-bf16", action="store_true", help="measure bf16 even without native bf16 matmuls")
    p.add_argument("--no-rss", action="store_true", help="skip the per-candidate peak RSS child processes")
    p.add_argument("--json", type=Path, default=None, help="also write all rows here (a JSON list)")
    p.add_argument("--rss-of", nargs=3, metavar=("CANDIDATE", "DTYPE", "DROPOUT"), help=argparse.SUPPRESS)
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
    return torch.optim.AdamW(params, lr=1e-4, fused=True)   # the pipeline's optimizer (fused on CPU: torch >= 2.4)


def make_ours_step(args: argparse.Namespace, dropout: float, compile_: bool) -> Step:
    model = XLMModel(model_config(args, dropout)).train()
    optimizer = adamw(model.optimizer_param_groups(weight_decay=0.01))
    runnable = torch.compile(model) if compile_ else model   # applied from outside, as pipeline/pretrain.py does
    batch = {"input_ids": token_batch(args)}
    masking, generator = MaskingConfig(), torch.Generator().manual_seed(1)

    def step() -> None:
        loss, _ = mlm_loss(runnable, batch, masking, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_hf_step(args: argparse.Namespace, dropout: float, attention: str) -> Step:
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    from xlm_core.hf import hf_config

    config = XLMRobertaConfig(**hf_config(model_config(args, dropout)), attn_implementation=attention)
    model = XLMRobertaForMaskedLM(config).train()
    assert model.config._attn_implementation == attention
    optimizer = adamw(model.parameters())
    input_ids = token_batch(args)
    masking, generator = MaskingConfig(), torch.Generator().manual_seed(1)

    def step() -> None:  # the same masking as ours; HF's loss ignores the -100 labels
        masked = mask_tokens(input_ids, args.vocab, masking, generator)
        labels = torch.full_like(input_ids, -100).view(-1).index_copy(0, masked.target_index, masked.targets)
        model(input_ids=masked.input_ids, labels=labels.view_as(input_ids)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_step(args: argparse.Namespace, candidate: str, dtype: str, dropout: float) -> Step:
    if candidate in ("ours", "ours-compile"):
        step = make_ours_step(args, dropout, compile_=candidate == "ours-compile")
    else:
        step = make_hf_step(args, dropout, attention=candidate.removeprefix("hf-"))
    if dtype == "fp32":
        return step

    def autocast_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step()

    return autocast_step


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (otherwise torch emulates it, 10-100× slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def matmul_peak_gflops(dtype: str, n: int = 2048) -> float:
    """The CPU's measured matmul peak in ``dtype`` (xlm_core.train.runtime: the one measurement, as pretrain logs)."""
    return measure_peak_flops(torch.device("cpu"), {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], n) / 1e9


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


def child_peak_rss_mib(args: argparse.Namespace, candidate: str, dtype: str, dropout: float) -> float | None:
    """Peak RSS of a process that builds one candidate and runs its warm-up and two steps, nothing else."""
    argv = [sys.executable, __file__, "--rss-of", candidate, dtype, str(dropout), "--vocab", str(args.vocab),
            "--d-model", str(args.d_model), "--layers", str(args.layers), "--heads", str(args.heads),
            "--d-ff", str(args.d_ff), "--seq", str(args.seq), "--batch", str(args.batch),
            "--warmup", str(args.warmup)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"warning: RSS run of {candidate} {dtype} failed: {proc.stderr.strip().splitlines()[-1:]}",
              file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def rss_child(args: argparse.Namespace) -> None:
    candidate, dtype, dropout = args.rss_of
    step = make_step(args, candidate, dtype, float(dropout))
    for _ in range(args.warmup + 2):
        step()
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak resident set. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a
    child started from a big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_of:
        rss_child(args)
        return []
    threads, tokens = torch.get_num_threads(), args.batch * args.seq
    skipped: list[dict] = []
    dtypes = list(args.dtypes)
    if "bf16" in dtypes and not native_bf16() and not args.force_bf16:
        dtypes.remove("bf16")
        skipped.append({"dtype": "bf16", "skipped": "this CPU has no native bf16 matmul (no avx512_bf16/amx_bf16 "
                                                    "in /proc/cpuinfo): bf16 would time emulation; --force-bf16"})
    peaks = {dtype: matmul_peak_gflops(dtype) for dtype in dtypes}
    steps = {(c, dtype, d): make_step(args, c, dtype, d)
             for dtype in dtypes for d in args.dropout for c in args.candidates}
    times = interleaved_times(steps, args.warmup, args.repeats)
    peaks = {dtype: max(peak, matmul_peak_gflops(dtype)) for dtype, peak in peaks.items()}

    flops_model = XLMModel(model_config(args, 0.0))
    rows = []
    for (candidate, dtype, dropout), t in times.items():
        per_s = sorted(tokens / w for w in t["wall_s"])
        median = statistics.median(per_s)
        ours = candidate.startswith("ours")
        utilisation = flops_model.estimate_mfu(median, peaks[dtype] * 1e9, seq_len=args.seq,
                                               projected_fraction=MaskingConfig().rate if ours else 1.0)
        rows.append({"bench": "train_step", "candidate": candidate, "dtype": dtype, "dropout": dropout,
                     "threads": threads, "tokens_per_step": tokens, "tokens_per_s": median,
                     "tokens_per_s_min": per_s[0], "tokens_per_s_max": per_s[-1],
                     "median_cpu_s": statistics.median(t["cpu_s"]), "matmul_peak_gflops": peaks[dtype],
                     "mfu": utilisation["mfu"], "hfu": utilisation["hfu"], "repeats": args.repeats})
    for row in rows:
        same = [r["tokens_per_s"] for r in rows if r["candidate"].startswith("hf")
                and (r["dtype"], r["dropout"]) == (row["dtype"], row["dropout"])]
        row["vs_best_hf"] = row["tokens_per_s"] / max(same) if same else None
        if not args.no_rss:
            row["peak_rss_mib"] = child_peak_rss_mib(args, row["candidate"], row["dtype"], row["dropout"])

    print(f"threads={threads}  tokens/step={tokens}  torch {torch.__version__}  cpu {cpu_name()}  "
          f"matmul peak: {', '.join(f'{d} {g:.0f} GFLOP/s' for d, g in peaks.items())}  "
          f"(medians of {args.repeats} interleaved steps)")
    print(f"{'candidate':<14}{'dtype':<6}{'drop':>5}{'tokens/s':>10}{'min':>8}{'max':>8}{'vs best HF':>11}"
          f"{'MFU':>6}{'HFU':>6}{'RSS MiB':>9}")
    for r in rows:
        rss = f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") else "-"
        ratio = f"{r['vs_best_hf']:.2f}x" if r["vs_best_hf"] else "-"
        print(f"{r['candidate']:<14}{r['dtype']:<6}{r['dropout']:>5}{r['tokens_per_s']:>10.0f}"
              f"{r['tokens_per_s_min']:>8.0f}{r['tokens_per_s_max']:>8.0f}{ratio:>11}"
              f"{r['mfu']:>6.0%}{r['hfu']:>6.0%}{rss:>9}")
    for s in skipped:
        print(f"skipped {s['dtype']}: {s['skipped']}")
    for r in rows + [{"bench": "train_step", **s} for s in skipped]:
        print(json.dumps(r))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows + skipped, indent=2))
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} × {os.cpu_count()}"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    main()
