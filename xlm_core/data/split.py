"""One split's shards as the loader sees them: the manifest's token counts, and rows read as flat id arrays."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
from xlm_core.errors import XLMError
from xlm_core.shards import KINDS, MANIFEST, ShardError, ShardFile, ShardSet
from xlm_core.special_tokens import EOS

if TYPE_CHECKING:
    from xlm_core.tokenizer import Tokenizer


class DataError(XLMError, ValueError):
    """The shards or the loader settings cannot give the requested data; the message says what, where and how to fix.

    (An XLMError: a stage's CLI prints it as the stage's one error line.)
    """


@dataclass(frozen=True)
class SplitInfo:
    """One split's shards (``ShardSet``: manifest, files, checksums) and its token counts per language and pair."""

    shards: ShardSet
    lang_tokens: dict[str, int]
    pair_tokens: dict[str, int]
    fingerprint: str                       # identifies the exact shard contents (names + sha256)

    @property
    def split_dir(self) -> Path:
        return self.shards.split_dir

    @property
    def manifest_path(self) -> Path:
        return self.shards.split_dir / MANIFEST

    def files(self, kind: str, key: Optional[str] = None) -> list[ShardFile]:
        """Shard files of ``kind`` in manifest order; with ``key``, only those the manifest says hold it."""
        return self.shards.files(kind, key)


def open_split(split_dir: Union[str, Path], tokenizer: Optional["Tokenizer"] = None) -> SplitInfo:
    """Read ``<split_dir>/manifest.json`` (and check the tokenizer hash when given). Shards are checksummed on read."""
    try:
        shards = ShardSet(split_dir, tokenizer=tokenizer)
        lang_tokens = {k: int(v["tokens"]) for k, v in shards.languages.items()}
        pair_tokens = {k: int(v["tokens"]) for k, v in shards.pairs.items()}
    except ShardError as exc:
        raise DataError(str(exc)) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{Path(split_dir) / MANIFEST}: malformed ({exc!r}); rerun `dvc repro shard`") from None
    identity = sorted([f.name, f.sha256] for kind in KINDS for f in shards.files(kind))
    fingerprint = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
    return SplitInfo(shards=shards, lang_tokens=lang_tokens, pair_tokens=pair_tokens, fingerprint=fingerprint)


def require_tokens(counts: dict[str, int], wanted: list[str], what: str, split: SplitInfo) -> dict[str, int]:
    missing = [k for k in wanted if counts.get(k, 0) <= 0]
    if missing:
        raise DataError(f"{split.manifest_path}: no tokens for {what} {missing} (it has "
                        f"{sorted(k for k, n in counts.items() if n > 0)}); add data for them in download/clean, or "
                        f"remove them from {what} in params.yaml")
    return {k: counts[k] for k in wanted}


@dataclass(frozen=True)
class RaggedIds:
    """Sentences as one flat id array plus offsets (row i = values[offsets[i]:offsets[i+1]]): no lists of lists."""

    values: np.ndarray
    offsets: np.ndarray   # int64, len = rows + 1, offsets[0] == 0

    @property
    def rows(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _ragged(column) -> RaggedIds:
    """A pyarrow list<int> column (ChunkedArray) -> RaggedIds without going through Python lists."""
    arr = column.combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.flatten().to_numpy(zero_copy_only=False)   # flatten() honours slicing; offsets must be rebased
    return RaggedIds(values=values, offsets=offsets - offsets[0])


def _read_shard(split: SplitInfo, file: ShardFile, columns: list[str], filters: list[tuple]):
    """The rows of ``file`` matching ``filters`` (only ``columns``), after checking its sha256 against the manifest."""
    try:
        return split.shards.read_table(file, columns, filters)
    except ShardError as exc:
        raise DataError(str(exc)) from None


def read_mono_rows(split: SplitInfo, file: ShardFile, lang: str) -> RaggedIds:
    table = _read_shard(split, file, ["ids"], [("lang", "==", lang)])
    return _ragged(table.column("ids"))


def read_para_rows(split: SplitInfo, file: ShardFile, pair: str) -> tuple[RaggedIds, RaggedIds]:
    src, tgt = pair.split("-")
    table = _read_shard(split, file, ["src_ids", "tgt_ids"], [("src_lang", "==", src), ("tgt_lang", "==", tgt)])
    return _ragged(table.column("src_ids")), _ragged(table.column("tgt_ids"))


def concat_with_eos(ids: RaggedIds, rows: np.ndarray) -> np.ndarray:
    """``row[0] </s> row[1] </s> ...`` for the given row indices, vectorised (int64)."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return np.empty(0, dtype=np.int64)
    starts = ids.offsets[rows]
    lengths = ids.offsets[rows + 1] - starts
    extended = lengths + 1
    ends = np.cumsum(extended)
    row_of = np.repeat(np.arange(len(rows)), extended)
    k = np.arange(ends[-1]) - (ends - extended)[row_of]     # position inside the (sentence + EOS)
    is_eos = k == lengths[row_of]
    src = starts[row_of] + k
    out = np.full(ends[-1], EOS, dtype=np.int64)
    out[~is_eos] = ids.values[src[~is_eos]]
    return out
