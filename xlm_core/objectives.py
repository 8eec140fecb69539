"""Training objectives: MLM, TLM, CLM and a cross-lingual adversarial loss, each (model, batch, ...) -> (loss, logs).

A batch is a dict of tensors, right-padded with <pad>:
    input_ids       [B, T] long
    attention_mask  [B, T] bool, true at real tokens; absent when nothing is padded (the model then uses no mask)
    lang_ids        [B] (one language per sequence) or [B, T] (TLM: one per segment)
    position_ids    [B, T], only when positions are not 0..T-1 (TLM)
`build_mono_batch` and `build_tlm_batch` make them from lists of token ids (no special tokens) as stored in shards.

Masking is driven by an explicit torch.Generator: the same generator state and batch give the same mask, so the
trainer can checkpoint `generator.get_state()` and resume bit-identically. The vocabulary projection is computed
only at target positions (`target_index`), never over the whole [B, T, vocab].

Layouts (XLM-R's, so exported models see what they were trained on):
    mono / CLM:  <s> a </s>                     positions 0..len+1, one language
    TLM:         <s> a </s> </s> b </s>         positions restart at 0 on the second </s>; language ids per segment
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from xlm_core.special_tokens import BOS, EOS, FIRST_PIECE, PAD, mask_id

Batch = Mapping[str, torch.Tensor]
Logs = dict[str, float]


# ---------------------------------------------------------------------------------------------------------- masking
@dataclass(frozen=True)
class MaskingConfig:
    mask_rate: float = 0.15          # share of maskable tokens chosen as targets
    mask_prob: float = 0.8           # of the targets: replaced by <mask>
    random_prob: float = 0.1         # ... by a random piece; the rest (0.1) are kept unchanged
    frequency_smoothing: float = 0.0 # XLM: 0.5 -> P(target) ∝ count^-0.5; needs `frequency_weights(counts)`

    def __post_init__(self) -> None:
        for name in ("mask_rate", "mask_prob", "random_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"MaskingConfig.{name} = {value!r}: must be a probability in [0, 1]")
        if self.mask_rate == 0.0:
            raise ValueError("MaskingConfig.mask_rate = 0.0: must be > 0 (no targets, no loss)")
        if self.mask_prob + self.random_prob > 1.0 + 1e-9:
            raise ValueError(f"MaskingConfig.mask_prob + random_prob = {self.mask_prob + self.random_prob}: "
                             f"must be <= 1 (the remainder is the keep probability)")
        if self.frequency_smoothing < 0:
            raise ValueError(f"MaskingConfig.frequency_smoothing = {self.frequency_smoothing!r}: must be >= 0")

    @property
    def keep_prob(self) -> float:
        return 1.0 - self.mask_prob - self.random_prob


class MaskedTokens(NamedTuple):
    input_ids: torch.Tensor     # [B, T] the corrupted input
    target_index: torch.Tensor  # [N] flat indices into B*T, ascending
    targets: torch.Tensor       # [N] the original ids there


def frequency_weights(counts: torch.Tensor, exponent: float = 0.5) -> torch.Tensor:
    """XLM's target smoothing: weight ∝ max(count, 1)^-exponent per id, 0 for special ids (never targets)."""
    weights = counts.double().clamp_min(1.0).pow(-exponent).float()
    weights[:FIRST_PIECE] = 0.0
    weights[mask_id(len(counts))] = 0.0
    return weights


def maskable(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """True at ordinary pieces, the only possible MLM targets (special ids and <mask> never are)."""
    return (ids >= FIRST_PIECE) & (ids != mask_id(vocab_size))


def mask_tokens(input_ids: torch.Tensor, vocab_size: int, cfg: MaskingConfig, generator: torch.Generator,
                target_weights: Optional[torch.Tensor] = None) -> MaskedTokens:
    """Choose round(mask_rate × maskable tokens) targets in the batch and corrupt them 80/10/10.

    Special ids (<s>, <pad>, </s>, <unk>, <mask>) are never targets. Targets are a uniform sample without replacement,
    or with `target_weights` (per id) a weighted one: the k largest u^(1/w) (Efraimidis-Spirakis), as XLM's
    multinomial. An exact count, as XLM, keeps the number of projected positions steady from step to step.
    Random draws happen on the generator's device, so a CPU generator also masks a CUDA batch reproducibly.
    """
    if cfg.frequency_smoothing > 0 and target_weights is None:
        raise ValueError("MaskingConfig.frequency_smoothing > 0 needs per-id weights: pass "
                         "target_weights=frequency_weights(token_counts, cfg.frequency_smoothing)")
    if cfg.random_prob > 0 and vocab_size <= FIRST_PIECE + 1:
        raise ValueError(f"vocab_size = {vocab_size} has no ordinary piece to draw random replacements from")
    device, rng_device = input_ids.device, generator.device
    flat = input_ids.reshape(-1)
    mask_token = mask_id(vocab_size)
    candidates = maskable(flat, vocab_size)
    n_maskable = int(candidates.sum())
    if n_maskable == 0:
        raise ValueError("MLM batch has no maskable token (only special tokens and padding)")
    n_targets = max(1, int(cfg.mask_rate * n_maskable + 0.5))

    u = torch.rand(flat.shape, generator=generator, device=rng_device).to(device)
    if target_weights is None:
        score = u
    else:  # log(u)/w orders like u^(1/w); clamp so u = 0 cannot tie with the -inf of non-maskable tokens
        score = u.clamp_min(1e-30).log() / target_weights.to(device)[flat].clamp_min(1e-30)
    score = score.masked_fill(~candidates, float("-inf"))
    target_index = score.topk(n_targets, sorted=False).indices.sort().values
    targets = flat[target_index]

    action = torch.rand(n_targets, generator=generator, device=rng_device).to(device)
    random_ids = torch.randint(FIRST_PIECE, vocab_size - 1, (n_targets,), generator=generator,
                               device=rng_device).to(device)  # ordinary pieces 4..vocab-2 only
    replacement = torch.where(action < cfg.mask_prob, torch.full_like(targets, mask_token),
                              torch.where(action < cfg.mask_prob + cfg.random_prob, random_ids, targets))
    corrupted = flat.index_copy(0, target_index, replacement).view_as(input_ids)
    return MaskedTokens(corrupted, target_index, targets)


# ---------------------------------------------------------------------------------------------------------- batches
def _pad(rows: list[list[int]], value: int, length: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)


def _padded_length(lengths: list[int], pad_to_multiple: int) -> int:
    longest = max(lengths)
    return -(-longest // pad_to_multiple) * pad_to_multiple


def _per_row(value: Union[int, Sequence[int]], n: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name}: {len(value)} values for {n} rows")
    return value


def build_mono_batch(sentences: Sequence[Sequence[int]], lang_ids: Union[int, Sequence[int], None], max_len: int,
                     pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """`<s> ids </s>` per sentence (truncated to max_len), right-padded to the longest; lang_ids [B] if given."""
    if not sentences:
        raise ValueError("build_mono_batch: no sentences")
    if max_len < 3:
        raise ValueError(f"max_len = {max_len}: need room for <s>, one piece and </s>")
    rows = [[BOS, *list(ids)[: max_len - 2], EOS] for ids in sentences]
    length = min(_padded_length([len(r) for r in rows], pad_to_multiple), max_len)
    batch = {"input_ids": _pad(rows, PAD, length)}
    if any(len(r) < length for r in rows):
        batch["attention_mask"] = batch["input_ids"] != PAD
    if lang_ids is not None:
        batch["lang_ids"] = torch.tensor(_per_row(lang_ids, len(rows), "lang_ids"), dtype=torch.long)
    return batch


def _fit_pair(src: list[int], tgt: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Truncate the longer side first so that len(src) + len(tgt) <= budget."""
    if len(src) + len(tgt) <= budget:
        return src, tgt
    half = budget // 2
    if len(src) <= half:
        return src, tgt[: budget - len(src)]
    if len(tgt) <= budget - half:
        return src[: budget - len(tgt)], tgt
    return src[:half], tgt[: budget - half]


def build_tlm_batch(src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]],
                    src_lang: Union[int, Sequence[int]], tgt_lang: Union[int, Sequence[int]], max_len: int,
                    pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Translation-LM input `<s> src </s> </s> tgt </s>` with positions restarting at the target segment.

    Returns input_ids, position_ids, lang_ids (per token: src_lang on `<s> src </s>`, tgt_lang on `</s> tgt </s>`)
    and attention_mask when padded. Pairs longer than max_len are truncated, the longer side first.
    """
    if len(src_ids) != len(tgt_ids) or not src_ids:
        raise ValueError(f"build_tlm_batch: {len(src_ids)} sources for {len(tgt_ids)} targets")
    if max_len < 6:
        raise ValueError(f"max_len = {max_len}: need room for 4 special tokens and a piece per side")
    src_langs = _per_row(src_lang, len(src_ids), "src_lang")
    tgt_langs = _per_row(tgt_lang, len(src_ids), "tgt_lang")
    rows, positions, langs = [], [], []
    for src, tgt, s_lang, t_lang in zip(src_ids, tgt_ids, src_langs, tgt_langs):
        src, tgt = _fit_pair(list(src), list(tgt), max_len - 4)
        first, second = [BOS, *src, EOS], [EOS, *tgt, EOS]
        rows.append(first + second)
        positions.append(list(range(len(first))) + list(range(len(second))))
        langs.append([s_lang] * len(first) + [t_lang] * len(second))
    length = min(_padded_length([len(r) for r in rows], pad_to_multiple), max_len)
    batch = {
        "input_ids": _pad(rows, PAD, length),
        "position_ids": _pad(positions, 0, length),
        "lang_ids": _pad(langs, 0, length),
    }
    if any(len(r) < length for r in rows):
        batch["attention_mask"] = batch["input_ids"] != PAD
    return batch


# ----------------------------------------------------------------------------------------------------- MLM, TLM, CLM
def _to_floats(prefix: str, **values: torch.Tensor) -> Logs:
    """One device sync for all figures of a loss."""
    numbers = torch.stack([v.detach().float() for v in values.values()]).tolist()
    return {f"{prefix}_{name}": number for name, number in zip(values, numbers)}


def _masked_lm(model: nn.Module, batch: Batch, masking: MaskingConfig, generator: torch.Generator,
               target_weights: Optional[torch.Tensor], return_layer: Optional[int], prefix: str):
    masked = mask_tokens(batch["input_ids"], model.config.vocab_size, masking, generator, target_weights)
    out = model(masked.input_ids, lang_ids=batch.get("lang_ids"), position_ids=batch.get("position_ids"),
                attention_mask=batch.get("attention_mask"), causal=False, target_index=masked.target_index,
                return_layer=return_layer)
    loss = F.cross_entropy(out.logits.float(), masked.targets)
    accuracy = (out.logits.detach().argmax(-1) == masked.targets).float().mean()
    logs = _to_floats(prefix, loss=loss, accuracy=accuracy)
    logs[f"{prefix}_targets"] = float(len(masked.targets))
    return loss, logs, out


def mlm_loss(model: nn.Module, batch: Batch, masking: MaskingConfig, generator: torch.Generator,
             target_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Logs]:
    """Masked-LM cross-entropy over the chosen targets (logs mlm_loss, mlm_accuracy, mlm_targets)."""
    loss, logs, _ = _masked_lm(model, batch, masking, generator, target_weights, None, "mlm")
    return loss, logs


def tlm_loss(model: nn.Module, batch: Batch, masking: MaskingConfig, generator: torch.Generator,
             target_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Logs]:
    """MLM on a `build_tlm_batch` pair: targets on both sides, so a masked word can be read off the translation."""
    loss, logs, _ = _masked_lm(model, batch, masking, generator, target_weights, None, "tlm")
    return loss, logs


def clm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Logs]:
    """Next-token cross-entropy with causal attention, at every position whose next token is real."""
    input_ids = batch["input_ids"]
    B, T = input_ids.shape
    real = batch.get("attention_mask")
    real = (input_ids != model.config.pad_id) if real is None else real.bool()
    has_next = real[:, 1:]  # right padding: a real next token implies a real current one
    flat_positions = (torch.arange(B, device=input_ids.device)[:, None] * T
                      + torch.arange(T - 1, device=input_ids.device)[None, :])
    target_index = flat_positions[has_next]
    targets = input_ids[:, 1:][has_next]
    out = model(input_ids, lang_ids=batch.get("lang_ids"), position_ids=batch.get("position_ids"),
                attention_mask=batch.get("attention_mask"), causal=True, target_index=target_index)
    loss = F.cross_entropy(out.logits.float(), targets)
    accuracy = (out.logits.detach().argmax(-1) == targets).float().mean()
    return loss, _to_floats("clm", loss=loss, accuracy=accuracy, perplexity=loss.detach().exp())


# ------------------------------------------------------------------------------------------------------ adversarial
class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -coefficient (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coefficient: float) -> torch.Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * -ctx.coefficient, None


def grad_reverse(x: torch.Tensor, coefficient: float) -> torch.Tensor:
    return GradientReversal.apply(x, coefficient)


def adversarial_lambda(step: int, warmup_steps: int, lambda_max: float) -> float:
    """λ schedule: linear from 0 at step 0 to lambda_max at warmup_steps, then constant."""
    if warmup_steps <= 0:
        return float(lambda_max)
    return float(lambda_max) * min(1.0, step / warmup_steps)


class LanguageDiscriminator(nn.Module):
    """A small MLP that guesses a sequence's language from its pooled hidden state."""

    def __init__(self, d_model: int, n_languages: int, hidden: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        if n_languages < 2:
            raise ValueError(f"LanguageDiscriminator: n_languages = {n_languages}; need >= 2 languages to tell apart")
        self.net = nn.Sequential(
            nn.Linear(d_model, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_languages))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)


def masked_mean(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the real tokens of each sequence: [B, T, d] -> [B, d]."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def adversarial_loss(discriminator: nn.Module, layer_hidden: torch.Tensor, attention_mask: Optional[torch.Tensor],
                     lang_ids: torch.Tensor, coefficient: float, language_names: Optional[Sequence[str]] = None
                     ) -> tuple[torch.Tensor, Logs]:
    """Discriminator cross-entropy on pooled states behind a gradient reversal of strength `coefficient` (λ).

    The discriminator descends this loss (it learns the languages); the encoder gets -λ × its gradient (it learns to
    hide them). Logs adv_loss, adv_accuracy and adv_accuracy/<language> for each language in the batch.
    """
    labels = lang_ids if lang_ids.dim() == 1 else lang_ids[:, 0]
    logits = discriminator(grad_reverse(masked_mean(layer_hidden, attention_mask), coefficient))
    loss = F.cross_entropy(logits.float(), labels)
    correct = (logits.detach().argmax(-1) == labels).float()
    n_languages = logits.shape[-1]
    per_language = torch.stack([
        torch.bincount(labels, weights=correct, minlength=n_languages),
        torch.bincount(labels, minlength=n_languages).float(),
    ])
    figures = torch.cat([torch.stack([loss.detach(), correct.mean()]), per_language.flatten()]).tolist()
    logs: Logs = {"adv_loss": figures[0], "adv_accuracy": figures[1], "adv_lambda": float(coefficient)}
    hits, totals = figures[2: 2 + n_languages], figures[2 + n_languages:]
    for lang, (hit, total) in enumerate(zip(hits, totals)):
        if total > 0:
            name = language_names[lang] if language_names is not None else str(lang)
            logs[f"adv_accuracy/{name}"] = hit / total
    return loss, logs


# ------------------------------------------------------------------------------------------------------------ total
@dataclass(frozen=True)
class ObjectivesConfig:
    mlm_weight: float = 1.0
    tlm_weight: float = 0.0
    clm_weight: float = 0.0
    adversarial_weight: float = 0.0       # 0 (or adversarial_lambda 0) turns the adversary off at no cost
    adversarial_lambda: float = 1.0       # λ_max of the gradient reversal
    adversarial_warmup_steps: int = 0     # λ grows linearly from 0 over this many steps
    adversarial_layer: int = -1           # pooled hidden states of this layer (0 = embeddings, -1 = last)
    masking: MaskingConfig = field(default_factory=MaskingConfig)

    def __post_init__(self) -> None:
        for name in ("mlm_weight", "tlm_weight", "clm_weight", "adversarial_weight", "adversarial_lambda"):
            if getattr(self, name) < 0:
                raise ValueError(f"ObjectivesConfig.{name} = {getattr(self, name)!r}: must be >= 0")
        if self.adversarial_warmup_steps < 0:
            raise ValueError(f"ObjectivesConfig.adversarial_warmup_steps = {self.adversarial_warmup_steps}: must be >= 0")
        if self.mlm_weight == self.tlm_weight == self.clm_weight == 0:
            raise ValueError("ObjectivesConfig: mlm_weight, tlm_weight and clm_weight are all 0; nothing to train")

    @property
    def adversarial_enabled(self) -> bool:
        return self.adversarial_weight > 0 and self.adversarial_lambda > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ObjectivesConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ObjectivesConfig: unknown field(s) {unknown}; allowed: {', '.join(sorted(known))}")
        data = dict(data)
        if isinstance(data.get("masking"), Mapping):
            data["masking"] = MaskingConfig(**data["masking"])
        return cls(**data)


def total_loss(model: nn.Module, batches: Mapping[str, Batch], cfg: ObjectivesConfig, generator: torch.Generator,
               step: int = 0, discriminator: Optional[nn.Module] = None,
               target_weights: Optional[torch.Tensor] = None,
               language_names: Optional[Sequence[str]] = None) -> tuple[torch.Tensor, Logs]:
    """Weighted sum of the objectives whose batch is given this step ("mlm", "tlm", "clm") and whose weight > 0.

    The adversarial term rides on the "mlm" batch (one language per sequence, batch["lang_ids"] of shape [B]): the
    same forward returns layer `adversarial_layer`, so it costs one pooled mean and a small MLP. When it is off,
    nothing extra is computed.
    """
    unknown = sorted(set(batches) - {"mlm", "tlm", "clm"})
    if unknown:
        raise ValueError(f"total_loss: unknown batch kind(s) {unknown}; expected mlm, tlm, clm")
    adversarial = cfg.adversarial_enabled and "mlm" in batches and cfg.mlm_weight > 0
    if adversarial and discriminator is None:
        raise ValueError("adversarial_weight > 0 needs a LanguageDiscriminator: pass discriminator=")
    parts: list[torch.Tensor] = []
    logs: Logs = {}
    if cfg.mlm_weight > 0 and "mlm" in batches:
        batch = batches["mlm"]
        loss, part_logs, out = _masked_lm(model, batch, cfg.masking, generator, target_weights,
                                          cfg.adversarial_layer if adversarial else None, "mlm")
        parts.append(cfg.mlm_weight * loss)
        logs.update(part_logs)
        if adversarial:
            if "lang_ids" not in batch:
                raise ValueError("the adversarial loss needs batch['lang_ids'] (the language of each sequence)")
            coefficient = adversarial_lambda(step, cfg.adversarial_warmup_steps, cfg.adversarial_lambda)
            adv, adv_logs = adversarial_loss(discriminator, out.layer_hidden, batch.get("attention_mask"),
                                             batch["lang_ids"], coefficient, language_names)
            parts.append(cfg.adversarial_weight * adv)
            logs.update(adv_logs)
    if cfg.tlm_weight > 0 and "tlm" in batches:
        loss, part_logs = tlm_loss(model, batches["tlm"], cfg.masking, generator, target_weights)
        parts.append(cfg.tlm_weight * loss)
        logs.update(part_logs)
    if cfg.clm_weight > 0 and "clm" in batches:
        loss, part_logs = clm_loss(model, batches["clm"])
        parts.append(cfg.clm_weight * loss)
        logs.update(part_logs)
    if not parts:
        raise ValueError(f"total_loss: no objective to compute from batches {sorted(batches)} with weights "
                         f"mlm={cfg.mlm_weight}, tlm={cfg.tlm_weight}, clm={cfg.clm_weight}")
    total = torch.stack(parts).sum()
    logs["loss"] = float(total.detach())
    return total, logs
