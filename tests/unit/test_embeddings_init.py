"""Word-vector init: each piece's row is its word's vector (centred and scaled to the init std, as all the
initialised rows together), the lower-cased form is a fallback, and rows no file knows keep their init."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from xlm_core.embeddings_init import VectorsError, init_embeddings

VECTORS = {"the": [1.0, 2.0, 0.0, -1.0], "cat": [0.5, -0.5, 3.0, 1.0], "sat": [-2.0, 0.0, 1.0, 0.0]}


def _vec_file(path, vectors=VECTORS):
    lines = [f"{len(vectors)} 4"] + [f"{word} {' '.join(map(str, v))}" for word, v in vectors.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_rows_of_known_pieces_are_their_words_vectors(tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(8, 4)
    untouched = weight.clone()
    pieces = [(4, "\u2581the"), (5, "\u2581Cat"), (6, "sat"), (7, "\u2581dog")]
    coverage = init_embeddings(weight, pieces, {"en": _vec_file(tmp_path / "en.vec")}, seed=1, std=0.05)
    assert coverage == {"en": pytest.approx(0.75), "initialised_rows": 3.0}
    expected = np.array([VECTORS["the"], VECTORS["cat"], VECTORS["sat"]])   # "Cat" found lower-cased
    expected -= expected.mean()
    expected *= 0.05 / expected.std()
    torch.testing.assert_close(weight[4:7], torch.as_tensor(expected, dtype=weight.dtype))
    assert torch.equal(weight[:4], untouched[:4]) and torch.equal(weight[7], untouched[7])   # no vector: kept


def test_a_missing_vectors_file_is_a_user_error(tmp_path):
    with pytest.raises(VectorsError, match="not found"):
        init_embeddings(torch.zeros(4, 4), [(0, "the")], {"all": tmp_path / "missing.vec"}, seed=0)
