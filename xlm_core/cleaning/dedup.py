"""Exact de-duplication state: the keys (``xlm_core.text.text_key``) of the texts seen so far, with flat memory."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from xlm_core.cleaning.scratch import scratch_db


class SeenTexts:
    """Keys of the texts seen so far in one language, in a sqlite table on disk."""

    def __init__(self, path: Path):
        self._db = scratch_db(path)
        self._db.execute("CREATE TABLE seen (key INTEGER PRIMARY KEY)")
        self._db.execute("CREATE TEMP TABLE batch (key INTEGER PRIMARY KEY)")

    def first_seen(self, keys: np.ndarray) -> np.ndarray:
        """True where ``keys[i]`` occurs neither earlier in ``keys`` nor in any earlier call; records them all."""
        unique, first = np.unique(keys, return_index=True)
        db = self._db
        db.execute("BEGIN")
        db.execute("DELETE FROM batch")
        db.executemany("INSERT INTO batch VALUES (?)", ((k,) for k in unique.tolist()))
        old = np.fromiter((k for (k,) in db.execute("SELECT key FROM batch JOIN seen USING (key)")), dtype=np.int64)
        db.execute("INSERT OR IGNORE INTO seen SELECT key FROM batch")
        db.execute("COMMIT")
        mask = np.zeros(len(keys), dtype=bool)
        mask[first[~np.isin(unique, old, assume_unique=True)]] = True
        return mask

    def close(self) -> None:
        self._db.close()
