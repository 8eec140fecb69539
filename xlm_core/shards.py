"""The token shard format (``data/shards/<split>/``), both directions: the schema, the shard writer and the manifest
(written by the shard stage), ``ShardSet`` (read safely by everyone else); and row ranges of any Parquet file.

A split folder holds ``mono-NNNNN.parquet`` / ``para-NNNNN.parquet`` and a ``manifest.json`` listing every shard with
its sha256 and row count, the tokens per language and pair, and the sha256 of the sentencepiece model the ids come
from. ``ShardSet`` checks that hash against the tokenizer the caller will decode or embed with, and checks every
shard's sha256 before handing out its rows: ids from another vocabulary or a damaged file would otherwise train a model
on garbage without any error.

    shards = ShardSet("data/shards/train", tokenizer=Tokenizer.load("data/tokenizer"))
    for table in shards.iter_tables("mono", columns=["lang", "ids"]):
        ...

No pandas on the hot path: rows come out as pyarrow Tables / RecordBatches.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from xlm_core.atomic import atomic_path, write_json
from xlm_core.errors import XLMError

if TYPE_CHECKING:
    from xlm_core.tokenizer import Tokenizer

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
KINDS = ("mono", "para")
GROUP_KEY = {"mono": "languages", "para": "pairs"}   # what a kind's rows are counted by in the manifest
LANG_TYPE = pa.dictionary(pa.int32(), pa.string())


class ShardError(XLMError):
    """Shards missing, damaged, or made with another tokenizer (one line: what, where, how to fix)."""


def shard_name(kind: str, index: int) -> str:
    return f"{kind}-{index:05d}.parquet"


# ---------------------------------------------------------------------------------------------------------- writer
def shard_schema(kind: str, ids_type: pa.DataType) -> pa.Schema:
    """Columns of a ``kind`` shard; ``ids_type`` is the tokenizer's ``ids_dtype`` as an Arrow type."""
    ids = pa.list_(ids_type)
    if kind == "mono":
        return pa.schema([("id", pa.string()), ("lang", LANG_TYPE), ("ids", ids), ("length", pa.int32())])
    return pa.schema([("id", pa.string()), ("src_lang", LANG_TYPE), ("tgt_lang", LANG_TYPE), ("src_ids", ids),
                      ("tgt_ids", ids), ("src_length", pa.int32()), ("tgt_length", pa.int32())])


@contextlib.contextmanager
def shard_writer(path: str | Path, kind: str, ids_type: pa.DataType) -> Iterator[pq.ParquetWriter]:
    """A writer of one ``kind`` shard at ``path`` (zstd), renamed into place once closed without an error."""
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, shard_schema(kind, ids_type), compression="zstd") as writer:
        yield writer


@dataclass(frozen=True)
class ShardResult:
    """One written shard as its manifest entry records it: plain data, so it crosses thread/process/Dask boundaries."""

    split: str
    kind: str
    file: str
    rows: int
    tokens: int
    sha256: str
    # language (mono) or "src-tgt" pair (para) -> {"rows", "tokens"} (+ "src_tokens", "tgt_tokens" for pairs)
    groups: dict = field(default_factory=dict)


def merge_group_counts(into: dict[str, dict], part: dict[str, dict]) -> None:
    """Add the per-group counts of ``part`` to ``into`` (groups: languages or pairs)."""
    for name, counts in part.items():
        slot = into.setdefault(name, dict.fromkeys(counts, 0))
        for key, value in counts.items():
            slot[key] += value


def build_manifest(split: str, results: list[ShardResult], tok: "Tokenizer", rows_per_shard: int) -> dict:
    """The manifest of one split from its shards' results (in file order)."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "split": split,
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "ids_type": str(tok.ids_dtype),
        "rows_per_shard": rows_per_shard,
        # per file: which languages (mono) or pairs (para) it holds, so a loader can skip files
        "files": [{"file": r.file, "kind": r.kind, "rows": r.rows, "tokens": r.tokens, "sha256": r.sha256,
                   GROUP_KEY[r.kind]: sorted(r.groups)} for r in results],
    }
    for kind, group_key in GROUP_KEY.items():
        of_kind = [r for r in results if r.kind == kind]
        groups: dict[str, dict] = {}
        for r in of_kind:
            merge_group_counts(groups, r.groups)
        manifest[kind] = {"files": len(of_kind), "rows": sum(r.rows for r in of_kind),
                          "tokens": sum(r.tokens for r in of_kind)}
        manifest[group_key] = dict(sorted(groups.items()))
    return manifest


def write_manifest(split_dir: str | Path, manifest: dict) -> None:
    write_json(Path(split_dir) / MANIFEST, manifest)


# ------------------------------------------------------------------------------------------------- Parquet streaming
def open_parquet(path: str | Path, columns: Sequence[str], fix_hint: str) -> pq.ParquetFile:
    """Open a Parquet file and check it has ``columns``; errors end with ``fix_hint`` (e.g. "run `dvc repro clean`")."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: not found; {fix_hint}")
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise ShardError(f"{path}: not a readable Parquet file ({exc}); {fix_hint}") from None
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise ShardError(f"{path}: missing column(s) {missing} (has {pf.schema_arrow.names}); {fix_hint}")
    return pf


def iter_row_range(pf: pq.ParquetFile, start: int, stop: int, columns: Sequence[str],
                   batch_rows: int) -> Iterator[pa.Table]:
    """Rows ``[start, stop)`` of ``pf`` as Tables of exactly ``batch_rows`` rows (the last one may be shorter).

    Only the row groups overlapping the range are read, so independent workers can each take one range of a big file
    (at most one row group per range boundary is decoded in vain: ranges aligned with row groups cost nothing extra).
    Re-batching to a fixed size makes the output independent of how the file was cut into row groups.
    """
    groups, first_row, offset = [], None, 0
    for i in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(i).num_rows
        if offset + n > start and offset < stop:
            groups.append(i)
            first_row = offset if first_row is None else first_row
        offset += n
    if not groups:
        return
    pending: list[pa.Table] = []
    pending_rows = 0
    position = first_row  # file row index of the next row the batch iterator yields
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=list(columns), use_threads=True):
        lo, hi = max(start - position, 0), min(stop - position, batch.num_rows)
        position += batch.num_rows
        if hi <= lo:
            continue
        pending.append(pa.Table.from_batches([batch.slice(lo, hi - lo)]))
        pending_rows += hi - lo
        while pending_rows >= batch_rows:
            table = pa.concat_tables(pending)
            yield table.slice(0, batch_rows).combine_chunks()
            rest = table.slice(batch_rows)
            pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if position >= stop:
            break
    if pending_rows:
        yield pa.concat_tables(pending).combine_chunks()


# ---------------------------------------------------------------------------------------------------------- reader
@dataclass(frozen=True)
class ShardFile:
    name: str
    path: Path
    kind: str
    rows: int
    tokens: int
    sha256: str
    keys: tuple[str, ...] = ()   # languages (mono) or "src-tgt" pairs (para) with rows in this file


class ShardSet:
    """One split's shards, as listed (and checksummed) by its manifest."""

    def __init__(self, split_dir: str | Path, tokenizer: Optional["Tokenizer"] = None):
        self.split_dir = Path(split_dir)
        manifest_path = self.split_dir / MANIFEST
        if not manifest_path.is_file():
            raise ShardError(f"{manifest_path}: not found; run `dvc repro shard`")
        try:
            self.manifest: dict = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ShardError(f"{manifest_path}: unreadable ({exc}); run `dvc repro shard`") from None
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise ShardError(f"{manifest_path}: manifest format {self.manifest.get('format')!r}, this code reads "
                             f"{MANIFEST_FORMAT}; run `dvc repro shard`")
        self.split: str = self.manifest["split"]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.tokenizer_sha256: str = self.manifest["tokenizer_sha256"]
        self._files = [ShardFile(name=f["file"], path=self.split_dir / f["file"], kind=f["kind"], rows=f["rows"],
                                 tokens=f["tokens"], sha256=f["sha256"],
                                 keys=tuple(f.get("languages" if f["kind"] == "mono" else "pairs", ())))
                       for f in self.manifest["files"]]
        self.languages: dict[str, dict] = self.manifest.get("languages", {})  # lang -> {"rows", "tokens"}
        self.pairs: dict[str, dict] = self.manifest.get("pairs", {})  # "src-tgt" -> {"rows", "tokens", ...}
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)

    def check_tokenizer(self, tokenizer: "Tokenizer") -> None:
        """Refuse ids made by another sentencepiece model than ``tokenizer``'s."""
        if tokenizer.sha256 != self.tokenizer_sha256:
            raise ShardError(
                f"{self.split_dir}: shards were made with tokenizer {self.tokenizer_sha256[:12]}, but "
                f"{tokenizer.model_path.parent} is {tokenizer.sha256[:12]}; rerun `dvc repro shard`")

    # ----------------------------------------------------------------------------------------------------- listing
    def files(self, kind: str = "mono", key: Optional[str] = None) -> list[ShardFile]:
        """Shard files of ``kind`` in manifest order; with ``key`` (a language or pair) only those holding it."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return [f for f in self._files if f.kind == kind and (key is None or key in f.keys)]

    def rows(self, kind: str = "mono") -> int:
        return sum(f.rows for f in self.files(kind))

    # ----------------------------------------------------------------------------------------------------- reading
    def read_verified(self, shard: ShardFile) -> pa.Buffer:
        """The bytes of ``shard`` after checking their sha256 against the manifest (one read from disk)."""
        try:
            data = shard.path.read_bytes()
        except FileNotFoundError:
            raise ShardError(f"{shard.path}: listed in {self.split_dir / MANIFEST} but missing; "
                             f"run `dvc checkout` or `dvc repro shard`") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard.sha256:
            raise ShardError(f"{shard.path}: checksum mismatch (sha256 {digest[:12]}, manifest says "
                             f"{shard.sha256[:12]}); the file is damaged: run `dvc checkout` or `dvc repro shard`")
        return pa.py_buffer(data)

    def read_table(self, shard: ShardFile, columns: Optional[Sequence[str]] = None,
                   filters: Optional[list[tuple]] = None) -> pa.Table:
        """The rows of ``shard`` matching ``filters`` (only ``columns``), after checking its sha256."""
        try:
            return pq.read_table(pa.BufferReader(self.read_verified(shard)),
                                 columns=list(columns) if columns is not None else None, filters=filters)
        except (OSError, pa.ArrowException) as exc:
            raise ShardError(f"{shard.path}: cannot read shard ({exc}); rerun `dvc repro shard`") from None

    def verify(self, kind: Optional[str] = None) -> int:
        """Check every shard's sha256 (of ``kind``, or all); returns the number of files checked."""
        shards = self._files if kind is None else self.files(kind)
        for shard in shards:
            self.read_verified(shard)
        return len(shards)

    def iter_tables(self, kind: str = "mono", files: Optional[Sequence[ShardFile]] = None,
                    columns: Optional[Sequence[str]] = None) -> Iterator[pa.Table]:
        """One verified Table per shard file, in manifest order (or of ``files``, e.g. one rank's slice)."""
        for shard in (self.files(kind) if files is None else files):
            table = self.read_table(shard, columns)
            if table.num_rows != shard.rows:
                raise ShardError(f"{shard.path}: {table.num_rows} rows, manifest says {shard.rows}; "
                                 f"run `dvc repro shard`")
            yield table

    def iter_batches(self, kind: str = "mono", files: Optional[Sequence[ShardFile]] = None,
                     columns: Optional[Sequence[str]] = None, batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
        """Verified RecordBatches of at most ``batch_rows`` rows, shard after shard."""
        for table in self.iter_tables(kind, files, columns):
            yield from table.to_batches(max_chunksize=batch_rows)

    def __repr__(self) -> str:
        return (f"ShardSet({str(self.split_dir)!r}, mono={len(self.files('mono'))} files/{self.rows('mono')} rows, "
                f"para={len(self.files('para'))} files/{self.rows('para')} rows)")
