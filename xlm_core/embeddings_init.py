"""Initialise token embeddings from pretrained word vectors (word2vec / fastText ``.vec`` text files).

A sentencepiece piece takes the vector of the word it spells (the word-start marker ``▁`` removed; an exact match
first, then the lower-cased form). Where several files (one per language) know the piece, their vectors are averaged.
Vectors of another dimension are mapped to ``d_model`` by a seeded Gaussian projection; every initialised row is then
rescaled so the initialised rows have the model's init standard deviation. Pieces no file knows keep their random init.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
from xlm_core.errors import XLMError

WORD_START = "\u2581"


class VectorsError(XLMError, ValueError):
    """A vectors file that cannot be used (missing, empty, malformed)."""


def read_vec(path: str | Path, wanted: set[str]) -> tuple[dict[str, np.ndarray], int]:
    """Read the vectors of ``wanted`` words from a ``.vec`` file, streaming (files are often GBs).

    The first line may be a ``<count> <dim>`` header (fastText/word2vec) or already a vector line.
    Returns the found vectors and the file's dimension.
    """
    path = Path(path)
    if not path.is_file():
        raise VectorsError(f"word vectors file {path} not found; fix pretrain.embeddings.vectors in params.yaml")
    found: dict[str, np.ndarray] = {}
    dim = None
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                dim = int(parts[1])
                continue
            if len(parts) < 2:
                continue
            if dim is None:
                dim = len(parts) - 1
            if len(parts) - 1 != dim:
                raise VectorsError(f"{path}:{lineno}: expected {dim} numbers after the word, found {len(parts) - 1}")
            word = parts[0]
            if word in wanted and word not in found:
                try:
                    found[word] = np.asarray(parts[1:], dtype=np.float32)
                except ValueError:
                    raise VectorsError(f"{path}:{lineno}: not a number in the vector of {word!r}") from None
    if dim is None:
        raise VectorsError(f"{path}: no vectors in the file")
    return found, dim


def piece_words(pieces: Iterable[tuple[int, str]]) -> dict[int, str]:
    """Map token id -> the word a piece spells (``▁the`` -> ``the``); pieces that spell nothing are skipped."""
    out = {}
    for token_id, piece in pieces:
        word = piece[1:] if piece.startswith(WORD_START) else piece
        if word:
            out[token_id] = word
    return out


def init_embeddings(weight: torch.Tensor, pieces: Iterable[tuple[int, str]], vec_files: Mapping[str, str | Path],
                    seed: int, std: float = 0.02) -> dict[str, float]:
    """Overwrite rows of ``weight`` (vocab × d_model) in place; return the coverage (share of pieces found) per file key.

    ``vec_files`` maps a language (or ``"all"`` for one aligned file) to its ``.vec`` path.
    """
    words = piece_words(pieces)
    wanted = set(words.values()) | {w.lower() for w in words.values()}
    d_model = weight.shape[1]
    sums = np.zeros((weight.shape[0], d_model), dtype=np.float64)
    counts = np.zeros(weight.shape[0], dtype=np.int64)
    coverage: dict[str, float] = {}
    for key, path in sorted(vec_files.items()):
        vectors, dim = read_vec(path, wanted)
        projection = None
        if dim != d_model:
            rng = np.random.default_rng(seed)
            projection = rng.standard_normal((dim, d_model)) / math.sqrt(dim)
        hit = 0
        for token_id, word in words.items():
            vec = vectors.get(word)
            if vec is None:
                vec = vectors.get(word.lower())
            if vec is None:
                continue
            hit += 1
            sums[token_id] += vec @ projection if projection is not None else vec
            counts[token_id] += 1
        coverage[key] = hit / max(1, len(words))
    rows = np.nonzero(counts)[0]
    if len(rows):
        mean = sums[rows] / counts[rows, None]
        mean -= mean.mean()
        scale = std / max(mean.std(), 1e-12)
        with torch.no_grad():
            weight[torch.as_tensor(rows)] = torch.as_tensor(mean * scale, dtype=weight.dtype)
    coverage["initialised_rows"] = float(len(rows))
    return coverage


def init_model_embeddings(model, vectors: str | Path | Mapping[str, str | Path], tokenizer,
                          seed: int) -> dict[str, float]:
    """Initialise ``model.tok_emb`` from ``vectors`` (one file, or language -> file) for the tokenizer's pieces.

    The special ids (the first four and the last, <mask>) keep their random init. Returns the coverage per file.
    """
    files = {"all": vectors} if isinstance(vectors, (str, Path)) else dict(vectors)
    pieces = [(i, tokenizer.id_to_piece(i)) for i in range(4, tokenizer.vocab_size - 1)]
    coverage = init_embeddings(model.tok_emb.weight, pieces, files, seed=seed, std=model.config.init_std)
    if not torch.isfinite(model.tok_emb.weight).all():  # "nan"/"inf" parse as numbers, then every loss is NaN
        raise VectorsError(f"pretrain.embeddings.vectors: {', '.join(map(str, files.values()))} hold NaN or "
                           f"infinite values; fix or replace the file(s) in params.yaml")
    return coverage


def coverage_line(coverage: Mapping[str, float]) -> str:
    """What ``init_model_embeddings`` did, in one line for the log."""
    shown = ", ".join(f"{k} {v:.1%}" for k, v in coverage.items() if k != "initialised_rows")
    return (f"embeddings: initialised {int(coverage['initialised_rows'])} rows from word vectors; coverage of the "
            f"vocabulary per file: {shown}")
