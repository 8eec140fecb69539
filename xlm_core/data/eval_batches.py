"""Deterministic, unshuffled batches of a valid/test split for one objective and language or pair."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import numpy as np

from xlm_core.data.batches import Batch, block_batch, pair_batch, with_bos
from xlm_core.data.split import (DataError, SplitInfo, concat_with_eos, open_split, read_mono_rows, read_para_rows,
                                require_tokens)
from xlm_core.special_tokens import PAD

if TYPE_CHECKING:
    from xlm_core.tokenizer import Tokenizer

# The objectives with a held-out loss (translation ranking's in-batch accuracy depends on the batch, so it has none)
EVAL_OBJECTIVES = ("mlm", "tlm", "clm")


def iter_eval_batches(split_dir: Union[str, Path], languages: Sequence[str], objective: str, key: str, seq_len: int,
                      batch_size: int, max_batches: Optional[int] = None, seed: int = 0,
                      tokenizer: Optional["Tokenizer"] = None) -> Iterator[Batch]:
    """A deterministic pass over one split (valid/test) for one objective and language or pair, nothing shuffled.

    MLM/CLM: stream-mode blocks in file and row order (the last block padded with PAD). TLM: pairs in order, as
    stored (src -> tgt). ``Batch.step`` is the batch index; ``chunk_seed(seed, index, 0)`` makes masking repeatable.
    """
    if objective not in EVAL_OBJECTIVES:
        raise DataError(f"objective {objective!r}: allowed: {list(EVAL_OBJECTIVES)}")
    split = open_split(split_dir, tokenizer=tokenizer)
    lang_index = {lang: i for i, lang in enumerate(languages)}
    if objective == "tlm":
        require_tokens(split.pair_tokens, [key], "pairs", split)
        gen = _eval_tlm(split, lang_index, key, seq_len, batch_size, seed)
    else:
        require_tokens(split.lang_tokens, [key], "languages", split)
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
        return block_batch(objective, lang, with_bos(body.reshape(rows, width)), lang_index[lang], seed, index, 0)

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
        return pair_batch(pair, pending, [src_lang] * n, [tgt_lang] * n, seq_len, seed, index, 0)

    for file in split.files("para", pair):
        src, tgt = read_para_rows(split, file, pair)
        for i in range(src.rows):
            pending.append((src.row(i), tgt.row(i)))
            if len(pending) == batch_size:
                yield emit()
                pending, index = [], index + 1
    if pending:
        yield emit()
