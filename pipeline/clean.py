"""clean stage: data/raw -> data/clean (normalise, filter, de-duplicate, split without leakage, join pairs).

The work runs in four steps; steps 1, 2 and 4 are independent units that ``pipeline.fanout`` runs on
``clean.task_runner`` (a thread pool, or a Dask cluster). Every unit writes its result to its own scratch file and
the order results are combined in is fixed by the plan, so the output bytes do not depend on the runner or on
execution order:

1. ``clean_file`` per raw file (source x language): decode line by line, normalise, per-segment filters, split by id.
2. ``dedup_language`` per language: exact de-duplication across that language's sources (first occurrence wins, in
   source order), and the keys of the language's valid/test texts.
3. ``write_mono``: drop training rows whose text is any valid/test text of any language (``leak``), write the mono
   splits, and load the parallel sources' final segments into an on-disk id index.
4. ``join_pair`` per configured pair and parallel source: join on id, apply the pair filters; ``write_pairs``
   appends the units' rows to the para splits in plan order.

Memory stays flat in corpus size: rows stream in small batches (outputs are written in row groups of
``clean.batch_rows``), de-duplication keys and the pair join live in scratch sqlite files, and only the keys of
valid/test texts (a small fraction) are held in memory.

Choices the issue left open:
- A pair in ``pairs`` that no parallel source provides is an error (naming the pair and the parallel sources), and so
  is a pair with no row left after filtering, like an all-filtered language: either would silently train without it.
- A pair row dropped because one side was dropped is counted under that side's filter (the source side's first).
- A segment without letters fails the script check (nothing shows it is in the language).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.errors import disk_full_is_an_error, fail, run_cli
from pipeline.fanout import FanOut, run_stage
from pipeline.params import PARAMS_FILE, CleanParams, StageParams, load_params
from xlm_core.atomic import atomic_dir, write_json
from xlm_core.text import expected_scripts, normalize_text, ratio_length, script_fractions, text_key

SPLITS = ("train", "valid", "test")
TRAIN, VALID, TEST = 0, 1, 2
# Per-language filters, in the order they are applied; a pair row also has the pair filters.
LANG_FILTERS = ("invalid_utf8", "nul", "malformed", "empty", "too_short", "too_long", "script", "duplicate", "leak")
PAIR_FILTERS = (*LANG_FILTERS, "ratio", "identical")

MONO_SCHEMA = pa.schema([("id", pa.string()), ("lang", pa.string()), ("text", pa.string())])
PARA_SCHEMA = pa.schema([("id", pa.string()), ("src_lang", pa.string()), ("tgt_lang", pa.string()),
                         ("src", pa.string()), ("tgt", pa.string())])
# Scratch file of one raw file: every line that has an id, kept or not, so pairs can say why a row was dropped.
UNIT_SCHEMA = pa.schema([("id", pa.string()), ("split", pa.int8()), ("key", pa.int64()), ("text", pa.string()),
                         ("dropped_by", pa.string())])

# Rows handled at once in Python (decode, filter, de-duplicate, join): bounds the working memory whatever
# clean.batch_rows (the row-group size of the outputs) is set to. Python objects cost ~1.5 KB per row here.
WORK_ROWS = 8192

_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DOWNLOAD_HINT = "run `dvc repro download`"


# ------------------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class RawFile:
    """One unit of step 1: the raw text of one language in one source."""

    source: str
    lang: str
    path: Path
    parallel: bool


@dataclass(frozen=True)
class Plan:
    files: tuple[RawFile, ...]  # language-major (params order), then source (raw manifest order)
    pair_sources: dict[tuple[str, str], tuple[str, ...]]  # configured pair -> parallel sources that have it

    def in_a_pair(self, raw: RawFile) -> bool:
        """Whether some configured pair reads this file's segments."""
        return any(raw.source in sources and raw.lang in pair for pair, sources in self.pair_sources.items())


@dataclass(frozen=True)
class _RawSource:
    name: str
    parallel: bool
    languages: tuple[str, ...]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"{path}: unreadable ({exc.__class__.__name__}: {exc}); {_DOWNLOAD_HINT} again")
    if not isinstance(data, dict):
        fail(f"{path}: expected a JSON object; {_DOWNLOAD_HINT} again")
    return data


def _read_source(raw_dir: Path, name: object) -> _RawSource:
    if not isinstance(name, str) or not _SOURCE_NAME.match(name):
        fail(f"{raw_dir / 'manifest.json'}: bad source name {name!r}; {_DOWNLOAD_HINT} again")
    manifest = raw_dir / name / "manifest.json"
    if not manifest.is_file():
        fail(f"{manifest}: not found, although {raw_dir / 'manifest.json'} lists source {name!r}; "
             f"{_DOWNLOAD_HINT} again")
    data = _read_json(manifest)
    languages, parallel = data.get("languages"), data.get("parallel")
    if not isinstance(languages, list) or not all(isinstance(x, str) for x in languages):
        fail(f"{manifest}: 'languages' must be a list of language codes, got {languages!r}; {_DOWNLOAD_HINT} again")
    if not isinstance(parallel, bool):
        fail(f"{manifest}: 'parallel' must be true or false, got {parallel!r}; {_DOWNLOAD_HINT} again")
    return _RawSource(name, parallel, tuple(languages))


def _describe_sources(sources: Sequence[_RawSource]) -> str:
    return ", ".join(f"{s.name} [{', '.join(s.languages)}]" for s in sources) or "none"


def plan_work(params: StageParams, raw_dir: str | Path) -> Plan:
    """Check data/raw against params (every error the input can cause, before any output is touched); list the work."""
    raw_dir = Path(raw_dir)
    top = raw_dir / "manifest.json"
    if not top.is_file():
        fail(f"{raw_dir}: no raw corpus ({top} not found); {_DOWNLOAD_HINT} first")
    names = _read_json(top).get("sources")
    if not isinstance(names, list):
        fail(f"{top}: 'sources' must be a list of source folder names; {_DOWNLOAD_HINT} again")
    sources = [_read_source(raw_dir, name) for name in names]

    files = []
    for lang in params.languages:
        providers = [s for s in sources if lang in s.languages]
        if not providers:
            fail(f"language {lang!r} has no raw text: no source in {raw_dir} provides it (sources: "
                 f"{_describe_sources(sources)}); add a source with it under download.sources and "
                 f"{_DOWNLOAD_HINT}, or remove it from languages in params.yaml")
        for source in providers:
            path = raw_dir / source.name / f"{lang}.tsv"
            if not path.is_file():
                fail(f"{path}: not found, although {raw_dir / source.name / 'manifest.json'} lists language "
                     f"{lang!r}; {_DOWNLOAD_HINT} again")
            if path.stat().st_size == 0:
                fail(f"{path}: empty file (no segments for {lang!r} in source {source.name!r}); check that source "
                     f"under download.sources in params.yaml and {_DOWNLOAD_HINT} again")
            files.append(RawFile(source.name, lang, path, source.parallel))

    pair_sources = {}
    parallel = [s for s in sources if s.parallel]
    for src, tgt in params.pairs:
        providers = tuple(s.name for s in parallel if src in s.languages and tgt in s.languages)
        if not providers:
            fail(f"pairs: {src}-{tgt} is not provided by any parallel source in {raw_dir} (parallel sources: "
                 f"{_describe_sources(parallel)}); remove it from pairs in params.yaml or add a parallel source "
                 f"with both {src} and {tgt}")
        pair_sources[(src, tgt)] = providers
    return Plan(tuple(files), pair_sources)


# ---------------------------------------------------------------------------------------------------------- counts
@dataclass
class Counts:
    """Rows in, dropped per filter, rows out per split: rows_in == sum(dropped) + sum(rows_out) at the end."""

    filters: tuple[str, ...]
    rows_in: int = 0
    dropped: Counter = field(default_factory=Counter)
    rows_out: list[int] = field(default_factory=lambda: [0, 0, 0])

    @property
    def remaining(self) -> int:
        return self.rows_in - sum(self.dropped.values())

    def copy(self) -> "Counts":
        return Counts(self.filters, self.rows_in, Counter(self.dropped), list(self.rows_out))

    def merge(self, other: "Counts") -> "Counts":
        self.rows_in += other.rows_in
        self.dropped.update(other.dropped)
        self.rows_out = [a + b for a, b in zip(self.rows_out, other.rows_out)]
        return self

    def to_json(self) -> dict:
        return {"rows_in": self.rows_in,
                "dropped": {name: self.dropped.get(name, 0) for name in self.filters},
                "rows_out": dict(zip(SPLITS, self.rows_out))}

    def describe_drops(self) -> str:
        return ", ".join(f"{name} {n}" for name, n in self.dropped.most_common() if n) or "none"


# --------------------------------------------------------------------------------------------------- scratch files
class ParquetSink:
    """A Parquet file written from appended Arrow tables in row groups of exactly ``rows_per_group`` rows.

    Fixed row groups make the bytes independent of how callers happen to batch their rows. Outputs are zstd with
    dictionary encoding for the language columns only (ids and texts are nearly all distinct); scratch files use
    snappy, cheaper to write and read back once.
    """

    def __init__(self, path: Path, schema: pa.Schema, rows_per_group: int, scratch: bool = False):
        self.schema = schema
        self.rows_per_group = rows_per_group
        dictionary = [name for name in schema.names if name.endswith("lang") or name == "dropped_by"]
        self._writer = pq.ParquetWriter(path, schema, compression="snappy" if scratch else "zstd",
                                        use_dictionary=dictionary)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._pending.append(table)
            self._pending_rows += table.num_rows
            if self._pending_rows >= self.rows_per_group:
                self._flush(final=False)

    def write_columns(self, **columns: list) -> None:
        self.write(pa.table(columns, schema=self.schema))

    def _flush(self, final: bool) -> None:
        table = pa.concat_tables(self._pending) if self._pending else self.schema.empty_table()
        n = table.num_rows if final else table.num_rows // self.rows_per_group * self.rows_per_group
        if n:
            self._writer.write_table(table.slice(0, n), row_group_size=self.rows_per_group)
        rest = table.slice(n)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def close(self) -> None:
        self._flush(final=True)
        self._writer.close()

    def __enter__(self) -> "ParquetSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _scratch_db(path: Path) -> sqlite3.Connection:
    """A throwaway sqlite file: no journal, no fsync, a bounded page cache (memory stays flat)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16384; "
                     "PRAGMA temp_store=FILE;")
    return db


class SeenTexts:
    """Keys of the texts seen so far in one language, in a sqlite table: exact de-duplication with flat memory."""

    def __init__(self, path: Path):
        self._db = _scratch_db(path)
        self._db.execute("CREATE TABLE seen (key INTEGER PRIMARY KEY)")
        self._db.execute("CREATE TEMP TABLE batch (key INTEGER PRIMARY KEY)")

    def first_seen(self, keys: np.ndarray) -> np.ndarray:
        """True where ``keys[i]`` occurs neither earlier in ``keys`` nor in any earlier call; records them all."""
        unique, first = np.unique(keys, return_index=True)
        db = self._db
        db.execute("BEGIN")
        db.execute("DELETE FROM batch")
        db.executemany("INSERT INTO batch VALUES (?)", ((k,) for k in unique.tolist()))
        old = np.fromiter((k for (k,) in db.execute("SELECT key FROM batch JOIN seen USING (key)")), dtype=np.int64)
        db.execute("INSERT OR IGNORE INTO seen SELECT key FROM batch")
        db.execute("COMMIT")
        mask = np.zeros(len(keys), dtype=bool)
        mask[first[~np.isin(unique, old, assume_unique=True)]] = True
        return mask

    def close(self) -> None:
        self._db.close()


class SegmentStore:
    """The final segments of the parallel sources, indexed by (source, language, id) in sqlite, to join pairs on id.

    Works whatever order the raw files list their ids in; rows come back in id order (the raw files' own order
    when, as the download stage writes them, keys are zero-padded).
    """

    def __init__(self, path: Path):
        self._db = _scratch_db(path)
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
                 f"file (docs/data-layout.md); {_DOWNLOAD_HINT} again")

    def join(self, source: str, src: str, tgt: str) -> Iterator[tuple]:
        """(id, split, src text, src dropped_by, tgt text, tgt dropped_by) for every id of ``source`` present in
        both languages, in id order."""
        return self._db.execute(
            "SELECT a.id, a.split, a.text, a.dropped_by, b.text, b.dropped_by FROM seg a "
            "JOIN seg b ON b.source = a.source AND b.lang = ? AND b.id = a.id "
            "WHERE a.source = ? AND a.lang = ? ORDER BY a.id", (tgt, source, src))

    def close(self) -> None:
        self._db.close()


# ---------------------------------------------------------------------------------------- step 1: one raw file
@dataclass
class FileResult:
    raw: RawFile
    path: Path  # its scratch Parquet file (UNIT_SCHEMA)
    counts: Counts


def split_of(segment_id: str, salt_key: bytes, valid: float, test: float) -> int:
    """TRAIN, VALID or TEST for a segment id: a keyed hash of the id alone, so every language agrees."""
    digest = hashlib.blake2b(segment_id.encode("utf-8"), digest_size=8, key=salt_key).digest()
    u = int.from_bytes(digest, "big") / 2.0 ** 64
    return TEST if u < test else VALID if u < test + valid else TRAIN


def salt_key(salt: str) -> bytes:
    return hashlib.blake2b(salt.encode("utf-8"), digest_size=32).digest()  # blake2b keys are at most 64 bytes


def _work_rows(cfg: CleanParams) -> int:
    return min(cfg.batch_rows, WORK_ROWS)


def _line_limit(cfg: CleanParams) -> int:
    # Bytes read per line at most: beyond this a line is too long whatever HTML stripping removes (4 bytes/char max).
    return max(1 << 20, 16 * cfg.max_chars)


def _read_lines(fh, limit: int) -> Iterator[tuple[bytes, bool]]:
    """(line, over_limit) per line; an over-long line yields only its first ``limit`` bytes (its id), never more."""
    while line := fh.readline(limit):
        over = len(line) == limit and not line.endswith(b"\n")
        if over:
            while (rest := fh.readline(limit)) and not rest.endswith(b"\n"):
                pass
        yield line, over


def _segment_id(id_bytes: bytes) -> str | None:
    try:
        seg_id = id_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return seg_id if seg_id.strip() and "\x00" not in seg_id else None


def _decode(line: bytes, over_limit: bool) -> tuple[str | None, str | None, str | None]:
    """(id, raw text, dropped_by) of one raw line; never raises. The id is kept when usable, even for a dropped line,
    so a pair can tell which filter dropped its side."""
    line = line.rstrip(b"\r\n")
    if not over_limit and b"\x00" not in line:  # the common case: one decode of the whole line
        try:
            seg_id, tab, text = line.decode("utf-8").partition("\t")
            if tab and seg_id.strip():
                return seg_id, text, None
        except UnicodeDecodeError:
            pass
    if not line.strip():
        return None, None, "empty"
    id_bytes, tab, text_bytes = line.partition(b"\t")
    seg_id = _segment_id(id_bytes) if tab else None
    if b"\x00" in line:  # a NUL byte means binary or UTF-16 data, not text
        return seg_id, None, "nul"
    if not tab or not id_bytes.strip():
        return None, None, "malformed"
    if seg_id is None:
        return None, None, "invalid_utf8"
    if over_limit:
        return seg_id, None, "too_long"
    return seg_id, None, "invalid_utf8"  # the id decodes, so the text does not


def _length_verdict(n: int, cfg: CleanParams) -> str | None:
    return "empty" if n == 0 else "too_short" if n < cfg.min_chars else "too_long" if n > cfg.max_chars else None


def _filter_batch(lines: list[tuple[bytes, bool]], lang: str, cfg: CleanParams, salt: bytes) -> dict[str, list]:
    """Columns (UNIT_SCHEMA) for one batch of raw lines: normalised text, or the filter that dropped the line."""
    ids, texts, dropped = [], [], []
    for line, over in lines:
        seg_id, text, reason = _decode(line, over)
        if text is not None:
            text = normalize_text(text, cfg.normalization, cfg.strip_html)
            reason = _length_verdict(len(text), cfg)
            if reason:
                text = None
        ids.append(seg_id)
        texts.append(text)
        dropped.append(reason)

    scripts = expected_scripts(lang) if cfg.script_check else None
    if scripts:
        alive = [i for i, t in enumerate(texts) if t is not None]
        fractions = script_fractions([texts[i] for i in alive], scripts)
        for i, fraction in zip(alive, fractions):
            if fraction < cfg.min_script_fraction:
                texts[i], dropped[i] = None, "script"

    frac = cfg.split
    splits = [split_of(i, salt, frac.valid, frac.test) if i is not None else TRAIN for i in ids]
    keys = [text_key(t) if t is not None else None for t in texts]
    return {"id": ids, "split": splits, "key": keys, "text": texts, "dropped_by": dropped}


def clean_file(raw: RawFile, cfg: CleanParams, out_path: Path) -> FileResult:
    """Step 1 for one raw file: stream its lines into ``out_path`` (one row per line with an id) and count."""
    counts = Counts(LANG_FILTERS)
    salt = salt_key(cfg.split_salt)
    limit = _line_limit(cfg)
    work_rows = _work_rows(cfg)
    with (open(raw.path, "rb") as fh, ParquetSink(out_path, UNIT_SCHEMA, work_rows, scratch=True) as sink,
          tqdm(total=raw.path.stat().st_size, unit="B", unit_scale=True, desc=f"clean {raw.source}/{raw.lang}",
               file=sys.stderr, mininterval=1.0, leave=False) as bar):
        lines = _read_lines(fh, limit)
        while batch := [x for _, x in zip(range(work_rows), lines)]:
            columns = _filter_batch(batch, raw.lang, cfg, salt)
            counts.rows_in += len(batch)
            counts.dropped.update(r for r in columns["dropped_by"] if r is not None)
            has_id = [i for i, seg_id in enumerate(columns["id"]) if seg_id is not None]
            if len(has_id) < len(batch):  # a line without a usable id is counted, not stored: no pair can use it
                columns = {name: [col[i] for i in has_id] for name, col in columns.items()}
            sink.write_columns(**columns)
            bar.update(sum(len(line) for line, _ in batch))
    return FileResult(raw, out_path, counts)


# ----------------------------------------------------------------------------------------- step 2: one language
@dataclass
class LanguageResult:
    lang: str
    files: list[FileResult]  # same order as given, scratch paths now de-duplicated
    heldout_keys: np.ndarray  # sorted unique keys of the language's kept valid/test texts


def _read_scratch(path: Path, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """A scratch file one row group (at most WORK_ROWS rows) at a time. Not ``iter_batches``: it reads ahead, and
    with a slow consumer (sqlite) its buffers grow with the file."""
    scratch = pq.ParquetFile(path)
    for i in range(scratch.num_row_groups):
        yield scratch.read_row_group(i, columns=columns)


def _kept_mask(batch: pa.Table) -> np.ndarray:
    return batch.column("dropped_by").is_null().to_numpy(zero_copy_only=False)


def _numpy(column: pa.ChunkedArray, fill: int = 0) -> np.ndarray:
    return column.fill_null(fill).to_numpy(zero_copy_only=False)


def dedup_language(lang: str, files: list[FileResult], cfg: CleanParams, work_dir: Path) -> LanguageResult:
    """Step 2 for one language: mark later copies of a text ``duplicate`` (the first occurrence, in the order of
    ``files``, wins) and collect the keys of the language's valid/test texts."""
    if cfg.dedup:
        seen = SeenTexts(work_dir / f"seen.{lang}.sqlite")
        try:
            files = [_dedup_file(result, seen, _work_rows(cfg)) for result in files]
        finally:
            seen.close()
    heldout = [_heldout_keys(result.path) for result in files]
    return LanguageResult(lang, files, np.unique(np.concatenate(heldout)))


def _dedup_file(result: FileResult, seen: SeenTexts, work_rows: int) -> FileResult:
    path = result.path.with_name(result.path.stem + ".dedup.parquet")
    counts = result.counts.copy()
    with ParquetSink(path, UNIT_SCHEMA, work_rows, scratch=True) as sink:
        for batch in _read_scratch(result.path):
            kept = _kept_mask(batch)
            duplicate = np.zeros(len(kept), dtype=bool)
            duplicate[kept] = ~seen.first_seen(_numpy(batch.column("key"))[kept])
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
    for batch in _read_scratch(path, columns=["split", "key", "dropped_by"]):
        heldout = _kept_mask(batch) & (_numpy(batch.column("split")) != TRAIN)
        keys.append(_numpy(batch.column("key"))[heldout])
    return np.concatenate(keys)


# ----------------------------------------------------------------------------------- step 3: mono splits + leak
def _in_sorted(values: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    if len(sorted_keys) == 0:
        return np.zeros(len(values), dtype=bool)
    pos = np.searchsorted(sorted_keys, values).clip(max=len(sorted_keys) - 1)
    return sorted_keys[pos] == values


def write_mono(files: list[FileResult], heldout_keys: np.ndarray, out_dir: Path, cfg: CleanParams,
               store: SegmentStore, plan: Plan) -> None:
    """Step 3: drop training rows whose text is a valid/test text (``leak``), write mono/{split}.parquet in plan
    order, and hand the rows of files some pair reads (with why they were dropped) to the SegmentStore.
    Adds the ``leak`` drops and rows out to each result's counts."""
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
            for batch in _read_scratch(result.path):
                kept = _kept_mask(batch)
                split = _numpy(batch.column("split"))
                leak = kept & (split == TRAIN) & _in_sorted(_numpy(batch.column("key")), heldout_keys)
                kept &= ~leak
                result.counts.dropped["leak"] += int(leak.sum())
                for s, sink in enumerate(sinks):
                    rows = batch.filter(pa.array(kept & (split == s)))
                    result.counts.rows_out[s] += rows.num_rows
                    sink.write(pa.table({"id": rows.column("id"), "lang": pa.repeat(raw.lang, rows.num_rows),
                                         "text": rows.column("text")}, schema=MONO_SCHEMA))
                if paired:
                    store.add(raw.source, raw.lang, _store_rows(batch, split, kept, leak))
                bar.update(batch.num_rows)
            result.path.unlink()


def _store_rows(batch: pa.Table, split: np.ndarray, kept: np.ndarray, leak: np.ndarray) -> Iterator[tuple]:
    """(id, split, text of a kept row or None, dropped_by) per row, as SegmentStore.add takes them."""
    texts = pc.if_else(pa.array(kept), batch.column("text"), pa.scalar(None, pa.string()))
    dropped_by = pc.if_else(pa.array(leak), "leak", batch.column("dropped_by"))
    return zip(batch.column("id").to_pylist(), split.tolist(), texts.to_pylist(), dropped_by.to_pylist())


# --------------------------------------------------------------------------------------------- step 4: pairs
def _pair_verdict(src: str, tgt: str, cfg: CleanParams) -> str | None:
    if cfg.drop_identical_pairs and src == tgt:
        return "identical"
    a, b = ratio_length(src), ratio_length(tgt)
    if max(a, b) > cfg.max_length_ratio * min(a, b):
        return "ratio"
    return None


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
            sinks = [stack.enter_context(ParquetSink(path, PARA_SCHEMA, _work_rows(cfg), scratch=True))
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
                for table in _read_scratch(path):
                    sink.write(table)
                path.unlink()
    return {key: result.counts for key, result in zip(keys, joined)}


def _join_pair(store: SegmentStore, source: str, src_lang: str, tgt_lang: str, cfg: CleanParams,
               sinks: list[ParquetSink]) -> Counts:
    counts = Counts(PAIR_FILTERS)
    rows: list[list[tuple]] = [[], [], []]  # per split
    with tqdm(desc=f"clean: {source} {src_lang}-{tgt_lang}", unit="rows", file=sys.stderr, mininterval=1.0,
              leave=False) as bar:
        for seg_id, split, src, src_drop, tgt, tgt_drop in store.join(source, src_lang, tgt_lang):
            counts.rows_in += 1
            if counts.rows_in % 10_000 == 0:
                bar.update(10_000)
            reason = src_drop or tgt_drop or _pair_verdict(src, tgt, cfg)
            if reason:
                counts.dropped[reason] += 1
                continue
            counts.rows_out[split] += 1
            rows[split].append((seg_id, src, tgt))
            if len(rows[split]) >= _work_rows(cfg):
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


# ------------------------------------------------------------------------------------------------------ the stage
def _check_languages_left(languages: Sequence[str], results: Sequence[FileResult],
                          left: Callable[[Counts], int]) -> None:
    for lang in languages:
        mine = [r for r in results if r.raw.lang == lang]
        counts = _sum_counts(mine)
        if left(counts) == 0:
            fail(f"language {lang!r}: all {counts.rows_in} segments were filtered out ({counts.describe_drops()}) "
                 f"in {', '.join(str(r.raw.path) for r in mine)}; check the raw text or relax clean.min_chars / "
                 f"max_chars / min_script_fraction (or script_check) in params.yaml")


def _check_pairs_left(plan: Plan, pair_counts: dict[tuple[str, str, str], Counts]) -> None:
    for (src, tgt), sources in plan.pair_sources.items():
        counts = Counts(PAIR_FILTERS)
        for source in sources:
            counts.merge(pair_counts[(source, src, tgt)])
        if sum(counts.rows_out) == 0:
            fail(f"pair {src}-{tgt}: all {counts.rows_in} aligned rows of {', '.join(sources)} were filtered out "
                 f"({counts.describe_drops()}); check the raw text, relax clean.max_length_ratio / "
                 f"drop_identical_pairs in params.yaml, or remove {src}-{tgt} from pairs")


def _sum_counts(results: Sequence[FileResult]) -> Counts:
    total = Counts(LANG_FILTERS)
    for r in results:
        total.merge(r.counts)
    return total


def _metrics(files: Sequence[FileResult], pair_counts: dict[tuple[str, str, str], Counts],
             params: StageParams) -> dict:
    languages = {lang: Counts(LANG_FILTERS) for lang in params.languages}
    pairs = {f"{s}-{t}": Counts(PAIR_FILTERS) for s, t in params.pairs}
    sources: dict[str, dict] = {}
    for f in files:
        languages[f.raw.lang].merge(f.counts)
        sources.setdefault(f.raw.source, {"languages": {}, "pairs": {}})["languages"][f.raw.lang] = f.counts.to_json()
    for (source, s, t), c in pair_counts.items():
        pairs[f"{s}-{t}"].merge(c)
        sources[source]["pairs"][f"{s}-{t}"] = c.to_json()
    mono, para = Counts(LANG_FILTERS), Counts(PAIR_FILTERS)
    for c in languages.values():
        mono.merge(c)
    for c in pairs.values():
        para.merge(c)
    return {"languages": {k: c.to_json() for k, c in languages.items()},
            "pairs": {k: c.to_json() for k, c in pairs.items()},
            "sources": sources,
            "totals": {"mono": mono.to_json(), "para": para.to_json()}}


def clean(params: StageParams, raw_dir: str | Path = "data/raw", out_dir: str | Path = "data/clean",
          metrics_path: str | Path = "metrics/clean.json", executor: Executor | None = None) -> dict:
    """Build ``out_dir`` (mono/ and para/ splits) from ``raw_dir``; write and return the metrics.

    ``out_dir`` is replaced as a whole only on success; on any error the previous output and metrics are untouched.
    The units of steps 1, 2 and 4 run on ``clean.task_runner`` (pipeline.fanout), or on ``executor`` when given;
    the bytes written are the same either way.
    """
    plan = plan_work(params, raw_dir)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def stage(fan: FanOut) -> dict:
        # Scratch files live next to the output and are named like atomic_dir's temporaries (<name>.tmp-<pid>-...),
        # so a killed run's leftovers are cleared by the next one. Units get absolute paths (Dask workers may run
        # in another folder).
        scratch = tempfile.TemporaryDirectory(prefix=f"{out_dir.name}.tmp-{os.getpid()}-work-", dir=out_dir.parent)
        with disk_full_is_an_error("clean", out_dir), scratch as work, atomic_dir(out_dir) as staging:
            return _run(fan, params, plan, Path(work).absolute(), staging)

    metrics = run_stage("clean", params.clean, stage, workers=os.cpu_count() or 1, executor=executor)
    write_json(metrics_path, metrics)
    _report(metrics, time.monotonic() - started)
    return metrics


def _run(fan: FanOut, params: StageParams, plan: Plan, work: Path, out_dir: Path) -> dict:
    cfg: CleanParams = params.clean
    # Step 1: independent units, one per raw file.
    raws = [replace(raw, path=raw.path.absolute()) for raw in plan.files]
    cleaned = fan.map(clean_file, [(raw, cfg, work / f"{raw.source}.{raw.lang}.parquet") for raw in raws],
                      names=[f"clean_file {raw.source}/{raw.lang}" for raw in raws])
    _check_languages_left(params.languages, cleaned, lambda c: c.remaining)
    # Step 2: independent units, one per language; within a language the files stay in plan (source) order.
    by_lang = fan.map(dedup_language, [(lang, [r for r in cleaned if r.raw.lang == lang], cfg, work)
                                       for lang in params.languages],
                      names=[f"dedup_language {lang}" for lang in params.languages])
    files = [f for r in by_lang for f in r.files]
    heldout = np.unique(np.concatenate([r.heldout_keys for r in by_lang]))
    # Step 3 needs every language's valid/test keys, and writes the mono files in plan order: one sequential pass.
    store = SegmentStore(work / "pairs.sqlite")
    try:
        write_mono(files, heldout, out_dir, cfg, store, plan)
        _check_languages_left(params.languages, files, lambda c: sum(c.rows_out))
        store.finish()
    finally:
        store.close()
    # Step 4: independent units, one per pair and parallel source, reading the finished store.
    pair_counts = write_pairs(fan, plan, work / "pairs.sqlite", work, out_dir, cfg)
    _check_pairs_left(plan, pair_counts)
    return _metrics(files, pair_counts, params)


def _report(metrics: dict, seconds: float) -> None:
    mono, para = metrics["totals"]["mono"], metrics["totals"]["para"]
    print(f"clean: {mono['rows_in']} segments in, mono out {mono['rows_out']}, para out {para['rows_out']} "
          f"in {seconds:.1f}s", file=sys.stderr)
    for lang, c in metrics["languages"].items():
        drops = ", ".join(f"{k} {v}" for k, v in c["dropped"].items() if v) or "none"
        print(f"  {lang}: {c['rows_in']} in, out {c['rows_out']}, dropped: {drops}", file=sys.stderr)
    for pair, c in metrics["pairs"].items():
        drops = ", ".join(f"{k} {v}" for k, v in c["dropped"].items() if v) or "none"
        print(f"  {pair}: {c['rows_in']} aligned, out {c['rows_out']}, dropped: {drops}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.clean",
                                     description="Normalise, filter, de-duplicate and split data/raw into data/clean.")
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    parser.add_argument("--raw", default="data/raw", help="raw corpus from the download stage (default: %(default)s)")
    parser.add_argument("--out", default="data/clean", help="output folder (default: %(default)s)")
    parser.add_argument("--metrics", default="metrics/clean.json", help="metrics file (default: %(default)s)")
    args = parser.parse_args(argv)
    return run_cli("clean", lambda: clean(load_params("clean", args.params), args.raw, args.out, args.metrics))


if __name__ == "__main__":
    sys.exit(main())
