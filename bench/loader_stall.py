"""Does the training step ever wait on the data loader? Measures xlm_core.data.PretrainLoader on synthetic shards.

Writes shards of realistic size (default: 3 mono shards of 200k rows, 5 languages interleaved, 5..60 ids per sentence;
1 para shard) in the shard stage's exact format, then reports:

- shard load: read + sha256 check + language filter + permutation of one shard for one stream;
- production: seconds per step with no prefetch (what a rank pays per step, all of it on the loader thread), for
  1 rank and for rank 0 of 8 (every rank walks the whole global batch, so this is the DDP overhead);
- stall: with prefetch on and a simulated step time, how long ``next(loader)`` blocks in steady state (mean, p99,
  max), and how long the first step takes (every stream's first shard is read at start-up).

    python bench/loader_stall.py --step-ms 50 --steps 300
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from xlm_core.atomic import sha256_file  # noqa: E402
from xlm_core.data import PretrainLoader, open_split, read_mono_rows  # noqa: E402
from xlm_core.shards import LANG_TYPE, ShardResult, build_manifest, shard_schema  # noqa: E402

LANGS = ["en", "fr", "es", "ru", "ar"]
PAIRS = ["en-fr", "en-es"]


def _ragged(rng: np.random.Generator, n: int, low: int, high: int) -> tuple[pa.ListArray, np.ndarray]:
    lengths = rng.integers(low, high + 1, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = rng.integers(4, 8000, size=int(offsets[-1])).astype(np.uint16)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)), lengths


def _groups(keys: np.ndarray, names: list[str], **tokens: np.ndarray) -> dict:
    out = {}
    for i, name in enumerate(names):
        sel = keys == i
        if sel.any():
            out[name] = {"rows": int(sel.sum()), **{k: int(v[sel].sum()) for k, v in tokens.items()}}
    return out


def write_shards(split_dir: Path, rows_per_shard: int, mono_shards: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    split_dir.mkdir(parents=True, exist_ok=True)
    results = []
    weights = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    for index in range(mono_shards):
        ids, lengths = _ragged(rng, rows_per_shard, 5, 60)
        langs = rng.choice(len(LANGS), size=rows_per_shard, p=weights)
        lang = pa.DictionaryArray.from_arrays(pa.array(langs.astype(np.int32)), LANGS).cast(LANG_TYPE)
        table = pa.table({"id": pa.array([f"m{index}:{i}" for i in range(rows_per_shard)]), "lang": lang,
                          "ids": ids, "length": pa.array(lengths.astype(np.int32))},
                         schema=shard_schema("mono", pa.uint16()))
        name = f"mono-{index:05d}.parquet"
        pq.write_table(table, split_dir / name, compression="zstd", row_group_size=10_000)
        groups = _groups(langs, LANGS, tokens=lengths)
        results.append(ShardResult("train", "mono", name, rows_per_shard, int(lengths.sum()),
                                   sha256_file(split_dir / name), groups))
    n = rows_per_shard // 2
    src, src_len = _ragged(rng, n, 5, 60)
    tgt, tgt_len = _ragged(rng, n, 5, 60)
    pair = rng.integers(0, len(PAIRS), size=n)
    src_lang = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), ["en"]).cast(LANG_TYPE)
    tgt_lang = pa.DictionaryArray.from_arrays(pa.array(pair.astype(np.int32)), ["fr", "es"]).cast(LANG_TYPE)
    table = pa.table({"id": pa.array([f"p{i}" for i in range(n)]), "src_lang": src_lang, "tgt_lang": tgt_lang,
                      "src_ids": src, "tgt_ids": tgt, "src_length": pa.array(src_len.astype(np.int32)),
                      "tgt_length": pa.array(tgt_len.astype(np.int32))}, schema=shard_schema("para", pa.uint16()))
    pq.write_table(table, split_dir / "para-00000.parquet", compression="zstd", row_group_size=10_000)
    results.append(ShardResult("train", "para", "para-00000.parquet", n, int(src_len.sum() + tgt_len.sum()),
                               sha256_file(split_dir / "para-00000.parquet"),
                               _groups(pair, PAIRS, tokens=src_len + tgt_len, src_tokens=src_len, tgt_tokens=tgt_len)))
    tok = SimpleNamespace(sha256="0" * 64, vocab_size=8002, ids_dtype=np.dtype(np.uint16))
    (split_dir / "manifest.json").write_text(json.dumps(build_manifest("train", results, tok, rows_per_shard)))


def time_shard_load(split_dir: Path) -> float:
    split = open_split(split_dir)
    file = split.files("mono", "en")[0]
    t0 = time.perf_counter()
    rows = read_mono_rows(split, file, "en")
    np.random.default_rng(0).permutation(rows.rows)
    return time.perf_counter() - t0


def production_s_per_step(split_dir: Path, steps: int, **kwargs) -> float:
    with PretrainLoader(split_dir, prefetch=0, **kwargs) as loader:
        for _ in range(3):                 # warm-up: first shard loads
            next(loader)
        t0 = time.perf_counter()
        for _ in range(steps):
            next(loader)
        return (time.perf_counter() - t0) / steps


def stall(split_dir: Path, steps: int, step_s: float, warmup: int = 20, **kwargs) -> dict:
    """Blocking time of next() in steady state (after ``warmup`` steps, while every stream's first shard loads)."""
    waits = []
    with PretrainLoader(split_dir, prefetch=4, **kwargs) as loader:
        t0 = time.perf_counter()
        next(loader)
        first = time.perf_counter() - t0
        for _ in range(warmup):
            next(loader)
            time.sleep(step_s)
        for _ in range(steps):
            t0 = time.perf_counter()
            next(loader)
            waits.append(time.perf_counter() - t0)
            time.sleep(step_s)             # the GPU step (the GIL is free, as while waiting on CUDA)
    w = np.array(waits) * 1000
    return {"first_step_s": round(first, 3), "mean_ms": round(float(w.mean()), 3), "p99_ms": round(float(np.percentile(w, 99)), 3),
            "max_ms": round(float(w.max()), 3), "steps_over_1ms": int((w > 1).sum()), "steps": steps}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows-per-shard", type=int, default=200_000)
    ap.add_argument("--mono-shards", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-per-rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--step-ms", type=float, default=50.0)
    ap.add_argument("--dir", type=Path, default=None, help="reuse/keep shards here (default: a temporary folder)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        split_dir = args.dir or Path(tmp) / "train"
        if not (split_dir / "manifest.json").exists():
            t0 = time.perf_counter()
            write_shards(split_dir, args.rows_per_shard, args.mono_shards)
            print(f"wrote shards in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        common = dict(languages=LANGS, pairs=PAIRS, objectives={"mlm": 1.0, "tlm": 0.5}, alpha=0.3,
                      seq_len=args.seq_len, seed=0, pin_memory=False)
        b = args.batch_per_rank
        report = {
            "shard_load_s": round(time_shard_load(split_dir), 4),
            "stream_1rank_s_per_step": round(production_s_per_step(split_dir, args.steps, batch_size=b,
                                                                   **common), 5),
            "stream_rank0_of_8_s_per_step": round(production_s_per_step(split_dir, args.steps, batch_size=8 * b,
                                                                        world_size=8, rank=0, **common), 5),
            "sentence_1rank_s_per_step": round(production_s_per_step(
                split_dir, args.steps, batch_size=b, mode="sentence", token_budget=b * args.seq_len, **common), 5),
            "stall_stream_1rank": stall(split_dir, args.steps, args.step_ms / 1000, batch_size=b, **common),
            "stall_stream_rank0_of_8": stall(split_dir, args.steps, args.step_ms / 1000, batch_size=8 * b,
                                             world_size=8, rank=0, **common),
        }
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
