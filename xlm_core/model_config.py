"""The encoder's settings without torch: ``ModelConfig`` (what the model is built from, saved in config.json) and
``ModelSpec`` (params.yaml's ``pretrain.model``: a preset plus optional overrides), so the params schema validates with
the same dataclass and rules the library uses.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Optional

from pydantic import ConfigDict

from xlm_core.special_tokens import FIRST_PIECE, PAD

POSITION_KINDS = ("learned", "sinusoidal")

# Architecture presets. `base` and `large` are XLM-R base/large (max_positions 512 = HF's 514 minus the 2-row offset).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layers=2, d_model=64, n_heads=2, d_ff=256, max_positions=128),
    "small": dict(n_layers=4, d_model=256, n_heads=4, d_ff=1024, max_positions=512),
    "base": dict(n_layers=12, d_model=768, n_heads=12, d_ff=3072, max_positions=512),
    "large": dict(n_layers=24, d_model=1024, n_heads=16, d_ff=4096, max_positions=512),
}


# ----------------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    max_positions: int = 512
    dropout: float = 0.1             # XLM-R's value; it costs ~11 % of a CPU step in RNG alone
    attention_dropout: float = 0.0   # > 0 rules out the flash SDPA kernel
    n_languages: int = 1
    use_lang_emb: bool = False       # XLM used language embeddings, XLM-R dropped them
    causal: bool = False             # default attention for forward(); CLM can also ask per call
    pre_ln: bool = False             # pre-LN trains more stably but cannot be exported to XLM-R
    positions: Literal["learned", "sinusoidal"] = "learned"  # or a fixed sinusoidal table, added
    layer_norm_eps: float = 1e-5
    pad_id: int = PAD
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self._validate()

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named architecture (tiny, small, base, large) with any field overridden, e.g. vocab_size."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; allowed: {', '.join(sorted(known))}")
        if "vocab_size" not in data:
            raise ValueError("ModelConfig: missing field 'vocab_size'")
        return cls(**data)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def _validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"ModelConfig.{name} = {getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "d_ff", "max_positions", "n_languages", "pad_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                fail(name, "must be an integer")
            if name != "pad_id" and value < 1:
                fail(name, "must be >= 1")
        for name in ("use_lang_emb", "causal", "pre_ln"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
                fail(name, "must be a probability in [0, 1)")
        for name in ("layer_norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                fail(name, "must be a number > 0")
        if self.vocab_size < FIRST_PIECE + 1:
            fail("vocab_size", f"must be >= {FIRST_PIECE + 1} (<s>, <pad>, </s>, <unk> and <mask> are ids already)")
        if self.d_model % self.n_heads:
            fail("d_model", f"must be divisible by n_heads = {self.n_heads} (each head gets d_model / n_heads dims)")
        if self.positions not in POSITION_KINDS:
            fail("positions", f"must be one of {', '.join(POSITION_KINDS)}")
        if not 0 <= self.pad_id < self.vocab_size:
            fail("pad_id", f"must be an id in [0, vocab_size = {self.vocab_size})")


def default_layer(n_layers: int) -> int:
    """The middle layer (the adversary's and sentence embeddings' default); layer 1 for one- and two-layer models."""
    return max(1, n_layers // 2)


def _default(name: str) -> Any:
    return ModelConfig.__dataclass_fields__[name].default


@dataclass(frozen=True)
class ModelSpec:
    """``pretrain.model`` of params.yaml: a preset, optional overrides of its sizes, and the switches.

    The vocabulary size (the tokenizer's) and the number of languages (params.yaml's ``languages``) are not settings
    of their own; ``config`` fills them in. Every rule is ModelConfig's, checked at validation time with a stand-in
    vocabulary.
    """
    __pydantic_config__ = ConfigDict(extra="forbid")

    preset: Literal["tiny", "small", "base", "large"] = "small"
    n_layers: Optional[int] = None           # null = the preset's
    d_model: Optional[int] = None
    n_heads: Optional[int] = None
    d_ff: Optional[int] = None
    init_std: Optional[float] = None         # N(0, std) init; null = 0.02 (BERT)
    dropout: float = _default("dropout")
    attention_dropout: float = _default("attention_dropout")
    use_lang_emb: bool = _default("use_lang_emb")
    positions: Literal["learned", "sinusoidal"] = _default("positions")
    pre_ln: bool = _default("pre_ln")
    causal: bool = _default("causal")

    def __post_init__(self) -> None:
        self.config(vocab_size=FIRST_PIECE + 2, n_languages=1)

    def config(self, vocab_size: int, n_languages: int) -> ModelConfig:
        overrides = {name: getattr(self, name) for name in ("n_layers", "d_model", "n_heads", "d_ff", "init_std")
                     if getattr(self, name) is not None}
        return ModelConfig.preset(
            self.preset, vocab_size=vocab_size, n_languages=n_languages, dropout=self.dropout,
            attention_dropout=self.attention_dropout, use_lang_emb=self.use_lang_emb, positions=self.positions,
            pre_ln=self.pre_ln, causal=self.causal, **overrides)
