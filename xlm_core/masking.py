"""MLM/TLM target choice: which tokens of a batch become targets and what replaces them.

Masking is driven by an explicit torch.Generator: the same generator state and batch give the same mask, so the
trainer can checkpoint `generator.get_state()` and resume bit-identically.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from xlm_core.settings import MaskingConfig
from xlm_core.special_tokens import FIRST_PIECE, mask_id


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
    """Choose round(rate × maskable tokens) targets in the batch and corrupt them 80/10/10.

    Special ids (<s>, <pad>, </s>, <unk>, <mask>) are never targets. Targets are a uniform sample without replacement,
    or with `target_weights` (per id) a weighted one: the k largest u^(1/w) (Efraimidis-Spirakis), as XLM's
    multinomial. An exact count, as XLM, keeps the number of projected positions steady from step to step.
    Random draws happen on the generator's device, so a CPU generator also masks a CUDA batch reproducibly.
    """
    if cfg.smoothing > 0 and target_weights is None:
        raise ValueError("MaskingConfig.smoothing > 0 needs per-id weights: pass "
                         "target_weights=frequency_weights(token_counts, cfg.smoothing)")
    if cfg.random > 0 and vocab_size <= FIRST_PIECE + 1:
        raise ValueError(f"vocab_size = {vocab_size} has no ordinary piece to draw random replacements from")
    device, rng_device = input_ids.device, generator.device
    flat = input_ids.reshape(-1)
    mask_token = mask_id(vocab_size)
    candidates = maskable(flat, vocab_size)
    n_maskable = int(candidates.sum())
    if n_maskable == 0:
        raise ValueError("MLM batch has no maskable token (only special tokens and padding)")
    n_targets = max(1, int(cfg.rate * n_maskable + 0.5))

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
    replacement = torch.where(action < cfg.mask, torch.full_like(targets, mask_token),
                              torch.where(action < cfg.mask + cfg.random, random_ids, targets))
    corrupted = flat.index_copy(0, target_index, replacement).view_as(input_ids)
    return MaskedTokens(corrupted, target_index, targets)
