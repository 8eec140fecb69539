"""The `pretrain` section.

`model`, `masking` and `adversarial` are the library's own dataclasses (xlm_core.model_config.ModelSpec,
xlm_core.settings.MaskingConfig / AdversarialConfig): pydantic validates them, running their rules, so a setting
is defined and checked in one place. What is left here are the settings only the stage reads.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, Field, field_validator, model_validator

from pipeline.params.base import LangCode, Strict
from xlm_core.model_config import ModelSpec
from xlm_core.settings import (AdversarialConfig, MaskingConfig, TranslationRankingConfig, check_objective_weights,
                               seq_len_doublings)


class OptimizerParams(Strict):
    lr: float = Field(default=1e-3, gt=0, le=1)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.98)  # AdamW's
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
    model: ModelSpec = ModelSpec()
    seq_len: int = Field(default=128, ge=8)
    seq_len_warmup: SeqLenWarmupParams = SeqLenWarmupParams()
    batch_size: int = Field(default=32, ge=1, description="sequences per optimizer step, all ranks together")
    accum_steps: int = Field(default=1, ge=1)
    mode: Literal["stream", "sentence"] = "stream"
    token_budget: Optional[int] = Field(default=None, ge=8, description="sentence mode: tokens per batch")
    objectives: Annotated[dict[Literal["mlm", "tlm", "clm", "tr"], float],
                          AfterValidator(check_objective_weights)] = {"mlm": 1.0}
    alpha: float = Field(default=0.5, gt=0, le=1, description="language sampling exponent q_i ∝ p_i^alpha")
    masking: MaskingConfig = MaskingConfig()
    adversarial: AdversarialConfig = AdversarialConfig()
    translation_ranking: TranslationRankingConfig = TranslationRankingConfig()
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

    @field_validator("masking")
    @classmethod
    def _smoothing_is_not_wired(cls, masking: MaskingConfig) -> MaskingConfig:
        # The library can weight targets by piece frequency (xlm_core.masking.frequency_weights), but the shards
        # carry no per-piece counts for the stage to build those weights from; refuse rather than ignore.
        if masking.smoothing > 0:
            raise ValueError(f"smoothing = {masking.smoothing!r}: frequency-smoothed targets are not available in "
                             f"pretraining (the shards carry no per-piece counts); set it to 0")
        return masking

    @model_validator(mode="after")
    def _adversarial_layer_exists(self):
        if self.adversarial.enabled:
            n_layers = self.model.config(vocab_size=16, n_languages=1).n_layers   # sizes do not depend on the vocab
            try:
                self.adversarial.layer_of(n_layers)
            except ValueError:
                raise ValueError(f"adversarial.layer = {self.adversarial.layer}: the model has {n_layers} layers; "
                                 f"use 1 to {n_layers}, or null for the middle one") from None
        return self

    @model_validator(mode="after")
    def _seq_len_fits_the_model(self):
        max_positions = self.model.config(vocab_size=16, n_languages=1).max_positions
        if self.seq_len > max_positions:
            raise ValueError(f"seq_len = {self.seq_len}: exceeds the model's max_positions = {max_positions} (preset "
                             f"{self.model.preset}); lower seq_len or raise model.max_positions")
        return self

    @model_validator(mode="after")
    def _translation_ranking_layer_exists(self):
        if self.objectives.get("tr", 0) > 0:
            n_layers = self.model.config(vocab_size=16, n_languages=1).n_layers
            try:
                self.translation_ranking.layer_of(n_layers)
            except ValueError:
                raise ValueError(f"translation_ranking.layer = {self.translation_ranking.layer}: the model has "
                                 f"{n_layers} layers; use 0 to {n_layers}, or null for the last one") from None
            if self.translation_ranking.pairs < 2 * self.accum_steps * self.nproc:
                raise ValueError(f"translation_ranking.pairs = {self.translation_ranking.pairs}: needs >= 2 pairs per "
                                 f"micro-batch ({self.accum_steps * self.nproc} per step); raise it")
        return self

    @model_validator(mode="after")
    def _seq_len_warmup(self):
        warmup = self.seq_len_warmup
        if warmup.steps and warmup.start < self.seq_len:
            try:
                seq_len_doublings(self.seq_len, warmup.start)
            except ValueError as exc:
                raise ValueError(f"seq_len_warmup.{exc}") from None
            if self.mode != "stream":
                raise ValueError("seq_len_warmup needs mode: stream (sentence mode has no fixed rows to cut); "
                                 "set seq_len_warmup.steps: 0")
        return self
