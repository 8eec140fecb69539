"""Step 4: each configured pair of each parallel source joined on id from the SegmentStore, the pair filters applied,
and the units' rows appended to para/{split}.parquet in plan order."""
from __future__ import annotations

import contextlib
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
from tqdm import tqdm

from pipeline.cleaning.counts import Counts
from pipeline.cleaning.filters import PAIR_FILTERS, pair_filters
from pipeline.cleaning.plan import DOWNLOAD_HINT, Plan
from pipeline.cleaning.segments import work_rows
from pipeline.errors import fail
from pipeline.fanout import FanOut
from pipeline.params import CleanParams
from xlm_core.cleaning.filters import pair_drop
from xlm_core.cleaning.scratch import ParquetSink, read_row_groups, scratch_db
from xlm_core.cleaning.split import SPLITS

PARA_SCHEMA = pa.schema([("id", pa.string()), ("src_lang", pa.string()), ("tgt_lang", pa.string()),
                         ("src", pa.string()), ("tgt", pa.string())])


class SegmentStore:
    """The final segments of the parallel sources, indexed by (source, language, id) in sqlite, to join pairs on id.

    Works whatever order the raw files list their ids in; rows come back in id order (the raw files' own order
    when, as the download stage writes them, keys are zero-padded).
    """

    def __init__(self, path: Path):
        self._db = scratch_db(path)
        self._db.execute("CREATE TABLE seg (source TEXT, lang TEXT, id TEXT, split INTEGER, text TEXT, "
                         "dropped_by TEXT)")
        self._db.execute("BEGIN")

    @classmethod
    def reader(cls, path: Path) -> "SegmentStore":
        """A read-only connection to a finished store: each pair unit (step 4) opens its own."""
        store = cls.__new__(cls)
        store._db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, isolation_level=None)
        return store

    def add(self, source: str, lang: str, rows: Iterator[tuple]) -> None:
        """rows: (id, split, text or None, dropped_by or None)."""
        self._db.executemany("INSERT INTO seg VALUES (?, ?, ?, ?, ?, ?)", ((source, lang, *row) for row in rows))

    def finish(self) -> None:
        """Index the rows (after loading them all: much faster than indexing row by row)."""
        self._db.execute("COMMIT")
        try:
            self._db.execute("CREATE UNIQUE INDEX seg_key ON seg (source, lang, id)")
        except sqlite3.IntegrityError:
            source, lang, seg_id = self._db.execute(
                "SELECT source, lang, id FROM seg GROUP BY source, lang, id HAVING count(*) > 1 LIMIT 1").fetchone()
            fail(f"source {source!r}: id {seg_id!r} appears twice in {lang}.tsv, but ids must be unique within a "
                 f"file (docs/data-layout.md); {DOWNLOAD_HINT} again")

    def join(self, source: str, src: str, tgt: str) -> Iterator[tuple]:
        """(id, split, src text, src dropped_by, tgt text, tgt dropped_by) for every id of ``source`` present in
        both languages, in id order."""
        return self._db.execute(
            "SELECT a.id, a.split, a.text, a.dropped_by, b.text, b.dropped_by FROM seg a "
            "JOIN seg b ON b.source = a.source AND b.lang = ? AND b.id = a.id "
            "WHERE a.source = ? AND a.lang = ? ORDER BY a.id", (tgt, source, src))

    def close(self) -> None:
        self._db.close()


@dataclass
class PairResult:
    counts: Counts
    paths: tuple[Path, ...]  # its kept rows per split: scratch Parquet files (PARA_SCHEMA)


def join_pair(store_path: Path, source: str, src_lang: str, tgt_lang: str, cfg: CleanParams,
              work_dir: Path) -> PairResult:
    """Step 4 for one configured pair of one parallel source: join on id, apply the pair filters, and write the kept
    rows of each split to a scratch file (a unit: it only reads the finished SegmentStore)."""
    paths = tuple(work_dir / f"para.{source}.{src_lang}-{tgt_lang}.{split}.parquet" for split in SPLITS)
    store = SegmentStore.reader(store_path)
    try:
        with contextlib.ExitStack() as stack:
            sinks = [stack.enter_context(ParquetSink(path, PARA_SCHEMA, work_rows(cfg), scratch=True))
                     for path in paths]
            counts = _join_pair(store, source, src_lang, tgt_lang, cfg, sinks)
    finally:
        store.close()
    return PairResult(counts, paths)


def write_pairs(fan: FanOut, plan: Plan, store_path: Path, work_dir: Path, out_dir: Path,
                cfg: CleanParams) -> dict[tuple[str, str, str], Counts]:
    """Step 4: join each configured pair (params order) of each of its parallel sources (manifest order) as
    independent units, then append their rows to para/{split}.parquet in that order; returns the counts per
    (source, src_lang, tgt_lang)."""
    keys = [(source, s, t) for (s, t), sources in plan.pair_sources.items() for source in sources]
    joined = fan.map(join_pair, [(store_path, *key, cfg, work_dir) for key in keys],
                     names=[f"join {source} {s}-{t}" for source, s, t in keys])
    (out_dir / "para").mkdir()
    with contextlib.ExitStack() as stack:
        sinks = [stack.enter_context(ParquetSink(out_dir / "para" / f"{name}.parquet", PARA_SCHEMA, cfg.batch_rows))
                 for name in SPLITS]
        for result in joined:
            for sink, path in zip(sinks, result.paths):
                for table in read_row_groups(path):
                    sink.write(table)
                path.unlink()
    return {key: result.counts for key, result in zip(keys, joined)}


def _join_pair(store: SegmentStore, source: str, src_lang: str, tgt_lang: str, cfg: CleanParams,
               sinks: list[ParquetSink]) -> Counts:
    counts = Counts(PAIR_FILTERS)
    filters = pair_filters(cfg)
    flush_at = work_rows(cfg)
    rows: list[list[tuple]] = [[], [], []]  # per split
    with tqdm(desc=f"clean: {source} {src_lang}-{tgt_lang}", unit="rows", file=sys.stderr, mininterval=1.0,
              leave=False) as bar:
        for seg_id, split, src, src_drop, tgt, tgt_drop in store.join(source, src_lang, tgt_lang):
            counts.rows_in += 1
            if counts.rows_in % 10_000 == 0:
                bar.update(10_000)
            reason = src_drop or tgt_drop or pair_drop(filters, src, tgt)
            if reason:
                counts.dropped[reason] += 1
                continue
            counts.rows_out[split] += 1
            rows[split].append((seg_id, src, tgt))
            if len(rows[split]) >= flush_at:
                _write_pair_rows(sinks[split], rows[split], src_lang, tgt_lang)
    for split, pending in enumerate(rows):
        _write_pair_rows(sinks[split], pending, src_lang, tgt_lang)
    return counts


def _write_pair_rows(sink: ParquetSink, rows: list[tuple], src_lang: str, tgt_lang: str) -> None:
    if rows:
        ids, src, tgt = zip(*rows)
        n = len(rows)
        sink.write_columns(id=list(ids), src_lang=[src_lang] * n, tgt_lang=[tgt_lang] * n, src=list(src), tgt=list(tgt))
        rows.clear()
