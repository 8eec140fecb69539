"""The project tokenizer: a sentencepiece model plus XLM-R's id layout.

sentencepiece is trained with its defaults ``<unk>``=0, ``<s>``=1, ``</s>``=2 and no pad piece. The project ids put the
special tokens where Hugging Face's XLM-R expects them (see ``xlm_core.special_tokens``)::

    sentencepiece id        project id
    <unk>  0                3   (UNK)
    <s>    1                0   (BOS)
    </s>   2                2   (EOS)
    k >= 3                  k + 1
    -                       1   (PAD)
    -                       N + 1 (<mask>), vocab size N + 2

This class is the only code that applies the mapping; everything downstream sees project ids. The mapping is one
lookup table, applied to whole batches with numpy.

The tokenizer folder (``spm.model``, ``spm.vocab``, ``tokenizer.json``) is written by ``write_tokenizer_dir`` and read
by ``Tokenizer.load``: this module owns both directions of the format.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from xlm_core import special_tokens as st
from xlm_core.atomic import sha256_file, write_json
from xlm_core.errors import XLMError

SPM_MODEL = "spm.model"
SPM_VOCAB = "spm.vocab"
TOKENIZER_JSON = "tokenizer.json"
LAYOUT_NAME = "xlm-r"            # tokenizer.json's "layout": readers refuse a layout they do not know
UINT16_MAX_VOCAB = 1 << 16       # ids fit in uint16 while the vocabulary has at most 65,536 entries

# sentencepiece's own ids for its three control pieces (its training defaults; the trainer sets them explicitly)
SPM_UNK, SPM_BOS, SPM_EOS = 0, 1, 2


class TokenizerError(XLMError):
    """The tokenizer folder is missing, incomplete or inconsistent (one line: what, where, how to fix)."""


def vocab_size_for(spm_pieces: int) -> int:
    """Project vocabulary size for a sentencepiece model of ``spm_pieces`` pieces: ``<pad>`` and ``<mask>`` are added."""
    return spm_pieces + 2


def ids_dtype_for(vocab_size: int) -> np.dtype:
    """The narrowest storage type for token ids (shards use it for their list columns)."""
    return np.dtype(np.uint16) if vocab_size <= UINT16_MAX_VOCAB else np.dtype(np.int32)


def id_layout(spm_pieces: int) -> dict:
    """The layout as written to tokenizer.json, so a reader (or a human) can check it without running code."""
    vocab_size = vocab_size_for(spm_pieces)
    return {
        "name": LAYOUT_NAME,
        "special_tokens": {"<s>": st.BOS, "<pad>": st.PAD, "</s>": st.EOS, "<unk>": st.UNK,
                           "<mask>": st.mask_id(vocab_size)},
        "spm_to_project": {"<unk>": [SPM_UNK, st.UNK], "<s>": [SPM_BOS, st.BOS], "</s>": [SPM_EOS, st.EOS],
                           "piece_offset": st.SPM_OFFSET, "first_piece_spm": 3, "first_piece_project": st.FIRST_PIECE},
        "spm_pieces": spm_pieces,
        "vocab_size": vocab_size,
    }


def _spm_to_project_table(spm_pieces: int) -> np.ndarray:
    table = np.arange(spm_pieces, dtype=np.int64) + st.SPM_OFFSET
    table[SPM_UNK], table[SPM_BOS], table[SPM_EOS] = st.UNK, st.BOS, st.EOS
    return table


def _project_to_spm_table(spm_pieces: int) -> np.ndarray:
    """Inverse table over the project vocabulary; ``<pad>`` and ``<mask>`` have no piece (-1)."""
    vocab_size = vocab_size_for(spm_pieces)
    table = np.full(vocab_size, -1, dtype=np.int64)
    table[_spm_to_project_table(spm_pieces)] = np.arange(spm_pieces)
    return table


class Tokenizer:
    """Encode text to project ids and back. ``Tokenizer.load("data/tokenizer")``."""

    bos_id = st.BOS
    pad_id = st.PAD
    eos_id = st.EOS
    unk_id = st.UNK

    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise TokenizerError(f"{self.model_path}: sentencepiece model not found; run `dvc repro tokenizer`")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.model_path))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"{self.model_path}: not a readable sentencepiece model ({exc}); "
                                 f"run `dvc repro tokenizer`") from None
        if (self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()) != (SPM_UNK, SPM_BOS, SPM_EOS, -1):
            raise TokenizerError(f"{self.model_path}: sentencepiece model has unk/bos/eos/pad ids "
                                 f"{self._sp.unk_id()}/{self._sp.bos_id()}/{self._sp.eos_id()}/{self._sp.pad_id()}, "
                                 f"expected 0/1/2/-1 (train it with `dvc repro tokenizer`)")
        self.spm_pieces = self._sp.get_piece_size()
        self.vocab_size = vocab_size_for(self.spm_pieces)
        self.mask_id = st.mask_id(self.vocab_size)
        self.ids_dtype = ids_dtype_for(self.vocab_size)
        self.sha256 = sha256_file(self.model_path)
        self._to_project = _spm_to_project_table(self.spm_pieces)
        self._to_spm = _project_to_spm_table(self.spm_pieces)

    @classmethod
    def load(cls, tokenizer_dir: str | Path) -> "Tokenizer":
        """Load ``tokenizer_dir/spm.model`` and check it is the model ``tokenizer.json`` describes."""
        tokenizer_dir = Path(tokenizer_dir)
        info_path = tokenizer_dir / TOKENIZER_JSON
        if not info_path.is_file():
            raise TokenizerError(f"{info_path}: not found; run `dvc repro tokenizer`")
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"{info_path}: unreadable ({exc}); run `dvc repro tokenizer`") from None
        if info.get("layout", {}).get("name") != LAYOUT_NAME:
            raise TokenizerError(f"{info_path}: unknown id layout {info.get('layout', {}).get('name')!r}, "
                                 f"expected {LAYOUT_NAME!r}; run `dvc repro tokenizer`")
        tok = cls(tokenizer_dir / SPM_MODEL)
        if info.get("spm_sha256") != tok.sha256:
            raise TokenizerError(f"{tokenizer_dir / SPM_MODEL}: sha256 {tok.sha256[:12]} differs from the "
                                 f"{str(info.get('spm_sha256'))[:12]} recorded in {info_path}; the folder was edited "
                                 f"by hand: run `dvc repro tokenizer`")
        if info.get("vocab_size") != tok.vocab_size:
            raise TokenizerError(f"{info_path}: vocab_size {info.get('vocab_size')} but the model gives "
                                 f"{tok.vocab_size}; run `dvc repro tokenizer`")
        return tok

    # ------------------------------------------------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        """Project ids of ``text``, without ``<s>``/``</s>`` (the data loader adds them)."""
        return self._to_project[np.asarray(self._sp.encode(text), dtype=np.int64)].tolist()

    def encode_flat(self, texts: Sequence[str], threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Encode a batch into one flat id array plus offsets (``ids[offsets[i]:offsets[i+1]]`` is text i).

        sentencepiece encodes the batch on ``threads`` threads and hands back one numpy array per text; the arrays are
        concatenated and mapped in one vectorised step. The ids come back in ``ids_dtype`` and the offsets as int64,
        ready for a pyarrow ListArray.
        """
        texts = list(texts)
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        if not texts:
            return np.zeros(0, dtype=self.ids_dtype), offsets
        pieces = self._sp.encode(texts, out_type="numpy", num_threads=threads)
        np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)), out=offsets[1:])
        flat = np.concatenate(pieces) if offsets[-1] else np.zeros(0, dtype=np.int64)
        return self._to_project[flat].astype(self.ids_dtype, copy=False), offsets

    def encode_batch(self, texts: Sequence[str], threads: int = 1) -> list[np.ndarray]:
        """Project ids for each text (views into one flat array)."""
        ids, offsets = self.encode_flat(texts, threads)
        return [ids[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens other than ``<unk>`` (``<s>``, ``</s>``, ``<pad>``, ``<mask>``) are dropped."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}): {ids.min()}..{ids.max()}")
        spm_ids = self._to_spm[ids]
        keep = (spm_ids >= 0) & (spm_ids != SPM_BOS) & (spm_ids != SPM_EOS)
        return self._sp.decode(spm_ids[keep].tolist())

    # ------------------------------------------------------------------------------------------------------ pieces
    def id_to_piece(self, token_id: int) -> str:
        if token_id == self.pad_id:
            return "<pad>"
        if token_id == self.mask_id:
            return "<mask>"
        return self._sp.id_to_piece(int(self._to_spm[token_id]))

    def piece_to_id(self, piece: str) -> int:
        """Project id of a piece; unknown pieces give ``unk_id``."""
        if piece == "<pad>":
            return self.pad_id
        if piece == "<mask>":
            return self.mask_id
        return int(self._to_project[self._sp.piece_to_id(piece)])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


# ------------------------------------------------------------------------------------------------------------ writer
def write_tokenizer_dir(folder: str | Path, model_bytes: bytes, training: dict) -> None:
    """Write a trained sentencepiece model as the folder ``Tokenizer.load`` reads: ``spm.model``, ``spm.vocab`` and
    ``tokenizer.json`` (the id layout, the model's sha256 and ``training``, the settings and counts it came from).

    ``folder`` must exist; write it inside ``xlm_core.atomic.atomic_dir`` so a reader never sees half of it.
    """
    folder = Path(folder)
    (folder / SPM_MODEL).write_bytes(model_bytes)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    with open(folder / SPM_VOCAB, "w", encoding="utf-8") as fh:   # piece TAB score, as sentencepiece writes it
        for i in range(sp.get_piece_size()):
            fh.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n")
    layout = id_layout(sp.get_piece_size())
    write_json(folder / TOKENIZER_JSON, {
        "layout": layout,
        "vocab_size": layout["vocab_size"],
        "spm_model": SPM_MODEL,
        "spm_sha256": sha256_file(folder / SPM_MODEL),
        "training": training,
    })
