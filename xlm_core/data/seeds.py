"""Every seed of the data loader, derived from (seed, names, positions) only: nothing depends on the process or on how
many ranks there are."""
from __future__ import annotations

import hashlib

import numpy as np

_U64 = (1 << 64) - 1
_MASK_TAG = 0x6D61736B  # "mask": keeps chunk seeds apart from every other seeded stream
POOL_TAG = 0x706F6F6C  # "pool": the sentence-mode pools' batch order


def seed_word(seed: int) -> int:
    """numpy seed sequences take non-negative ints; fold any int seed into 64 bits."""
    return int(seed) & _U64


def name_word(name: str) -> int:
    """A stable (process-independent) integer for a stream name; Python's hash() is salted per process."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The RNG of one optimizer step (objective, language/pair, TLM directions): a pure function of (seed, step)."""
    return np.random.default_rng([seed_word(seed), int(step)])


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    """Seed for the masking RNG of chunk ``chunk`` of step ``step``, in [0, 2**63): same under any ranks x accum."""
    state = np.random.SeedSequence([seed_word(seed), int(step), int(chunk), _MASK_TAG]).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << 63) - 1)
