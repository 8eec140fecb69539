"""The training settings params.yaml sets, as the library's dataclasses and rules (no torch, so the schema can use them).

Field names are params.yaml's keys (``pretrain.masking.*``, ``pretrain.adversarial.*``) and the defaults are its
defaults: the params schema validates with these very classes (pydantic runs ``__post_init__``), so each rule is
written once, here, and holds the same for a config built in Python.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional

from pydantic import ConfigDict

from xlm_core.model_config import default_layer

OBJECTIVES = ("mlm", "tlm", "clm", "tr")   # tr: translation ranking on the TLM pairs


def _probability(owner: str, name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}.{name} = {value!r}: must be a probability in [0, 1]")


@dataclass(frozen=True)
class MaskingConfig:
    """Which tokens become MLM/TLM targets and what replaces them (BERT's 80/10/10 by default)."""
    __pydantic_config__ = ConfigDict(extra="forbid")

    rate: float = 0.15       # share of maskable tokens chosen as targets
    mask: float = 0.8        # of the targets: replaced by <mask>
    random: float = 0.1      # ... by a random piece
    keep: float = 0.1        # ... kept unchanged
    smoothing: float = 0.0   # XLM: 0.5 -> P(target) ∝ count^-0.5; needs `frequency_weights(counts)`; 0 = uniform

    def __post_init__(self) -> None:
        if not 0.0 < self.rate < 1.0:
            raise ValueError(f"MaskingConfig.rate = {self.rate!r}: must be in (0, 1) (0 gives no targets, no loss)")
        for name in ("mask", "random", "keep"):
            _probability("MaskingConfig", name, getattr(self, name))
        total = self.mask + self.random + self.keep
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"MaskingConfig.mask = {self.mask!r}: mask + random + keep must be 1, got {total:g}")
        if not 0.0 <= self.smoothing <= 1.0:
            raise ValueError(f"MaskingConfig.smoothing = {self.smoothing!r}: must be in [0, 1] (0 = off)")


@dataclass(frozen=True)
class AdversarialConfig:
    """The language discriminator behind a gradient reversal (weight 0 or lambda_max 0 = off, at no cost).

    The two players get separate strengths: the discriminator learns from its loss × ``weight``; the encoder receives
    the reversed gradient scaled by λ itself (``lambda_max`` once warmed up), not by weight × λ. With a single scale
    (weight 0.05, λ 0.1) the encoder got 0.005 of the gradient and the adversary did nothing.
    """
    __pydantic_config__ = ConfigDict(extra="forbid")

    weight: float = 0.0             # the discriminator's loss weight (its own learning signal)
    lambda_max: float = 1.0         # the encoder's reversed-gradient strength once warmed up (absolute)
    warmup_steps: int = 200         # λ grows linearly from 0 over this many steps
    layer: Optional[int] = None     # pooled hidden states after this block; null = the middle one
    hidden: int = 256               # width of the discriminator's hidden layer

    def __post_init__(self) -> None:
        for name in ("weight", "lambda_max"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"AdversarialConfig.{name} = {value!r}: must be a finite number >= 0")
        if self.warmup_steps < 0:
            raise ValueError(f"AdversarialConfig.warmup_steps = {self.warmup_steps!r}: must be >= 0")
        if self.layer is not None and self.layer < 1:
            raise ValueError(f"AdversarialConfig.layer = {self.layer!r}: must be a block number >= 1 (or null)")
        if self.hidden < 8:
            raise ValueError(f"AdversarialConfig.hidden = {self.hidden!r}: must be >= 8")

    @property
    def enabled(self) -> bool:
        return self.weight > 0 and self.lambda_max > 0

    def layer_of(self, n_layers: int) -> int:
        """The block read by the discriminator in a model of ``n_layers`` blocks."""
        layer = default_layer(n_layers) if self.layer is None else self.layer
        if layer > n_layers:
            raise ValueError(f"AdversarialConfig.layer = {layer}: the model has {n_layers} layers")
        return layer


def check_objective_weights(weights: Mapping[str, float]) -> Mapping[str, float]:
    """Objective weights: each finite and >= 0, at least one > 0 (else there is nothing to train)."""
    for name, value in weights.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} = {value!r}: an objective's weight must be a finite number >= 0")
    if not any(value > 0 for value in weights.values()):
        raise ValueError(f"at least one of {', '.join(OBJECTIVES)} needs a weight > 0, else there is nothing to train")
    return weights


@dataclass(frozen=True)
class TranslationRankingConfig:
    """Translation ranking (LaBSE's dual encoder; InfoXLM's cross-lingual contrast) on the parallel pairs.

    Each side of a pair is encoded alone (`<s> a </s>`), mean-pooled at ``layer``; a symmetric InfoNCE over the other
    pairs of the micro-batch as negatives pulls translations together. Many short pairs per step give the negatives
    that make ranking hard on a CPU budget: a side is cut to ``max_len`` tokens.
    """
    __pydantic_config__ = ConfigDict(extra="forbid")

    pairs: int = 128                # pairs per step (all ranks together): each pair's negatives are the others
    max_len: int = 48               # tokens per side, <s> and </s> included
    temperature: float = 0.05       # softmax temperature of the cosine similarities
    margin: float = 0.0             # additive margin subtracted from the true pair's cosine (LaBSE: 0.3)
    layer: Optional[int] = None     # pooled hidden states after this block; null = the last one
    loss_weight: float = 1.0        # multiplies the loss (its gradients are larger than MLM's, and Adam's second
                                    # moments are shared: a full-size ranking loss shrank MLM's steps)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.loss_weight) and 0 < self.loss_weight <= 10):
            raise ValueError(f"TranslationRankingConfig.loss_weight = {self.loss_weight!r}: must be in (0, 10]")
        if self.pairs < 2:
            raise ValueError(f"TranslationRankingConfig.pairs = {self.pairs!r}: needs >= 2 (the others are negatives)")
        if self.max_len < 3:
            raise ValueError(f"TranslationRankingConfig.max_len = {self.max_len!r}: needs >= 3 (<s>, a piece, </s>)")
        if not (math.isfinite(self.temperature) and 0 < self.temperature <= 1):
            raise ValueError(f"TranslationRankingConfig.temperature = {self.temperature!r}: must be in (0, 1]")
        if not (math.isfinite(self.margin) and 0 <= self.margin < 1):
            raise ValueError(f"TranslationRankingConfig.margin = {self.margin!r}: must be in [0, 1)")
        if self.layer is not None and self.layer < 0:
            raise ValueError(f"TranslationRankingConfig.layer = {self.layer!r}: must be a layer >= 0 (or null)")

    def layer_of(self, n_layers: int) -> int:
        """The layer pooled in a model of ``n_layers`` blocks (0 = embeddings)."""
        layer = n_layers if self.layer is None else self.layer
        if layer > n_layers:
            raise ValueError(f"TranslationRankingConfig.layer = {layer}: the model has {n_layers} layers")
        return layer


@dataclass(frozen=True)
class ObjectivesConfig:
    """What `total_loss` computes: the weight of each objective's loss, the adversary and the masking."""
    mlm_weight: float = 1.0
    tlm_weight: float = 0.0
    clm_weight: float = 0.0
    tr_weight: float = 0.0
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    translation_ranking: TranslationRankingConfig = field(default_factory=TranslationRankingConfig)

    def __post_init__(self) -> None:
        check_objective_weights({"mlm_weight": self.mlm_weight, "tlm_weight": self.tlm_weight,
                                 "clm_weight": self.clm_weight, "tr_weight": self.tr_weight})

    @property
    def adversarial_enabled(self) -> bool:
        return self.adversarial.enabled

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ObjectivesConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ObjectivesConfig: unknown field(s) {unknown}; allowed: {', '.join(sorted(known))}")
        data = dict(data)
        for name, kind in (("adversarial", AdversarialConfig), ("masking", MaskingConfig),
                           ("translation_ranking", TranslationRankingConfig)):
            if isinstance(data.get(name), Mapping):
                data[name] = kind(**data[name])
        return cls(**data)


def seq_len_doublings(seq_len: int, start: int) -> int:
    """How often a warm-up row length doubles from ``start`` to ``seq_len``; the ratio must be a power of two."""
    ratio = seq_len // start
    if seq_len % start or ratio & (ratio - 1):
        raise ValueError(f"start = {start}: seq_len ({seq_len}) / start must be a power of two "
                         f"(e.g. start {seq_len // 8} or {seq_len // 4})")
    return ratio.bit_length() - 1
