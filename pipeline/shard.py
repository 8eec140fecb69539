"""shard stage: encode the clean splits into Parquet token shards with per-split manifests.

    data/clean/{mono,para}/<split>.parquet + data/tokenizer ──> data/shards/<split>/{mono,para}-NNNNN.parquet
                                                                                    + manifest.json
                                                              ──> metrics/shard.json (tokens per language / pair)

The work is a list of independent units, one per output shard: shard k of (split, kind) holds input rows
[k·rows_per_shard, (k+1)·rows_per_shard) of that clean file, in order. ``plan_shards`` lists the units,
``encode_shard`` does one (reads only its row range, encodes it in batches with sentencepiece's multithreaded batch
encoder, writes the shard) and returns a small JSON-able ``ShardResult``; the results make the manifests. A unit
depends on nothing but its inputs, so any runner (``shard.task_runner``: thread, dask or prefect; see
pipeline.fanout) produces byte-identical shards, and memory stays at one
batch per running unit whatever the corpus size. The shard format itself (schema, writer, manifest) is
xlm_core.shards', beside its reader.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from pipeline.errors import disk_full_is_an_error, run_cli
from pipeline.fanout import FanOut, run_stage
from pipeline.params import PARAMS_FILE, ShardParams, load_params
from xlm_core.atomic import atomic_dir, sha256_file, write_json
from xlm_core.shards import (KINDS, LANG_TYPE, ShardError, ShardResult, ShardSet, build_manifest, iter_row_range,
                             merge_group_counts, open_parquet, shard_name, shard_schema, shard_writer, write_manifest)
from xlm_core.tokenizer import Tokenizer

STAGE = "shard"
SPLITS = ("train", "valid", "test")
CLEAN_HINT = "run `dvc repro clean`"
INPUT_COLUMNS = {"mono": ["id", "lang", "text"], "para": ["id", "src_lang", "tgt_lang", "src", "tgt"]}


# -------------------------------------------------------------------------------------------------------------- units
@dataclass(frozen=True)
class ShardTask:
    """One output shard: rows [start, stop) of ``source`` → ``<split>/<kind>-<index>.parquet``."""

    split: str
    kind: str
    index: int
    source: str
    start: int
    stop: int

    @property
    def file_name(self) -> str:
        return shard_name(self.kind, self.index)


def plan_shards(clean_dir: str | Path, rows_per_shard: int) -> list[ShardTask]:
    """All units, in output order; opens every input first so a missing or malformed file fails before any work."""
    tasks = []
    for split in SPLITS:
        for kind in KINDS:
            source = Path(clean_dir) / kind / f"{split}.parquet"
            pf = open_parquet(source, INPUT_COLUMNS[kind], CLEAN_HINT)
            rows = pf.metadata.num_rows
            for index in range(math.ceil(rows / rows_per_shard)):
                tasks.append(ShardTask(split, kind, index, str(source), index * rows_per_shard,
                                       min((index + 1) * rows_per_shard, rows)))
    return tasks


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_dir: str, sha256: str) -> Tokenizer:
    # One load per process (threads share it: sentencepiece encoding is read-only on the model).
    tok = Tokenizer.load(tokenizer_dir)
    if tok.sha256 != sha256:
        raise ShardError(f"{tokenizer_dir} changed while the shard stage was running (sha256 {tok.sha256[:12]}, "
                         f"started with {sha256[:12]}); rerun `dvc repro shard`")
    return tok


def _codes(column: pa.ChunkedArray | pa.Array) -> pa.DictionaryArray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column if pa.types.is_dictionary(column.type) else pc.dictionary_encode(column)


def _check_no_nulls(table: pa.Table, task: ShardTask) -> None:
    for name in table.column_names:
        if table.column(name).null_count:
            raise ShardError(f"{task.source}: column {name!r} has {table.column(name).null_count} null value(s) in "
                             f"rows {task.start}..{task.stop}; {CLEAN_HINT}")


def _id_list(tok: Tokenizer, texts: list[str], threads: int) -> tuple[pa.ListArray, np.ndarray]:
    ids, offsets = tok.encode_flat(texts, threads)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids)), np.diff(offsets)


def _group_sums(codes: np.ndarray, names: list[str], **weights: np.ndarray) -> dict[str, dict]:
    """rows and summed ``weights`` per group code (vectorised with bincount)."""
    n = len(names)
    rows = np.bincount(codes, minlength=n)
    sums = {key: np.bincount(codes, weights=w, minlength=n) for key, w in weights.items()}
    return {names[i]: {"rows": int(rows[i]), **{k: int(v[i]) for k, v in sums.items()}}
            for i in range(n) if rows[i]}


def _encode_mono(table: pa.Table, tok: Tokenizer, threads: int) -> tuple[pa.Table, dict]:
    ids, lengths = _id_list(tok, table.column("text").to_pylist(), threads)
    lang = _codes(table.column("lang"))
    out = pa.table({"id": table.column("id").cast(pa.string()), "lang": lang.cast(LANG_TYPE), "ids": ids,
                    "length": pa.array(lengths.astype(np.int32))}, schema=shard_schema("mono", ids.type.value_type))
    groups = _group_sums(lang.indices.to_numpy(zero_copy_only=False), lang.dictionary.to_pylist(), tokens=lengths)
    return out, groups


def _encode_para(table: pa.Table, tok: Tokenizer, threads: int) -> tuple[pa.Table, dict]:
    src_ids, src_len = _id_list(tok, table.column("src").to_pylist(), threads)
    tgt_ids, tgt_len = _id_list(tok, table.column("tgt").to_pylist(), threads)
    src_lang, tgt_lang = _codes(table.column("src_lang")), _codes(table.column("tgt_lang"))
    out = pa.table({"id": table.column("id").cast(pa.string()), "src_lang": src_lang.cast(LANG_TYPE),
                    "tgt_lang": tgt_lang.cast(LANG_TYPE), "src_ids": src_ids, "tgt_ids": tgt_ids,
                    "src_length": pa.array(src_len.astype(np.int32)), "tgt_length": pa.array(tgt_len.astype(np.int32))},
                   schema=shard_schema("para", src_ids.type.value_type))
    src_names, tgt_names = src_lang.dictionary.to_pylist(), tgt_lang.dictionary.to_pylist()
    pair_codes = (src_lang.indices.to_numpy(zero_copy_only=False).astype(np.int64) * len(tgt_names)
                  + tgt_lang.indices.to_numpy(zero_copy_only=False))
    pair_names = [f"{s}-{t}" for s in src_names for t in tgt_names]
    groups = _group_sums(pair_codes, pair_names, tokens=src_len + tgt_len, src_tokens=src_len, tgt_tokens=tgt_len)
    return out, groups


def encode_shard(task: ShardTask, *, tokenizer_dir: str, tokenizer_sha256: str, out_dir: str, batch_rows: int,
                 threads: int, progress: Optional[Callable[[int], object]] = None) -> ShardResult:
    """Do one unit: encode rows [start, stop) of the task's clean file into ``out_dir/<split>/<file>``."""
    tok = _tokenizer(str(tokenizer_dir), tokenizer_sha256)
    encode = _encode_mono if task.kind == "mono" else _encode_para
    pf = open_parquet(task.source, INPUT_COLUMNS[task.kind], CLEAN_HINT)
    path = Path(out_dir) / task.split / task.file_name
    groups: dict[str, dict] = {}
    rows = 0
    with shard_writer(path, task.kind, pa.from_numpy_dtype(tok.ids_dtype)) as writer:
        for table in iter_row_range(pf, task.start, task.stop, INPUT_COLUMNS[task.kind], batch_rows):
            _check_no_nulls(table, task)
            out, part = encode(table, tok, threads)
            writer.write_table(out, row_group_size=batch_rows)
            merge_group_counts(groups, part)
            rows += out.num_rows
            if progress is not None:
                progress(out.num_rows)
    if rows != task.stop - task.start:  # the input changed under us
        raise ShardError(f"{task.source}: read {rows} rows in {task.start}..{task.stop}, expected "
                         f"{task.stop - task.start}; the file changed while sharding: rerun `dvc repro shard`")
    return ShardResult(split=task.split, kind=task.kind, file=task.file_name, rows=rows,
                       tokens=sum(g["tokens"] for g in groups.values()), sha256=sha256_file(path),
                       groups=dict(sorted(groups.items())))


# ---------------------------------------------------------------------------------------------------------- metrics
def shard_metrics(manifests: dict[str, dict]) -> dict:
    """metrics/shard.json: rows and tokens per split, per language and per pair."""
    return {split: {key: m[key] for key in ("mono", "para", "languages", "pairs")} for split, m in manifests.items()}


# ------------------------------------------------------------------------------------------------------------- stage
def make_shards(params, clean_dir: str | Path, tokenizer_dir: str | Path,
                out_dir: str | Path, metrics_path: str | Path,
                executor: Optional[Executor] = None) -> dict:
    """Encode every clean split into ``out_dir`` (replaced as a whole); returns the manifests by split.

    ``params`` is ``load_params("shard")``. The units run on ``shard.task_runner`` (pipeline.fanout), or on
    ``executor`` (e.g. a ThreadPoolExecutor) when given; the output is the same bytes either way.
    """
    sp: ShardParams = params.shard
    tok = Tokenizer.load(tokenizer_dir)
    tasks = plan_shards(clean_dir, sp.rows_per_shard)
    total_rows = sum(t.stop - t.start for t in tasks)
    print(f"shard: {total_rows:,} rows in {len(tasks)} shard(s), tokenizer {tok.sha256[:12]} "
          f"(vocab {tok.vocab_size}, ids {tok.ids_dtype}), {sp.threads} encode threads", file=sys.stderr)
    started = time.perf_counter()
    with disk_full_is_an_error(STAGE, out_dir):
        results, manifests = _write_shards(tasks, tok, sp, tokenizer_dir, out_dir, executor)
    elapsed = time.perf_counter() - started
    tokens = sum(r.tokens for r in results)
    print(f"shard: {tokens:,} tokens in {elapsed:.1f}s ({tokens / max(elapsed, 1e-9):,.0f} tokens/s)", file=sys.stderr)
    write_json(metrics_path, shard_metrics(manifests))
    return manifests


def _write_shards(tasks: list[ShardTask], tok: Tokenizer, sp: ShardParams, tokenizer_dir: str | Path,
                  out_dir: str | Path, executor: Optional[Executor]) -> tuple[list[ShardResult], dict[str, dict]]:
    """Every unit into a temporary sibling of ``out_dir``, manifests included, then swapped in as a whole."""
    with atomic_dir(out_dir) as tmp, \
            tqdm(total=sum(t.stop - t.start for t in tasks), desc="shard", unit="rows", file=sys.stderr,
                 mininterval=1.0) as bar:
        for split in SPLITS:
            (tmp / split).mkdir()
        # Units get absolute paths (Dask workers may run in another folder); progress counts finished shards.
        unit_kwargs = {"tokenizer_dir": str(Path(tokenizer_dir).absolute()), "tokenizer_sha256": tok.sha256,
                       "out_dir": str(tmp.absolute()), "batch_rows": sp.batch_rows, "threads": sp.threads}
        calls = [(replace(task, source=str(Path(task.source).absolute())),) for task in tasks]

        def encode_all(fan: FanOut) -> list[ShardResult]:
            return fan.map(encode_shard, calls, kwargs=unit_kwargs, names=[f"{t.split}/{t.file_name}" for t in tasks],
                           on_done=lambda result: bar.update(result.rows))

        # Each unit encodes with sp.threads threads of its own.
        results = run_stage(STAGE, sp, encode_all, workers=(os.cpu_count() or 1) // sp.threads, executor=executor)
        manifests = {split: build_manifest(split, [r for r in results if r.split == split], tok, sp.rows_per_shard)
                     for split in SPLITS}
        for split, manifest in manifests.items():
            write_manifest(tmp / split, manifest)
    return results, manifests


def check_shards(tokenizer_dir: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Verify every split's shards (sha256) and that they were made with ``tokenizer_dir``; files checked per split."""
    tok = Tokenizer.load(tokenizer_dir)
    return {split: ShardSet(Path(out_dir) / split, tokenizer=tok).verify() for split in SPLITS}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.shard", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    parser.add_argument("--clean-dir", default="data/clean", help="clean stage output (default: %(default)s)")
    parser.add_argument("--tokenizer-dir", default="data/tokenizer", help="tokenizer folder (default: %(default)s)")
    parser.add_argument("--out-dir", default="data/shards", help="shards folder (default: %(default)s)")
    parser.add_argument("--metrics", default="metrics/shard.json", help="metrics file (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="only verify existing shards (checksums, tokenizer hash); writes nothing")
    args = parser.parse_args(argv)

    def run() -> None:
        if args.check:
            checked = check_shards(args.tokenizer_dir, args.out_dir)
            print(f"shard: ok: {', '.join(f'{s} {n} file(s)' for s, n in checked.items())} match their manifests "
                  f"and {args.tokenizer_dir}", file=sys.stderr)
            return
        make_shards(load_params(STAGE, args.params), args.clean_dir, args.tokenizer_dir, args.out_dir, args.metrics)

    return run_cli(STAGE, run)


if __name__ == "__main__":
    sys.exit(main())
