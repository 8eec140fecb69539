"""The `pretrain` section."""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, model_validator

from pipeline.params.base import LangCode, Strict

# ----------------------------------------------------------------------------------------------------------- pretrain
class ModelParams(Strict):
    preset: Literal["tiny", "small", "base", "large"] = "small"
    # Optional overrides of the preset's sizes.
    n_layers: Optional[int] = Field(default=None, ge=1)
    d_model: Optional[int] = Field(default=None, ge=8)
    n_heads: Optional[int] = Field(default=None, ge=1)
    d_ff: Optional[int] = Field(default=None, ge=8)
    init_std: Optional[float] = Field(default=None, gt=0, le=1, description="N(0, std) init; null = 0.02 (BERT)")
    dropout: float = Field(default=0.1, ge=0, lt=1)
    attention_dropout: float = Field(default=0.0, ge=0, lt=1)
    use_lang_emb: bool = False
    positions: Literal["learned", "sinusoidal"] = "learned"
    pre_ln: bool = False
    causal: bool = False


class MaskingParams(Strict):
    rate: float = Field(default=0.15, gt=0, lt=1)
    mask: float = Field(default=0.8, ge=0, le=1)
    random: float = Field(default=0.1, ge=0, le=1)
    keep: float = Field(default=0.1, ge=0, le=1)
    smoothing: float = Field(default=0.0, ge=0, le=1, description="XLM frequency smoothing exponent; 0 = off")

    @model_validator(mode="after")
    def _sums_to_one(self):
        total = self.mask + self.random + self.keep
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"mask + random + keep must be 1, got {total:g}")
        return self


class AdversarialParams(Strict):
    weight: float = Field(default=0.0, ge=0, description="0 turns the language discriminator off")
    lambda_max: float = Field(default=1.0, ge=0)
    warmup_steps: int = Field(default=200, ge=0)
    layer: Optional[int] = Field(default=None, ge=1, description="encoder layer read (default: the middle one)")
    hidden: int = Field(default=256, ge=8)


class OptimizerParams(Strict):
    lr: float = Field(default=1e-3, gt=0, le=1)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(default=1e-6, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    clip_norm: float = Field(default=1.0, ge=0, description="0 = no clipping")
    schedule: Literal["inverse_sqrt", "cosine", "linear", "constant"] = "linear"
    warmup_steps: int = Field(default=100, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)


class EmbeddingsParams(Strict):
    # A .vec file for all languages (aligned vectors) or one per language; null = random init.
    vectors: Optional[Union[str, dict[LangCode, str]]] = None


class SeqLenWarmupParams(Strict):
    # Stream-mode MLM/CLM rows start `start` tokens long and double in equal stretches until seq_len at `steps`.
    start: int = Field(default=16, ge=8)
    steps: int = Field(default=0, ge=0, description="0 = off: every step trains on seq_len")


class PretrainParams(Strict):
    model: ModelParams = ModelParams()
    seq_len: int = Field(default=128, ge=8)
    seq_len_warmup: SeqLenWarmupParams = SeqLenWarmupParams()
    batch_size: int = Field(default=32, ge=1, description="sequences per optimizer step, all ranks together")
    accum_steps: int = Field(default=1, ge=1)
    mode: Literal["stream", "sentence"] = "stream"
    token_budget: Optional[int] = Field(default=None, ge=8, description="sentence mode: tokens per batch")
    objectives: dict[Literal["mlm", "tlm", "clm"], Annotated[float, Field(ge=0)]] = {"mlm": 1.0}
    alpha: float = Field(default=0.5, gt=0, le=1, description="language sampling exponent q_i ∝ p_i^alpha")
    masking: MaskingParams = MaskingParams()
    adversarial: AdversarialParams = AdversarialParams()
    optimizer: OptimizerParams = OptimizerParams()
    embeddings: EmbeddingsParams = EmbeddingsParams()
    steps: int = Field(default=1000, ge=1)
    eval_every: int = Field(default=250, ge=1)
    eval_batches: int = Field(default=8, ge=1)
    checkpoint_every: int = Field(default=200, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every: int = Field(default=10, ge=1)
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    nproc: int = Field(default=1, ge=1)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    seed: int = 1234
    max_bad_steps: int = Field(default=5, ge=1, description="stop after this many non-finite losses in a row")
    threads: Optional[int] = Field(default=None, ge=1, description="torch CPU threads per process (default: all)")

    @model_validator(mode="after")
    def _objectives(self):
        if not any(w > 0 for w in self.objectives.values()):
            raise ValueError("objectives: at least one of mlm, tlm, clm needs a weight > 0")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of accum_steps ({self.accum_steps})")
        warmup = self.seq_len_warmup
        if warmup.steps and warmup.start < self.seq_len:
            ratio = self.seq_len // warmup.start
            if self.seq_len % warmup.start or ratio & (ratio - 1):
                raise ValueError(f"seq_len_warmup.start = {warmup.start}: seq_len ({self.seq_len}) / start must be a "
                                 f"power of two (e.g. start {self.seq_len // 8} or {self.seq_len // 4})")
            if self.mode != "stream":
                raise ValueError("seq_len_warmup needs mode: stream (sentence mode has no fixed rows to cut); "
                                 "set seq_len_warmup.steps: 0")
        return self

