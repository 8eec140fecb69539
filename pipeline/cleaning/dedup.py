"""Step 2 for one language: exact de-duplication across its sources (first occurrence wins, in source order), and
the keys of its valid/test texts (step 3 drops training rows that equal one: ``leak``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.cleaning.segments import UNIT_SCHEMA, FileResult, as_numpy, kept_mask, work_rows
from pipeline.params import CleanParams
from xlm_core.cleaning.dedup import SeenTexts
from xlm_core.cleaning.scratch import ParquetSink, read_row_groups
from xlm_core.cleaning.split import TRAIN


@dataclass
class LanguageResult:
    lang: str
    files: list[FileResult]  # same order as given, scratch paths now de-duplicated
    heldout_keys: np.ndarray  # sorted unique keys of the language's kept valid/test texts


def dedup_language(lang: str, files: list[FileResult], cfg: CleanParams, work_dir: Path) -> LanguageResult:
    """Step 2 for one language: mark later copies of a text ``duplicate`` (the first occurrence, in the order of
    ``files``, wins) and collect the keys of the language's valid/test texts."""
    if cfg.dedup:
        seen = SeenTexts(work_dir / f"seen.{lang}.sqlite")
        try:
            files = [_dedup_file(result, seen, work_rows(cfg)) for result in files]
        finally:
            seen.close()
    heldout = [_heldout_keys(result.path) for result in files]
    return LanguageResult(lang, files, np.unique(np.concatenate(heldout)))


def _dedup_file(result: FileResult, seen: SeenTexts, rows_per_group: int) -> FileResult:
    path = result.path.with_name(result.path.stem + ".dedup.parquet")
    counts = result.counts.copy()
    with ParquetSink(path, UNIT_SCHEMA, rows_per_group, scratch=True) as sink:
        for batch in read_row_groups(result.path):
            kept = kept_mask(batch)
            duplicate = np.zeros(len(kept), dtype=bool)
            duplicate[kept] = ~seen.first_seen(as_numpy(batch.column("key"))[kept])
            if duplicate.any():
                counts.dropped["duplicate"] += int(duplicate.sum())
                dropped_by = pc.if_else(pa.array(duplicate), "duplicate", batch.column("dropped_by"))
                batch = batch.set_column(batch.schema.get_field_index("dropped_by"), "dropped_by", dropped_by)
            sink.write(batch)
    result.path.unlink()
    return FileResult(result.raw, path, counts)


def _heldout_keys(path: Path) -> np.ndarray:
    """Keys of the kept valid/test texts of one scratch file."""
    keys = [np.zeros(0, dtype=np.int64)]
    for batch in read_row_groups(path, columns=["split", "key", "dropped_by"]):
        heldout = kept_mask(batch) & (as_numpy(batch.column("split")) != TRAIN)
        keys.append(as_numpy(batch.column("key"))[heldout])
    return np.concatenate(keys)
