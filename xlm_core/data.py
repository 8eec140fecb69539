"""The pretraining data loader: deterministic, exactly resumable, and the same under any ranks x accumulation split.

Pieces, from the bottom up:

- **Streams.** One per (kind, key): a ``MonoStream`` per language (shared by MLM and CLM) and a ``ParaStream`` per
  pair ``"en-fr"`` (TLM). A stream walks epochs. At each epoch start it permutes its shard files with an RNG seeded
  from (seed, stream key, epoch); each shard is read (only the needed columns, only the rows of its language/pair)
  and its rows permuted with an RNG seeded from (seed, stream key, epoch, shard index): the shard is the bounded
  shuffle buffer. A stream's whole state is four ints, ``epoch, shard, row, offset`` (``offset``: tokens of the
  current sentence already consumed by the block builder), so restoring recomputes the permutations, reloads one
  shard and continues exactly where it was.
- **Blocks** (``mode="stream"``, XLM's stream mode). A language's sentences, in stream order, are concatenated as
  ``s1 </s> s2 </s> ...`` and cut into pieces of ``seq_len - 1`` tokens; every block is ``<s>`` + one piece, so all
  blocks are exactly ``seq_len`` long with no padding, and a sentence straddling two blocks continues in that
  language's next block. ``mode="sentence"``: each item is ``<s> sentence </s>`` truncated to ``seq_len``; a pool of
  ``pool_sentences`` consecutive items is sorted by length and cut into batches whose padded size
  (items x longest item) fits ``token_budget``; the batch order inside the pool is shuffled (seeded by the pool's
  start position). TLM items (``batch_size`` pairs in stream mode, budgeted pools in sentence mode) are laid out by
  ``xlm_core.objectives.build_tlm_batch``; each pair's direction is flipped at random by the step's RNG.
- **Step schedule.** Step ``s`` draws its objective (from the objective weights) and its language or pair
  (q_i ∝ p_i^alpha over the train manifest's token counts) from ``np.random.default_rng([seed, s])``: stateless, so
  resuming needs no RNG state and every rank draws the same. A step is one objective x one language/pair, as in XLM.
- **Chunks.** The global batch of a step is split into ``world_size * accum_steps`` equal, contiguous chunks; chunk
  ``g = micro_step * world_size + rank`` (micro-step major). Every rank advances the streams over the whole global
  batch (cheap integer/array work) and turns only its own chunks into tensors, so 2 ranks x 1 accumulation step see
  exactly the chunks 1 rank x 2 steps sees. Each chunk carries ``chunk_seed(seed, step, g)`` for its masking RNG.
- **Loader.** ``PretrainLoader`` yields, per step, this rank's ``accum_steps`` micro-batches, produced ahead in a
  background thread; each stream also reads its next shard ahead on a small thread pool. ``state_dict()`` is the
  position after the last step handed to the caller (each produced step carries a snapshot), JSON-serialisable.
  Neither thread changes what is produced, only when.

The trainer side, for one rank::

    loader = PretrainLoader("data/shards/train", languages, pairs, {"mlm": 1, "tlm": 0.5}, alpha=0.5, seq_len=256,
                            batch_size=256, seed=1234, rank=rank, world_size=world, accum_steps=accum)
    loader.load_state_dict(checkpoint_meta["data"])            # on resume
    for micro_batches in loader:                                # one optimizer step
        for mb in micro_batches:
            mb = mb.to(device)
            generator.manual_seed(mb.chunk_seed)                # masks independent of the ranks x accum split
            loss = mlm_loss(model, mb.model_inputs(), masking, generator)
        ...
        meta["data"] = loader.state_dict()                      # with the checkpoint of this step
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import queue
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from xlm_core.objectives import build_mono_batch, build_tlm_batch
from xlm_core.shards import KINDS, MANIFEST, ShardError, ShardFile, ShardSet
from xlm_core.special_tokens import BOS, EOS, PAD
from xlm_core.errors import XLMError

if TYPE_CHECKING:
    from xlm_core.tokenizer import Tokenizer

OBJECTIVES = ("mlm", "tlm", "clm")
MONO_OBJECTIVES = ("mlm", "clm")
MODES = ("stream", "sentence")
STATE_VERSION = 1
_U64 = (1 << 64) - 1
_MASK_TAG = 0x6D61736B  # "mask": keeps chunk seeds apart from every other seeded stream
_POOL_TAG = 0x706F6F6C  # "pool"


class DataError(XLMError, ValueError):
    """The shards or the loader settings cannot give the requested data; the message says what, where and how to fix.

    (xlm_core must not import pipeline; the pretrain stage turns this into a PipelineError.)
    """


# ------------------------------------------------------------------------------------------------------------ seeds
def _seed_word(seed: int) -> int:
    """numpy seed sequences take non-negative ints; fold any int seed into 64 bits."""
    return int(seed) & _U64


def _name_word(name: str) -> int:
    """A stable (process-independent) integer for a stream name; Python's hash() is salted per process."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The RNG of one optimizer step (objective, language/pair, TLM directions): a pure function of (seed, step)."""
    return np.random.default_rng([_seed_word(seed), int(step)])


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    """Seed for the masking RNG of chunk ``chunk`` of step ``step``, in [0, 2**63): same under any ranks x accum."""
    state = np.random.SeedSequence([_seed_word(seed), int(step), int(chunk), _MASK_TAG]).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------------- the manifest
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


# ------------------------------------------------------------------------------------------------ reading shards
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
        data = split.shards.read_verified(file)
        return pq.read_table(pa.BufferReader(data), columns=columns, filters=filters)
    except ShardError as exc:
        raise DataError(str(exc)) from None
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{file.path}: cannot read shard ({exc}); rerun `dvc repro shard`") from None


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


# ------------------------------------------------------------------------------------------------------- streams
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


class _ShardStream:
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
        self._seed = [_seed_word(seed), _name_word(self.name)]
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


class MonoStream(_ShardStream):
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


class ParaStream(_ShardStream):
    kind = "para"

    def _read(self, file: ShardFile) -> tuple:
        return read_para_rows(self.split, file, self.key)

    def next_pair(self) -> tuple[np.ndarray, np.ndarray]:
        shard = self._current()
        i = int(shard.perm[self.row])
        self.row += 1
        return shard.data[0].row(i), shard.data[1].row(i)


# ------------------------------------------------------------------------------------------------------- batches
# Sentence-mode and TLM items are laid out by xlm_core.objectives (build_mono_batch: `<s> a </s>`; build_tlm_batch:
# `<s> a </s> </s> b </s>`, positions restarting on the target side): one place for the layouts the model sees.
def sentence_item_length(sentence: np.ndarray, seq_len: int) -> int:
    """Length of build_mono_batch's `<s> sentence </s>` after truncation to ``seq_len``."""
    return min(len(sentence), seq_len - 2) + 2


def pair_item_length(src: np.ndarray, tgt: np.ndarray, seq_len: int) -> int:
    """Length of build_tlm_batch's `<s> src </s> </s> tgt </s>` after truncation to ``seq_len``."""
    return min(len(src) + len(tgt), seq_len - 4) + 4


@dataclass
class Batch:
    """One micro-batch (chunk ``chunk`` of step ``step``'s global batch); padding is ``PAD`` in ``input_ids``."""

    objective: str                          # "mlm" | "tlm" | "clm"
    key: str                                # language ("en") or pair ("en-fr")
    input_ids: torch.Tensor                 # LongTensor [B, T]
    lang_ids: torch.Tensor                  # LongTensor [B, T], index into the loader's `languages`
    position_ids: Optional[torch.Tensor]    # LongTensor [B, T] for TLM (restart on the target side); else None
    n_tokens: int                           # non-PAD tokens
    chunk_seed: int                         # seed a torch.Generator with it for this chunk's masking
    step: int
    chunk: int                              # g = micro_step * world_size + rank

    @property
    def attention_mask(self) -> torch.Tensor:
        """True at real tokens, False at padding."""
        return self.input_ids.ne(PAD)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The dict xlm_core.objectives' losses take (attention_mask only when something is padded)."""
        out = {"input_ids": self.input_ids, "lang_ids": self.lang_ids}
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        if self.n_tokens < self.input_ids.numel():
            out["attention_mask"] = self.attention_mask
        return out

    def _map(self, fn) -> "Batch":
        return replace(self, input_ids=fn(self.input_ids), lang_ids=fn(self.lang_ids),
                       position_ids=None if self.position_ids is None else fn(self.position_ids))

    def to(self, device: Union[str, torch.device], non_blocking: bool = True) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def cut_rows(self, length: int) -> "Batch":
        """Stream-mode rows [B, T] cut into [B·T/length, length] (the sequence-length curriculum); rows that are
        all padding are dropped. The same tokens in the same order, so n_tokens and chunk_seed stay as they are."""
        T = self.input_ids.shape[1]
        if length >= T:
            return self
        if self.position_ids is not None or T % length:
            raise ValueError(f"cut_rows({length}): needs stream-mode rows whose length ({T}) it divides")
        real = self.input_ids.reshape(-1, length).ne(PAD).any(dim=1)
        if bool(real.all()):  # the usual case: a view, no copy
            return self._map(lambda t: t.reshape(-1, length))
        return self._map(lambda t: t.reshape(-1, length)[real])

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())


def _make_batch(objective: str, key: str, input_ids: torch.Tensor, lang_ids: torch.Tensor,
                position_ids: Optional[torch.Tensor], seed: int, step: int, chunk: int) -> Batch:
    if lang_ids.dim() == 1:   # one language per row -> per token
        lang_ids = lang_ids[:, None].expand_as(input_ids).contiguous()
    return Batch(objective=objective, key=key, input_ids=input_ids, lang_ids=lang_ids, position_ids=position_ids,
                 n_tokens=int(input_ids.ne(PAD).sum()), chunk_seed=chunk_seed(seed, step, chunk), step=step,
                 chunk=chunk)


def _with_bos(body: np.ndarray) -> np.ndarray:
    """Stream-mode blocks: ``<s>`` + ``seq_len - 1`` tokens of the language's text."""
    blocks = np.empty((body.shape[0], body.shape[1] + 1), dtype=np.int64)
    blocks[:, 0] = BOS
    blocks[:, 1:] = body
    return blocks


def _block_batch(objective: str, key: str, blocks: np.ndarray, lang: int, seed: int, step: int, chunk: int) -> Batch:
    ids = torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.int64))
    return _make_batch(objective, key, ids, torch.full_like(ids, lang), None, seed, step, chunk)


def _sentence_batch(objective: str, key: str, sentences: Sequence[np.ndarray], lang: int, seq_len: int, seed: int,
                    step: int, chunk: int) -> Batch:
    built = build_mono_batch([s.tolist() for s in sentences], lang, seq_len)
    return _make_batch(objective, key, built["input_ids"], built["lang_ids"], None, seed, step, chunk)


def _pair_batch(key: str, pairs: Sequence[tuple[np.ndarray, np.ndarray]], src_langs: Sequence[int],
                tgt_langs: Sequence[int], seq_len: int, seed: int, step: int, chunk: int) -> Batch:
    built = build_tlm_batch([p[0].tolist() for p in pairs], [p[1].tolist() for p in pairs], list(src_langs),
                            list(tgt_langs), seq_len)
    return _make_batch("tlm", key, built["input_ids"], built["lang_ids"], built["position_ids"], seed, step, chunk)


# ---------------------------------------------------------------------------------------------- step schedule
def sampling_probs(token_counts: dict[str, int], alpha: float) -> dict[str, float]:
    """q_i ∝ p_i^alpha with p_i the share of tokens (XLM's multinomial smoothing; alpha=1 keeps the corpus mix)."""
    total = sum(token_counts.values())
    weights = {k: (n / total) ** alpha for k, n in token_counts.items()}
    norm = sum(weights.values())
    return {k: w / norm for k, w in weights.items()}


class _Categorical:
    """Draw a name with probability ∝ its weight from one uniform number (cheaper than Generator.choice)."""

    def __init__(self, weights: dict[str, float]):
        self.names = list(weights)
        self.cumulative = list(itertools.accumulate(weights.values()))

    def pick(self, rng: np.random.Generator) -> str:
        u = rng.random() * self.cumulative[-1]
        return self.names[min(bisect.bisect_right(self.cumulative, u), len(self.names) - 1)]


@dataclass
class StepPlan:
    step: int
    objective: str
    key: str
    rng: np.random.Generator      # the step's RNG after the two draws (TLM directions come from it)


@dataclass
class StepSchedule:
    """Which objective and language/pair each step trains: a pure function of (seed, step)."""

    seed: int
    objective_weights: dict[str, float]          # only objectives with weight > 0
    lang_probs: dict[str, float]                 # MLM/CLM
    pair_probs: dict[str, float] = field(default_factory=dict)   # TLM

    def __post_init__(self):
        objectives = {o: self.objective_weights[o] for o in OBJECTIVES if self.objective_weights.get(o, 0) > 0}
        self._choices = {"objective": _Categorical(objectives), "mono": _Categorical(self.lang_probs),
                         "para": _Categorical(self.pair_probs)}

    def draw(self, step: int) -> StepPlan:
        rng = step_rng(self.seed, step)
        objective = self._choices["objective"].pick(rng)
        key = self._choices["para" if objective == "tlm" else "mono"].pick(rng)
        return StepPlan(step=step, objective=objective, key=key, rng=rng)


# ------------------------------------------------------------------------------------------- sentence-mode pools
class _LengthPool:
    """Sentence mode: pools of consecutive items sorted by length, cut into token-budget batches, order shuffled.

    Batches hold a multiple of ``n_chunks`` items (so chunks are equal); the < n_chunks items left at a pool's end
    are skipped. State = the stream position at the pool's start + batches handed out, so restoring rebuilds the pool.
    """

    def __init__(self, stream: _ShardStream, take: Callable[[], object], length: Callable[[object], int],
                 pool_items: int, token_budget: int, n_chunks: int, seed: int):
        self.stream, self.take, self.length = stream, take, length
        self.pool_items, self.token_budget, self.n_chunks = pool_items, token_budget, n_chunks
        self._seed = [_seed_word(seed), _name_word(stream.name), _POOL_TAG]
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


# --------------------------------------------------------------------------------------------------- the loader
def _normalise_pairs(pairs: Sequence[Union[str, Sequence[str]]]) -> list[str]:
    return [p if isinstance(p, str) else f"{p[0]}-{p[1]}" for p in pairs]


def _require_tokens(counts: dict[str, int], wanted: list[str], what: str, split: SplitInfo) -> dict[str, int]:
    missing = [k for k in wanted if counts.get(k, 0) <= 0]
    if missing:
        raise DataError(f"{split.manifest_path}: no tokens for {what} {missing} (it has "
                        f"{sorted(k for k, n in counts.items() if n > 0)}); add data for them in download/clean, or "
                        f"remove them from {what} in params.yaml")
    return {k: counts[k] for k in wanted}


@dataclass
class _Produced:
    step: int
    batches: list[Batch]
    state_after: dict


@dataclass
class _Failure:
    exc: BaseException


class PretrainLoader:
    """Endless iterator of training steps: ``next(loader)`` is this rank's ``accum_steps`` micro-batches of one step.

    ``batch_size`` is the global number of sequences per step (stream mode, a multiple of world_size x accum_steps);
    sentence mode uses ``token_budget`` padded tokens per global batch instead. ``objectives`` maps mlm/tlm/clm to
    weights. ``split_dir`` is the train shard folder (data/shards/train).
    """

    def __init__(self, split_dir: Union[str, Path], languages: Sequence[str],
                 pairs: Sequence[Union[str, Sequence[str]]], objectives: dict[str, float], alpha: float,
                 seq_len: int, batch_size: int, mode: str = "stream", seed: int = 0, rank: int = 0,
                 world_size: int = 1, accum_steps: int = 1, token_budget: Optional[int] = None, prefetch: int = 2,
                 pool_sentences: int = 4096, pin_memory: Optional[bool] = None, read_ahead: bool = True,
                 tokenizer: Optional["Tokenizer"] = None):
        self.languages = list(languages)
        self.pairs = _normalise_pairs(pairs)
        self.seq_len, self.batch_size, self.mode, self.seed = int(seq_len), int(batch_size), mode, int(seed)
        self.rank, self.world_size, self.accum_steps = int(rank), int(world_size), int(accum_steps)
        self.n_chunks = self.world_size * self.accum_steps
        self.token_budget, self.pool_sentences = token_budget, int(pool_sentences)
        self.prefetch = int(prefetch)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.read_ahead = read_ahead
        self._executor: Optional[ThreadPoolExecutor] = None
        self._check_settings(objectives)
        weights = {o: float(w) for o, w in objectives.items() if w > 0}

        split = open_split(split_dir, tokenizer=tokenizer)
        self.split = split
        self._lang_index = {lang: i for i, lang in enumerate(self.languages)}
        lang_probs, pair_probs = {}, {}
        if any(o in weights for o in MONO_OBJECTIVES):
            lang_probs = sampling_probs(_require_tokens(split.lang_tokens, self.languages, "languages", split), alpha)
        if "tlm" in weights:
            if not self.pairs:
                raise DataError("objectives: tlm has weight > 0 but pairs is empty; list pairs (e.g. [en-fr]) or "
                                "set the tlm weight to 0")
            pair_probs = sampling_probs(_require_tokens(split.pair_tokens, self.pairs, "pairs", split), alpha)
        self.schedule = StepSchedule(self.seed, weights, lang_probs, pair_probs)

        self._mono = {lang: MonoStream(split, lang, self.seed) for lang in lang_probs}
        self._para = {pair: ParaStream(split, pair, self.seed) for pair in pair_probs}
        self._pools: dict[str, _LengthPool] = {}
        if mode == "sentence":
            for stream in self._mono.values():
                self._pools[stream.name] = _LengthPool(
                    stream, stream.next_sentence, lambda it: sentence_item_length(it, self.seq_len),
                    self.pool_sentences, self.token_budget, self.n_chunks, self.seed)
            for stream in self._para.values():
                self._pools[stream.name] = _LengthPool(
                    stream, stream.next_pair, lambda it: pair_item_length(it[0], it[1], self.seq_len),
                    self.pool_sentences, self.token_budget, self.n_chunks, self.seed)
        self._next_step = 0                       # producer side
        self._consumed_state = self._snapshot()   # position after the last step handed to the caller
        self._queue: Optional[queue.Queue] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._failure: Optional[BaseException] = None
        self._rewind = False                      # the stopped producer ran ahead of the consumer

    def _open_read_ahead(self) -> None:
        """Start the shard read-ahead pool (when iteration starts) and preload every stream's current shard."""
        if not self.read_ahead or self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="xlm-shard-read")
        for stream in self._streams().values():
            stream.read_ahead = self._executor
            stream.preload()

    def _close_read_ahead(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        for stream in self._streams().values():
            stream.read_ahead = None

    def _check_settings(self, objectives: dict[str, float]) -> None:
        unknown = sorted(set(objectives) - set(OBJECTIVES))
        if unknown:
            raise DataError(f"objectives: unknown {unknown}; allowed: {list(OBJECTIVES)}")
        if not any(w > 0 for w in objectives.values()) or any(w < 0 for w in objectives.values()):
            raise DataError(f"objectives {objectives}: weights must be >= 0 with at least one > 0")
        if self.mode not in MODES:
            raise DataError(f"mode {self.mode!r}: allowed: {list(MODES)}")
        if self.seq_len < 8:
            raise DataError(f"seq_len {self.seq_len}: must be at least 8")
        if not 0 <= self.rank < self.world_size:
            raise DataError(f"rank {self.rank} is outside world_size {self.world_size}")
        if self.mode == "stream" and (self.batch_size < self.n_chunks or self.batch_size % self.n_chunks):
            raise DataError(f"batch_size {self.batch_size} must be a multiple of world_size x accum_steps "
                            f"({self.world_size} x {self.accum_steps} = {self.n_chunks})")
        if self.mode == "sentence":
            need = self.n_chunks * self.seq_len
            if self.token_budget is None or self.token_budget < need:
                raise DataError(f"token_budget {self.token_budget}: sentence mode needs at least world_size x "
                                f"accum_steps x seq_len = {need} tokens per step, so every chunk can hold one "
                                f"longest item")
            if self.pool_sentences < self.n_chunks:
                raise DataError(f"pool_sentences {self.pool_sentences} is below world_size x accum_steps")
        missing = [lang for pair in self.pairs for lang in pair.split("-") if lang not in self.languages]
        if missing:
            raise DataError(f"pairs {self.pairs} use {sorted(set(missing))}, which are not in languages "
                            f"{self.languages}")

    # -- state
    def _streams(self) -> dict[str, _ShardStream]:
        return {s.name: s for s in [*self._mono.values(), *self._para.values()]}

    def _snapshot(self) -> dict:
        return {
            "version": STATE_VERSION,
            "step": self._next_step,
            "seed": self.seed,
            "mode": self.mode,
            "shards": self.split.fingerprint,
            "layout": self._layout_key(),
            "streams": {name: s.state() for name, s in self._streams().items()},
            "pools": {name: p.state() for name, p in self._pools.items()},
        }

    def _layout_key(self) -> Optional[dict]:
        """Settings that shape sentence-mode pools; a saved pool position is meaningless under other values."""
        if self.mode != "sentence":
            return None
        return {"seq_len": self.seq_len, "token_budget": self.token_budget, "pool_sentences": self.pool_sentences,
                "n_chunks": self.n_chunks}

    def state_dict(self) -> dict:
        """JSON-serialisable position after the last step returned by ``next()`` (not what was prefetched)."""
        return json.loads(json.dumps(self._consumed_state))

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the step at which ``state`` was taken (any world_size/accum in stream mode)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}; cannot resume it")
        for name, mine in (("seed", self.seed), ("mode", self.mode), ("shards", self.split.fingerprint),
                           ("layout", self._layout_key())):
            if state.get(name) != mine:
                raise DataError(f"loader state was saved with a different {name} ({state.get(name)!r}, now "
                                f"{mine!r}); resume with the same settings and shards, or start a new run")
        self._stop_producer()
        self._restore(state)

    def _restore(self, state: dict) -> None:
        for name, stream in self._streams().items():
            stream.load_state(state["streams"].get(name, {"epoch": 0, "shard": 0, "row": 0, "offset": 0}))
        for name, pool in self._pools.items():   # after the streams: a pool rewinds its stream and rebuilds itself
            pool.load_state(state["pools"].get(name))
        self._next_step = int(state["step"])
        self._failure, self._rewind = None, False
        self._consumed_state = self._snapshot()
        for stream in self._streams().values():
            stream.preload()

    @property
    def step(self) -> int:
        """The step the next ``next()`` returns."""
        return int(self._consumed_state["step"])

    # -- producing one step
    def _own_chunks(self) -> list[int]:
        return [m * self.world_size + self.rank for m in range(self.accum_steps)]

    def _produce(self) -> _Produced:
        step = self._next_step
        plan = self.schedule.draw(step)
        if plan.objective == "tlm":
            batches = self._tlm_step(plan)
        else:
            batches = self._mono_step(plan)
        if self.pin_memory:
            batches = [b.pin_memory() for b in batches]
        self._next_step = step + 1
        return _Produced(step=step, batches=batches, state_after=self._snapshot())

    def _split(self, items: Sequence) -> list[Sequence]:
        size = len(items) // self.n_chunks
        return [items[g * size:(g + 1) * size] for g in range(self.n_chunks)]

    def _mono_step(self, plan: StepPlan) -> list[Batch]:
        lang = self._lang_index[plan.key]
        stream = self._mono[plan.key]
        if self.mode == "stream":
            rows = self.batch_size // self.n_chunks
            width = self.seq_len - 1
            own, bodies = set(self._own_chunks()), {}
            for g in range(self.n_chunks):   # chunks in order; other ranks' chunks are skipped, not built
                if g in own:
                    bodies[g] = stream.take_tokens(rows * width).reshape(rows, width)
                else:
                    stream.skip_tokens(rows * width)
            return [_block_batch(plan.objective, plan.key, _with_bos(bodies[g]), lang, self.seed, plan.step, g)
                    for g in self._own_chunks()]
        chunks = self._split(self._pools[stream.name].next_batch())
        return [_sentence_batch(plan.objective, plan.key, chunks[g], lang, self.seq_len, self.seed, plan.step, g)
                for g in self._own_chunks()]

    def _tlm_step(self, plan: StepPlan) -> list[Batch]:
        stream = self._para[plan.key]
        if self.mode == "stream":
            items = [stream.next_pair() for _ in range(self.batch_size)]
        else:
            items = self._pools[stream.name].next_batch()
        flip = plan.rng.random(len(items)) < 0.5     # drawn for the whole global batch: same on every rank
        a, b = (self._lang_index[x] for x in plan.key.split("-"))
        chunks = self._split(list(range(len(items))))
        out = []
        for g in self._own_chunks():
            idx = chunks[g]
            pairs = [(items[i][1], items[i][0]) if flip[i] else items[i] for i in idx]
            out.append(_pair_batch(plan.key, pairs, [b if flip[i] else a for i in idx],
                                   [a if flip[i] else b for i in idx], self.seq_len, self.seed, plan.step, g))
        return out

    # -- iteration and the prefetch thread
    def __iter__(self) -> "PretrainLoader":
        return self

    def __next__(self) -> list[Batch]:
        if self._failure is not None:
            raise self._failure
        if self._rewind:
            self._restore(self._consumed_state)
        if self.prefetch <= 0:
            self._open_read_ahead()
            item = self._produce()
        else:
            item = self._get()
        self._consumed_state = item.state_after
        return item.batches

    def _get(self) -> _Produced:
        if self._thread is None:
            self._start_producer()
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    self._failure = RuntimeError("the data loader thread stopped without a result")
                    raise self._failure
                continue
            if isinstance(item, _Failure):
                self._failure = item.exc
                raise item.exc
            return item

    def _start_producer(self) -> None:
        self._open_read_ahead()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._run_producer, args=(self._stop, self._queue),
                                        name="xlm-data-loader", daemon=True)
        self._thread.start()

    def _run_producer(self, stop: threading.Event, out: queue.Queue) -> None:
        while not stop.is_set():
            try:
                item = self._produce()
            except BaseException as exc:  # handed to the consumer, who re-raises it with its message
                item = _Failure(exc)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failure):
                return

    def _stop_producer(self) -> None:
        """Stop the thread; prefetched steps are dropped and the next ``next()`` rewinds to the consumer's position."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread, self._queue = None, None
        self._rewind = True

    def close(self) -> None:
        """Stop the prefetch thread and the shard read-ahead; iterating again restarts them where the caller was."""
        self._stop_producer()
        self._close_read_ahead()

    def __enter__(self) -> "PretrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------- validation
def iter_eval_batches(split_dir: Union[str, Path], languages: Sequence[str], objective: str, key: str, seq_len: int,
                      batch_size: int, max_batches: Optional[int] = None, seed: int = 0,
                      tokenizer: Optional["Tokenizer"] = None) -> Iterator[Batch]:
    """A deterministic pass over one split (valid/test) for one objective and language or pair, nothing shuffled.

    MLM/CLM: stream-mode blocks in file and row order (the last block padded with PAD). TLM: pairs in order, as
    stored (src -> tgt). ``Batch.step`` is the batch index; ``chunk_seed(seed, index, 0)`` makes masking repeatable.
    """
    if objective not in OBJECTIVES:
        raise DataError(f"objective {objective!r}: allowed: {list(OBJECTIVES)}")
    split = open_split(split_dir, tokenizer=tokenizer)
    lang_index = {lang: i for i, lang in enumerate(languages)}
    if objective == "tlm":
        _require_tokens(split.pair_tokens, [key], "pairs", split)
        gen = _eval_tlm(split, lang_index, key, seq_len, batch_size, seed)
    else:
        _require_tokens(split.lang_tokens, [key], "languages", split)
        gen = _eval_blocks(split, lang_index, objective, key, seq_len, batch_size, seed)
    for index, batch in enumerate(gen):
        if max_batches is not None and index >= max_batches:
            return
        yield batch


def _eval_blocks(split: SplitInfo, lang_index: dict, objective: str, lang: str, seq_len: int, batch_size: int,
                 seed: int) -> Iterator[Batch]:
    width = seq_len - 1
    per_batch = batch_size * width
    carry = np.empty(0, dtype=np.int64)
    index = 0

    def emit(tokens: np.ndarray) -> Batch:
        rows = -(-len(tokens) // width)
        body = np.full(rows * width, PAD, dtype=np.int64)
        body[:len(tokens)] = tokens
        return _block_batch(objective, lang, _with_bos(body.reshape(rows, width)), lang_index[lang], seed, index, 0)

    for file in split.files("mono", lang):
        ids = read_mono_rows(split, file, lang)
        carry = np.concatenate([carry, concat_with_eos(ids, np.arange(ids.rows))])
        while len(carry) >= per_batch:
            yield emit(carry[:per_batch])
            carry, index = carry[per_batch:], index + 1
    if len(carry):
        yield emit(carry)


def _eval_tlm(split: SplitInfo, lang_index: dict, pair: str, seq_len: int, batch_size: int,
              seed: int) -> Iterator[Batch]:
    src_lang, tgt_lang = (lang_index[x] for x in pair.split("-"))
    pending, index = [], 0

    def emit() -> Batch:
        n = len(pending)
        return _pair_batch(pair, pending, [src_lang] * n, [tgt_lang] * n, seq_len, seed, index, 0)

    for file in split.files("para", pair):
        src, tgt = read_para_rows(split, file, pair)
        for i in range(src.rows):
            pending.append((src.row(i), tgt.row(i)))
            if len(pending) == batch_size:
                yield emit()
                pending, index = [], index + 1
    if pending:
        yield emit()
