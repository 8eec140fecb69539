"""The sections of the data stages: `clean`, `tokenizer`, `shard`."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from pipeline.params.base import Strict

# Where a stage's units run (pipeline.fanout): chosen here only, never by probing for a Prefect server.
TaskRunner = Literal["thread", "dask", "prefect"]

# -------------------------------------------------------------------------------------------------------------- clean
class SplitFractions(Strict):
    valid: float = Field(default=0.02, ge=0, lt=0.5)
    test: float = Field(default=0.02, ge=0, lt=0.5)

    @model_validator(mode="after")
    def _training_keeps_half(self):
        held_out = self.valid + self.test
        if held_out > 0.5:
            raise ValueError(f"test = {self.test}: with valid {self.valid} it holds out {100 * held_out:.0f} % of "
                             f"the text, leaving {100 * (1 - held_out):.0f} % for training; keep valid + test <= 0.5 "
                             f"(e.g. 0.02 each)")
        return self


class CleanParams(Strict):
    normalization: Literal["NFC", "NFKC"] = "NFC"
    strip_html: bool = True
    min_chars: int = Field(default=3, ge=1)
    max_chars: int = Field(default=2000, ge=1)
    max_length_ratio: float = Field(default=3.0, ge=1.0)
    drop_identical_pairs: bool = True
    script_check: bool = True
    min_script_fraction: float = Field(default=0.5, ge=0, le=1)
    dedup: bool = True
    # drop training segments whose text is an evaluation-suite text of the same language (role: eval sources)
    decontaminate: bool = True
    split: SplitFractions = SplitFractions()
    split_salt: str = "xlm-pipeline"
    batch_rows: int = Field(default=50_000, ge=100)
    task_runner: TaskRunner = "thread"
    dask_address: Optional[str] = None

    @model_validator(mode="after")
    def _chars(self):
        if self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) is below min_chars ({self.min_chars})")
        return self


# ---------------------------------------------------------------------------------------------------------- tokenizer
class TokenizerParams(Strict):
    model_type: Literal["unigram", "bpe"] = "unigram"
    vocab_size: int = Field(default=8000, ge=16, le=1_000_000)
    character_coverage: float = Field(default=0.9995, gt=0, le=1)
    byte_fallback: bool = False
    alpha: float = Field(default=0.3, gt=0, le=1, description="sampling exponent: q_i ∝ p_i^alpha")
    max_sentences: int = Field(default=200_000, ge=100)
    seed: int = 1234
    threads: int = Field(default=2, ge=1)


# -------------------------------------------------------------------------------------------------------------- shard
class ShardParams(Strict):
    rows_per_shard: int = Field(default=200_000, ge=100)
    batch_rows: int = Field(default=10_000, ge=100)
    threads: int = Field(default=2, ge=1)
    task_runner: TaskRunner = "thread"
    dask_address: Optional[str] = None

