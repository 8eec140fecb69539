"""Step 1 for one raw file (source x language): read line by line, decode, normalise, filter, split by id.

Its result is a scratch Parquet file (UNIT_SCHEMA) with one row per line that has an id, kept or not, so pairs can
say why a row was dropped; steps 2 and 3 read it back a row group at a time.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline.cleaning.counts import Counts
from pipeline.cleaning.filters import LANG_FILTERS, segment_filters
from pipeline.cleaning.plan import RawFile
from pipeline.params import CleanParams
from xlm_core.cleaning.decode import decode_line
from xlm_core.cleaning.filters import SegmentFilter, first_drops
from xlm_core.cleaning.scratch import ParquetSink
from xlm_core.cleaning.split import TRAIN, salt_key, split_of
from xlm_core.lines import bounded_lines
from xlm_core.text import normalize_text, text_key

UNIT_SCHEMA = pa.schema([("id", pa.string()), ("split", pa.int8()), ("key", pa.int64()), ("text", pa.string()),
                         ("dropped_by", pa.string())])

# Rows handled at once in Python (decode, filter, de-duplicate, join): bounds the working memory whatever
# clean.batch_rows (the row-group size of the outputs) is set to. Python objects cost ~1.5 KB per row here.
WORK_ROWS = 8192


def work_rows(cfg: CleanParams) -> int:
    return min(cfg.batch_rows, WORK_ROWS)


def line_limit(cfg: CleanParams) -> int:
    # Bytes read per line at most: beyond this a line is too long whatever HTML stripping removes (4 bytes/char max).
    return max(1 << 20, 16 * cfg.max_chars)


def kept_mask(batch: pa.Table) -> np.ndarray:
    return batch.column("dropped_by").is_null().to_numpy(zero_copy_only=False)


def as_numpy(column: pa.ChunkedArray, fill: int = 0) -> np.ndarray:
    return column.fill_null(fill).to_numpy(zero_copy_only=False)


@dataclass
class FileResult:
    raw: RawFile
    path: Path  # its scratch Parquet file (UNIT_SCHEMA)
    counts: Counts


def _filter_batch(lines: list[tuple[bytes, bool]], filters: tuple[SegmentFilter, ...], cfg: CleanParams,
                  salt: bytes) -> dict[str, list]:
    """Columns (UNIT_SCHEMA) for one batch of raw lines: normalised text, or the reason the line was dropped."""
    ids, texts, dropped = [], [], []
    for line, over in lines:
        seg_id, text, reason = decode_line(line, over)
        if text is not None:
            text = normalize_text(text, cfg.normalization, cfg.strip_html)
        ids.append(seg_id)
        texts.append(text)
        dropped.append(reason)
    for i, reason in enumerate(first_drops(filters, texts)):
        if reason is not None:
            texts[i], dropped[i] = None, reason
    frac = cfg.split
    splits = [split_of(i, salt, frac.valid, frac.test) if i is not None else TRAIN for i in ids]
    keys = [text_key(t) if t is not None else None for t in texts]
    return {"id": ids, "split": splits, "key": keys, "text": texts, "dropped_by": dropped}


def clean_file(raw: RawFile, cfg: CleanParams, out_path: Path) -> FileResult:
    """Step 1 for one raw file: stream its lines into ``out_path`` (one row per line with an id) and count."""
    counts = Counts(LANG_FILTERS)
    filters = segment_filters(cfg, raw.lang)
    salt = salt_key(cfg.split_salt)
    rows = work_rows(cfg)
    with (open(raw.path, "rb") as fh, ParquetSink(out_path, UNIT_SCHEMA, rows, scratch=True) as sink,
          tqdm(total=raw.path.stat().st_size, unit="B", unit_scale=True, desc=f"clean {raw.source}/{raw.lang}",
               file=sys.stderr, mininterval=1.0, leave=False) as bar):
        lines = bounded_lines(fh, line_limit(cfg))
        while batch := [x for _, x in zip(range(rows), lines)]:
            columns = _filter_batch(batch, filters, cfg, salt)
            counts.rows_in += len(batch)
            counts.dropped.update(r for r in columns["dropped_by"] if r is not None)
            has_id = [i for i, seg_id in enumerate(columns["id"]) if seg_id is not None]
            if len(has_id) < len(batch):  # a line without a usable id is counted, not stored: no pair can use it
                columns = {name: [col[i] for i in has_id] for name, col in columns.items()}
            sink.write_columns(**columns)
            bar.update(sum(len(line) for line, _ in batch))
    return FileResult(raw, out_path, counts)
