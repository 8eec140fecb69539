"""Endless seeded walks over one language's (mono) or one pair's (para) shard rows, and the sentence-mode pools on top.

A stream walks epochs. At each epoch start it permutes its shard files with an RNG seeded from (seed, stream key,
epoch); each shard is read (only the needed columns, only the rows of its language/pair) and its rows permuted with an
RNG seeded from (seed, stream key, epoch, shard index): the shard is the bounded shuffle buffer. A stream's whole state
is four ints, ``epoch, shard, row, offset`` (``offset``: tokens of the current sentence already consumed by the block
builder), so restoring recomputes the permutations, reloads one shard and continues exactly where it was.
"""
from __future__ import annotations

from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from xlm_core.data.seeds import POOL_TAG, name_word, seed_word
from xlm_core.data.split import DataError, SplitInfo, concat_with_eos, read_mono_rows, read_para_rows
from xlm_core.shards import ShardFile


@dataclass
class _LoadedShard:
    epoch: int
    shard: int                                # position in this epoch's file order
    index: int                                # which file (index into the stream's file list)
    perm: np.ndarray                          # row order in this epoch
    data: tuple                               # (RaggedIds,) for mono, (src RaggedIds, tgt RaggedIds) for para
    _ext_end: Optional[np.ndarray] = None     # cumulative (length + 1) in perm order, for block building

    @property
    def rows(self) -> int:
        return len(self.perm)

    def ext_end(self) -> np.ndarray:
        if self._ext_end is None:
            self._ext_end = np.cumsum(self.data[0].lengths[self.perm] + 1)
        return self._ext_end


class ShardStream:
    """Endless, seeded walk over the rows of one language (mono) or pair (para); state = a few ints.

    With a ``read_ahead`` executor, starting a shard also starts loading the next one in the background (pyarrow
    decodes without the GIL), so a step rarely waits for Parquet. Loading is a pure function of (epoch, shard).
    """

    kind = ""

    def __init__(self, split: SplitInfo, key: str, seed: int, read_ahead: Optional[Executor] = None):
        self.key = key
        self.name = f"{self.kind}:{key}"
        self.split = split
        self.files = split.files(self.kind, key)
        if not self.files:
            raise DataError(f"{split.manifest_path}: no {self.kind} shard holds {key!r}; rerun `dvc repro shard`")
        self._seed = [seed_word(seed), name_word(self.name)]
        self.epoch = self.shard = self.row = self.offset = 0
        self.read_ahead = read_ahead
        self._loaded: Optional[_LoadedShard] = None
        self._ahead: Optional[tuple[tuple[int, int], Future]] = None

    # -- state
    def state(self) -> dict:
        return {"epoch": int(self.epoch), "shard": int(self.shard), "row": int(self.row), "offset": int(self.offset)}

    def load_state(self, state: dict) -> None:
        self.epoch, self.shard = int(state["epoch"]), int(state["shard"])
        self.row, self.offset = int(state["row"]), int(state.get("offset", 0))

    # -- shard walking
    def _file_index(self, epoch: int, shard: int) -> int:
        return int(np.random.default_rng([*self._seed, epoch]).permutation(len(self.files))[shard])

    def _next_position(self, epoch: int, shard: int) -> tuple[int, int]:
        return (epoch, shard + 1) if shard + 1 < len(self.files) else (epoch + 1, 0)

    def _read(self, file: ShardFile) -> tuple:
        raise NotImplementedError

    def _load(self, epoch: int, shard: int, data: Optional[tuple] = None) -> _LoadedShard:
        """Shard ``shard`` of epoch ``epoch`` with its row permutation (``data``: already-read rows of that file)."""
        index = self._file_index(epoch, shard)
        if data is None:
            data = self._read(self.files[index])
        perm = np.random.default_rng([*self._seed, epoch, index]).permutation(data[0].rows)
        return _LoadedShard(epoch, shard, index, perm, data)

    def _fetch(self, epoch: int, shard: int) -> _LoadedShard:
        ahead, self._ahead = self._ahead, None
        index = self._file_index(epoch, shard)
        if self._loaded is not None and self._loaded.index == index:      # same file again (e.g. a one-shard key)
            loaded = self._load(epoch, shard, self._loaded.data)
        elif ahead is not None and ahead[0] == (epoch, shard) and not ahead[1].cancelled():
            loaded = ahead[1].result()
        else:
            loaded = self._load(epoch, shard)
        if ahead is not None and ahead[0] != (epoch, shard):
            ahead[1].cancel()
        following = self._next_position(epoch, shard)
        if self.read_ahead is not None and self._file_index(*following) != index:
            self._ahead = (following, self.read_ahead.submit(self._load, *following))
        return loaded

    def preload(self) -> None:
        """Start reading the current shard in the background (at start-up and after a restore)."""
        position = (self.epoch, self.shard)
        loaded = self._loaded is not None and (self._loaded.epoch, self._loaded.shard) == position
        if self.read_ahead is None or loaded or (self._ahead is not None and self._ahead[0] == position):
            return
        self._ahead = (position, self.read_ahead.submit(self._load, *position))

    def _current(self) -> _LoadedShard:
        """The loaded shard holding the current row, moving on past exhausted (or empty) shards and epochs."""
        empty_in_a_row = 0
        while True:
            loaded = self._loaded
            if loaded is None or (loaded.epoch, loaded.shard) != (self.epoch, self.shard):
                loaded = self._loaded = self._fetch(self.epoch, self.shard)
            if self.row < loaded.rows:
                return loaded
            empty_in_a_row = empty_in_a_row + 1 if loaded.rows == 0 else 0
            if empty_in_a_row > len(self.files):
                raise DataError(f"no rows for {self.key!r} in any {self.kind} shard under "
                                f"{self.files[0].path.parent}, though the manifest counts tokens for it; rerun "
                                f"`dvc repro shard`")
            self.row = self.offset = 0
            self.shard += 1
            if self.shard == len(self.files):
                self.shard, self.epoch = 0, self.epoch + 1


class MonoStream(ShardStream):
    kind = "mono"

    def _read(self, file: ShardFile) -> tuple:
        return (read_mono_rows(self.split, file, self.key),)

    def next_sentence(self) -> np.ndarray:
        """The next whole sentence (ids without specials); only between blocks (offset 0)."""
        assert self.offset == 0, "next_sentence() in the middle of a sentence cut by take_tokens()"
        shard = self._current()
        sentence = shard.data[0].row(int(shard.perm[self.row]))
        self.row += 1
        return sentence

    def take_tokens(self, n: int) -> np.ndarray:
        """The next ``n`` tokens of ``s1 </s> s2 </s> ...`` (int64); a sentence may be cut and continued next call."""
        pieces = self._advance(n, gather=True)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def skip_tokens(self, n: int) -> None:
        """Move past ``n`` tokens exactly as take_tokens would, without building them (another rank's chunk)."""
        self._advance(n, gather=False)

    def _advance(self, n: int, gather: bool) -> list[np.ndarray]:
        pieces = []
        while n > 0:
            shard = self._current()
            ext_end = shard.ext_end()
            start = (int(ext_end[self.row - 1]) if self.row else 0) + self.offset   # position in this shard's text
            take = min(n, int(ext_end[-1]) - start)
            end = start + take
            if gather:
                last_row = int(np.searchsorted(ext_end, end - 1, side="right"))   # row holding the last token
                text = concat_with_eos(shard.data[0], shard.perm[self.row:last_row + 1])
                pieces.append(text[self.offset:self.offset + take])
            self.row = int(np.searchsorted(ext_end, end, side="right"))            # row holding the next token
            self.offset = end - (int(ext_end[self.row - 1]) if self.row else 0)
            n -= take
        return pieces


class ParaStream(ShardStream):
    kind = "para"

    def _read(self, file: ShardFile) -> tuple:
        return read_para_rows(self.split, file, self.key)

    def next_pair(self) -> tuple[np.ndarray, np.ndarray]:
        shard = self._current()
        i = int(shard.perm[self.row])
        self.row += 1
        return shard.data[0].row(i), shard.data[1].row(i)


class LengthPool:
    """Sentence mode: pools of consecutive items sorted by length, cut into token-budget batches, order shuffled.

    Batches hold a multiple of ``n_chunks`` items (so chunks are equal); the < n_chunks items left at a pool's end
    are skipped. State = the stream position at the pool's start + batches handed out, so restoring rebuilds the pool.
    """

    def __init__(self, stream: ShardStream, take: Callable[[], object], length: Callable[[object], int],
                 pool_items: int, token_budget: int, n_chunks: int, seed: int):
        self.stream, self.take, self.length = stream, take, length
        self.pool_items, self.token_budget, self.n_chunks = pool_items, token_budget, n_chunks
        self._seed = [seed_word(seed), name_word(stream.name), POOL_TAG]
        self._start: Optional[dict] = None
        self._batches: list[list] = []
        self._used = 0

    def state(self) -> Optional[dict]:
        return None if self._start is None else {"start": dict(self._start), "used": self._used}

    def load_state(self, state: Optional[dict]) -> None:
        self._start, self._batches, self._used = None, [], 0
        if state is not None:
            self.stream.load_state(state["start"])
            self._fill()
            self._used = int(state["used"])

    def next_batch(self) -> list:
        while self._used >= len(self._batches):
            self._fill()
        self._used += 1
        return self._batches[self._used - 1]

    def _fill(self) -> None:
        self._start = self.stream.state()
        items = [self.take() for _ in range(self.pool_items)]
        lengths = np.array([self.length(it) for it in items])
        order = np.argsort(lengths, kind="stable")
        batches, i = [], 0
        while i + self.n_chunks <= len(order):
            k = self.n_chunks                         # grow by n_chunks while the padded size fits the budget
            while i + k + self.n_chunks <= len(order) and \
                    (k + self.n_chunks) * lengths[order[i + k + self.n_chunks - 1]] <= self.token_budget:
                k += self.n_chunks
            batches.append([items[j] for j in order[i:i + k]])
            i += k
        start = self._start
        rng = np.random.default_rng([*self._seed, start["epoch"], start["shard"], start["row"]])
        self._batches = [batches[j] for j in rng.permutation(len(batches))]
        self._used = 0
