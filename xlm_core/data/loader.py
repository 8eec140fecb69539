"""``PretrainLoader``: the steps of one rank, produced ahead in a background thread, exactly resumable."""
from __future__ import annotations

import json
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from xlm_core.data.batches import (Batch, block_batch, dual_batch, pair_batch, pair_item_length, sentence_batch,
                                  sentence_item_length, with_bos)
from xlm_core.data.schedule import (MONO_OBJECTIVES, OBJECTIVES, PARA_OBJECTIVES, StepPlan, StepSchedule,
                                    sampling_probs)
from xlm_core.data.split import DataError, open_split, require_tokens
from xlm_core.data.streams import LengthPool, MonoStream, ParaStream, ShardStream
from xlm_core.settings import check_objective_weights

if TYPE_CHECKING:
    from xlm_core.tokenizer import Tokenizer

MODES = ("stream", "sentence")
STATE_VERSION = 1


def _normalise_pairs(pairs: Sequence[Union[str, Sequence[str]]]) -> list[str]:
    return [p if isinstance(p, str) else f"{p[0]}-{p[1]}" for p in pairs]


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
    weights. ``split_dir`` is the train shard folder (data/shards/train). A translation-ranking ("tr") step takes
    ``tr_pairs`` pairs (global), each side cut to ``tr_max_len`` tokens.
    """

    def __init__(self, split_dir: Union[str, Path], languages: Sequence[str],
                 pairs: Sequence[Union[str, Sequence[str]]], objectives: dict[str, float], alpha: float,
                 seq_len: int, batch_size: int, mode: str = "stream", seed: int = 0, rank: int = 0,
                 world_size: int = 1, accum_steps: int = 1, token_budget: Optional[int] = None, prefetch: int = 2,
                 pool_sentences: int = 4096, pin_memory: Optional[bool] = None, read_ahead: bool = True,
                 tokenizer: Optional["Tokenizer"] = None, tr_pairs: int = 128, tr_max_len: int = 48):
        self.languages = list(languages)
        self.pairs = _normalise_pairs(pairs)
        self.seq_len, self.batch_size, self.mode, self.seed = int(seq_len), int(batch_size), mode, int(seed)
        self.rank, self.world_size, self.accum_steps = int(rank), int(world_size), int(accum_steps)
        self.n_chunks = self.world_size * self.accum_steps
        self.token_budget, self.pool_sentences = token_budget, int(pool_sentences)
        self.prefetch = int(prefetch)
        self.tr_pairs, self.tr_max_len = int(tr_pairs), int(tr_max_len)
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
            lang_probs = sampling_probs(require_tokens(split.lang_tokens, self.languages, "languages", split), alpha)
        para = [o for o in PARA_OBJECTIVES if o in weights]
        if para:
            if not self.pairs:
                raise DataError(f"objectives: {' and '.join(para)} {'has' if len(para) == 1 else 'have'} weight > 0 "
                                f"but pairs is empty; list pairs (e.g. [en-fr]) or set "
                                f"{' and '.join(para)} to 0")
            if "tr" in weights and self.tr_pairs < 2 * self.n_chunks:
                raise DataError(f"translation_ranking.pairs = {self.tr_pairs}: needs >= 2 pairs per micro-batch "
                                f"({self.n_chunks} micro-batches per step); raise it")
            pair_probs = sampling_probs(require_tokens(split.pair_tokens, self.pairs, "pairs", split), alpha)
        self.schedule = StepSchedule(self.seed, weights, lang_probs, pair_probs)

        self._mono = {lang: MonoStream(split, lang, self.seed) for lang in lang_probs}
        self._para = {pair: ParaStream(split, pair, self.seed) for pair in pair_probs}
        self._pools: dict[str, LengthPool] = {}
        if mode == "sentence":
            for stream in self._mono.values():
                self._pools[stream.name] = LengthPool(
                    stream, stream.next_sentence, lambda it: sentence_item_length(it, self.seq_len),
                    self.pool_sentences, self.token_budget, self.n_chunks, self.seed)
            for stream in self._para.values():
                self._pools[stream.name] = LengthPool(
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
        try:
            check_objective_weights(objectives)
        except ValueError as exc:
            raise DataError(f"objectives {objectives}: {exc}") from None
        if self.mode not in MODES:
            raise DataError(f"mode {self.mode!r}: allowed: {list(MODES)}")
        if self.seq_len < 8:
            raise DataError(f"seq_len {self.seq_len}: must be at least 8")
        if not 0 <= self.rank < self.world_size:
            raise DataError(f"rank {self.rank} is outside world_size {self.world_size}")
        if self.mode == "stream" and (self.batch_size < self.n_chunks or self.batch_size % self.n_chunks):
            raise DataError(f"batch_size {self.batch_size} must be a multiple of world_size x accum_steps "
                            f"({self.world_size} x {self.accum_steps} = {self.n_chunks}); change pretrain.batch_size, "
                            f"nproc or accum_steps")
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
    def _streams(self) -> dict[str, ShardStream]:
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
        for name, pool in self._pools.items():   # a pool rewinds its stream to the pool's start and rebuilds itself
            pool.load_state(state["pools"].get(name))
        # then every stream to its saved position: a pool's batches are a function of its start alone, and a stream
        # also read directly (a translation-ranking step takes pairs from the stream TLM's pool fills from) stands
        # past the pool's end; when the pool is its only reader, that is where the rebuild left it anyway
        for name, stream in self._streams().items():
            stream.load_state(state["streams"].get(name, {"epoch": 0, "shard": 0, "row": 0, "offset": 0}))
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
        elif plan.objective == "tr":
            batches = self._tr_step(plan)
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
            return [block_batch(plan.objective, plan.key, with_bos(bodies[g]), lang, self.seed, plan.step, g)
                    for g in self._own_chunks()]
        chunks = self._split(self._pools[stream.name].next_batch())
        return [sentence_batch(plan.objective, plan.key, chunks[g], lang, self.seq_len, self.seed, plan.step, g)
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
            out.append(pair_batch(plan.key, pairs, [b if flip[i] else a for i in idx],
                                   [a if flip[i] else b for i in idx], self.seq_len, self.seed, plan.step, g))
        return out

    def _tr_step(self, plan: StepPlan) -> list[Batch]:
        stream = self._para[plan.key]
        items = [stream.next_pair() for _ in range(self.tr_pairs)]
        a, b = (self._lang_index[x] for x in plan.key.split("-"))
        chunks = self._split(items)   # each micro-batch ranks within itself: its pairs are each other's negatives
        return [dual_batch(plan.key, chunks[g], [a] * len(chunks[g]), [b] * len(chunks[g]), self.tr_max_len,
                           self.seed, plan.step, g) for g in self._own_chunks()]

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
