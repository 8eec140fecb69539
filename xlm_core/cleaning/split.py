"""Train/valid/test split of a segment by its id alone, so one id is in the same split in every language and pair."""
from __future__ import annotations

import hashlib

SPLITS = ("train", "valid", "test")
TRAIN, VALID, TEST = 0, 1, 2


def salt_key(salt: str) -> bytes:
    """The blake2b key of ``clean.split_salt`` (blake2b keys are at most 64 bytes, a salt may be longer)."""
    return hashlib.blake2b(salt.encode("utf-8"), digest_size=32).digest()


def split_of(segment_id: str, salt_key: bytes, valid: float, test: float) -> int:
    """TRAIN, VALID or TEST for a segment id: a keyed hash of the id alone, so every language agrees."""
    digest = hashlib.blake2b(segment_id.encode("utf-8"), digest_size=8, key=salt_key).digest()
    u = int.from_bytes(digest, "big") / 2.0 ** 64
    return TEST if u < test else VALID if u < test + valid else TRAIN
