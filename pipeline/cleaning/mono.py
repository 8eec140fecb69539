"""Step 3, one sequential pass (it needs every language's valid/test keys and writes the mono files in plan order):
drop training rows whose text is a valid/test text of any language (``leak``) or, with ``clean.decontaminate``, a
text of an evaluation suite in the same language (``decontaminated``), write mono/{split}.parquet, and load the rows
of the files a pair reads into the SegmentStore (so a pair with a dropped side is dropped too)."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.cleaning.pairs import SegmentStore
from pipeline.cleaning.plan import Plan
from pipeline.cleaning.segments import FileResult, as_numpy, kept_mask
from pipeline.params import CleanParams
from xlm_core.cleaning.scratch import ParquetSink, read_row_groups
from xlm_core.cleaning.split import SPLITS, TRAIN

MONO_SCHEMA = pa.schema([("id", pa.string()), ("lang", pa.string()), ("text", pa.string())])


def _in_sorted(values: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    if len(sorted_keys) == 0:
        return np.zeros(len(values), dtype=bool)
    pos = np.searchsorted(sorted_keys, values).clip(max=len(sorted_keys) - 1)
    return sorted_keys[pos] == values


def write_mono(files: list[FileResult], heldout_keys: np.ndarray, out_dir: Path, cfg: CleanParams,
               store: SegmentStore, plan: Plan, eval_keys: dict[str, np.ndarray] | None = None) -> None:
    """Step 3: drop training rows whose text is a valid/test text (``leak``) or one of ``eval_keys[lang]`` (sorted
    keys of the language's evaluation-suite texts: ``decontaminated``, when clean.decontaminate), write
    mono/{split}.parquet in plan order, and hand the rows of files some pair reads (with why they were dropped) to
    the SegmentStore. Adds those drops and the rows out to each result's counts."""
    eval_keys = eval_keys if cfg.decontaminate and eval_keys else {}
    no_keys = np.zeros(0, dtype=np.int64)
    (out_dir / "mono").mkdir()
    total = sum(pq.ParquetFile(f.path).metadata.num_rows for f in files)
    with (contextlib.ExitStack() as stack,
          tqdm(total=total, unit="rows", desc="clean: mono splits", file=sys.stderr, mininterval=1.0,
               leave=False) as bar):
        sinks = [stack.enter_context(ParquetSink(out_dir / "mono" / f"{name}.parquet", MONO_SCHEMA, cfg.batch_rows))
                 for name in SPLITS]
        for result in files:
            raw = result.raw
            paired = plan.in_a_pair(raw)
            for batch in read_row_groups(result.path):
                kept = kept_mask(batch)
                split = as_numpy(batch.column("split"))
                keys = as_numpy(batch.column("key"))
                leak = kept & (split == TRAIN) & _in_sorted(keys, heldout_keys)
                kept &= ~leak
                # Only the same language: a UI string in English is not contaminated by its French translation.
                decontaminated = kept & (split == TRAIN) & _in_sorted(keys, eval_keys.get(raw.lang, no_keys))
                kept &= ~decontaminated
                result.counts.dropped["leak"] += int(leak.sum())
                result.counts.dropped["decontaminated"] += int(decontaminated.sum())
                for s, sink in enumerate(sinks):
                    rows = batch.filter(pa.array(kept & (split == s)))
                    result.counts.rows_out[s] += rows.num_rows
                    sink.write(pa.table({"id": rows.column("id"), "lang": pa.repeat(raw.lang, rows.num_rows),
                                         "text": rows.column("text")}, schema=MONO_SCHEMA))
                if paired:
                    store.add(raw.source, raw.lang, _store_rows(batch, split, kept, leak, decontaminated))
                bar.update(batch.num_rows)
            result.path.unlink()


def _store_rows(batch: pa.Table, split: np.ndarray, kept: np.ndarray, leak: np.ndarray,
                decontaminated: np.ndarray) -> Iterator[tuple]:
    """(id, split, text of a kept row or None, dropped_by) per row, as SegmentStore.add takes them."""
    texts = pc.if_else(pa.array(kept), batch.column("text"), pa.scalar(None, pa.string()))
    dropped_by = pc.if_else(pa.array(leak), "leak", batch.column("dropped_by"))
    dropped_by = pc.if_else(pa.array(decontaminated), "decontaminated", dropped_by)
    return zip(batch.column("id").to_pylist(), split.tolist(), texts.to_pylist(), dropped_by.to_pylist())
