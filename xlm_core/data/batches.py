"""The micro-batch the trainer gets (``Batch``) and how loader items become one.

Stream mode: every block is ``<s>`` + ``seq_len - 1`` tokens of a language's text, no padding. Sentence-mode and TLM
items are laid out by xlm_core.objectives (build_mono_batch: `<s> a </s>`; build_tlm_batch: `<s> a </s> </s> b </s>`,
positions restarting on the target side): one place for the layouts the model sees.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import numpy as np
import torch

from xlm_core.data.seeds import chunk_seed
from xlm_core.objectives import build_dual_batch, build_mono_batch, build_tlm_batch
from xlm_core.special_tokens import BOS, PAD


def sentence_item_length(sentence: np.ndarray, seq_len: int) -> int:
    """Length of build_mono_batch's `<s> sentence </s>` after truncation to ``seq_len``."""
    return min(len(sentence), seq_len - 2) + 2


def pair_item_length(src: np.ndarray, tgt: np.ndarray, seq_len: int) -> int:
    """Length of build_tlm_batch's `<s> src </s> </s> tgt </s>` after truncation to ``seq_len``."""
    return min(len(src) + len(tgt), seq_len - 4) + 4


@dataclass
class Batch:
    """One micro-batch (chunk ``chunk`` of step ``step``'s global batch); padding is ``PAD`` in ``input_ids``."""

    objective: str                          # "mlm" | "tlm" | "clm" | "tr"
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


def with_bos(body: np.ndarray) -> np.ndarray:
    """Stream-mode blocks: ``<s>`` + ``seq_len - 1`` tokens of the language's text."""
    blocks = np.empty((body.shape[0], body.shape[1] + 1), dtype=np.int64)
    blocks[:, 0] = BOS
    blocks[:, 1:] = body
    return blocks


def block_batch(objective: str, key: str, blocks: np.ndarray, lang: int, seed: int, step: int, chunk: int) -> Batch:
    ids = torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.int64))
    return _make_batch(objective, key, ids, torch.full_like(ids, lang), None, seed, step, chunk)


def sentence_batch(objective: str, key: str, sentences: Sequence[np.ndarray], lang: int, seq_len: int, seed: int,
                    step: int, chunk: int) -> Batch:
    built = build_mono_batch([s.tolist() for s in sentences], lang, seq_len)
    return _make_batch(objective, key, built["input_ids"], built["lang_ids"], None, seed, step, chunk)


def pair_batch(key: str, pairs: Sequence[tuple[np.ndarray, np.ndarray]], src_langs: Sequence[int],
                tgt_langs: Sequence[int], seq_len: int, seed: int, step: int, chunk: int) -> Batch:
    built = build_tlm_batch([p[0].tolist() for p in pairs], [p[1].tolist() for p in pairs], list(src_langs),
                            list(tgt_langs), seq_len)
    return _make_batch("tlm", key, built["input_ids"], built["lang_ids"], built["position_ids"], seed, step, chunk)


def dual_batch(key: str, pairs: Sequence[tuple[np.ndarray, np.ndarray]], src_langs: Sequence[int],
               tgt_langs: Sequence[int], max_len: int, seed: int, step: int, chunk: int) -> Batch:
    """Translation ranking: the chunk's N sources, then its N targets, each side alone (build_dual_batch)."""
    built = build_dual_batch([p[0].tolist() for p in pairs], [p[1].tolist() for p in pairs], list(src_langs),
                             list(tgt_langs), max_len)
    return _make_batch("tr", key, built["input_ids"], built["lang_ids"], None, seed, step, chunk)
