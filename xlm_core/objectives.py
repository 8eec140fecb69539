"""Training objectives: MLM, TLM, CLM, translation ranking and a cross-lingual adversarial loss.

Each is (model, batch, ...) -> (loss, logs).

A batch is a dict of tensors, right-padded with <pad>:
    input_ids       [B, T] long
    attention_mask  [B, T] bool, true at real tokens; absent when nothing is padded (the model then uses no mask)
    lang_ids        [B] (one language per sequence) or [B, T] (TLM: one per segment)
    position_ids    [B, T], only when positions are not 0..T-1 (TLM)
`build_mono_batch` and `build_tlm_batch` make them from lists of token ids (no special tokens) as stored in shards.

Targets are chosen by `xlm_core.masking` (from an explicit generator, so a resume is bit-identical), the adversary
lives in `xlm_core.adversary`, the settings in `xlm_core.settings`. The vocabulary projection is computed only at
target positions (`target_index`), never over the whole [B, T, vocab].

Layouts (XLM-R's, so exported models see what they were trained on):
    mono / CLM:  <s> a </s>                     positions 0..len+1, one language
    TLM:         <s> a </s> </s> b </s>         positions restart at 0 on the second </s>; language ids per segment
    TR:          rows 0..N-1 `<s> a_i </s>`, rows N..2N-1 `<s> b_i </s>` (each side alone, one forward for both)
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from xlm_core.adversary import adversarial_lambda, adversarial_loss, masked_mean
from xlm_core.masking import mask_tokens
from xlm_core.settings import MaskingConfig, ObjectivesConfig, TranslationRankingConfig
from xlm_core.special_tokens import BOS, EOS, PAD

Batch = Mapping[str, torch.Tensor]
Logs = dict[str, float]


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


def build_dual_batch(src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]],
                     src_lang: Union[int, Sequence[int]], tgt_lang: Union[int, Sequence[int]], max_len: int
                     ) -> dict[str, torch.Tensor]:
    """Translation-ranking input: the N sources then the N targets, each `<s> ids </s>` alone (cut to max_len).

    One forward encodes both sides with the same weights (a dual encoder with shared parameters, as LaBSE).
    """
    if len(src_ids) != len(tgt_ids) or len(src_ids) < 2:
        raise ValueError(f"build_dual_batch: {len(src_ids)} sources for {len(tgt_ids)} targets (need >= 2 pairs)")
    n = len(src_ids)
    langs = _per_row(src_lang, n, "src_lang") + _per_row(tgt_lang, n, "tgt_lang")
    return build_mono_batch(list(src_ids) + list(tgt_ids), langs, max_len)


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


def translation_ranking_loss(model: nn.Module, batch: Batch, cfg: TranslationRankingConfig
                             ) -> tuple[torch.Tensor, Logs]:
    """Symmetric InfoNCE over in-batch negatives on a `build_dual_batch` batch (rows: N sources, then N targets).

    Each side is mean-pooled over its real tokens at ``cfg.layer`` (null: the last), L2-normalised; the cosine of the
    true pair minus ``cfg.margin`` competes with the pair's N - 1 others at temperature ``cfg.temperature``, in both
    directions (source -> targets, target -> sources). Logs tr_loss and tr_accuracy (in-batch top-1, both ways).
    """
    input_ids = batch["input_ids"]
    if input_ids.shape[0] % 2 or input_ids.shape[0] < 4:
        raise ValueError(f"translation ranking: {input_ids.shape[0]} rows; expected N sources then N targets, N >= 2")
    layer = cfg.layer_of(model.config.n_layers)
    attention_mask = batch.get("attention_mask")
    out = model(input_ids, lang_ids=batch.get("lang_ids"), attention_mask=attention_mask, causal=False,
                return_layer=layer, stop_at_layer=True)      # the blocks above the pooled layer get no gradient here
    pooled = F.normalize(masked_mean(out.layer_hidden, attention_mask).float(), dim=-1)
    n = pooled.shape[0] // 2
    similarity = pooled[:n] @ pooled[n:].T                                  # [N, N], true pairs on the diagonal
    similarity = similarity - cfg.margin * torch.eye(n, device=similarity.device)
    logits = similarity / cfg.temperature
    labels = torch.arange(n, device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    accuracy = 0.5 * ((logits.detach().argmax(1) == labels).float().mean()
                      + (logits.detach().argmax(0) == labels).float().mean())
    logs = _to_floats("tr", loss=loss, accuracy=accuracy)
    logs["tr_pairs"] = float(n)
    return loss, logs


# ------------------------------------------------------------------------------------------------------------ total
def total_loss(model: nn.Module, batches: Mapping[str, Batch], cfg: ObjectivesConfig, generator: torch.Generator,
               step: int = 0, discriminator: Optional[nn.Module] = None,
               target_weights: Optional[torch.Tensor] = None,
               language_names: Optional[Sequence[str]] = None) -> tuple[torch.Tensor, Logs]:
    """Weighted sum of the objectives whose batch is given this step ("mlm", "tlm", "clm", "tr") with weight > 0.

    The adversarial term rides on the "mlm" batch (one language per sequence, batch["lang_ids"] of shape [B]): the
    same forward returns layer `adversarial.layer` (null: the middle one), so it costs one pooled mean and a small MLP. When it is off,
    nothing extra is computed.
    """
    unknown = sorted(set(batches) - {"mlm", "tlm", "clm", "tr"})
    if unknown:
        raise ValueError(f"total_loss: unknown batch kind(s) {unknown}; expected mlm, tlm, clm, tr")
    adversarial = cfg.adversarial_enabled and "mlm" in batches and cfg.mlm_weight > 0
    if adversarial and discriminator is None:
        raise ValueError("adversarial.weight > 0 needs a LanguageDiscriminator: pass discriminator=")
    parts: list[torch.Tensor] = []
    logs: Logs = {}
    if cfg.mlm_weight > 0 and "mlm" in batches:
        batch = batches["mlm"]
        loss, part_logs, out = _masked_lm(model, batch, cfg.masking, generator, target_weights,
                                          cfg.adversarial.layer_of(model.config.n_layers) if adversarial else None,
                                          "mlm")
        parts.append(cfg.mlm_weight * loss)
        logs.update(part_logs)
        if adversarial:
            if "lang_ids" not in batch:
                raise ValueError("the adversarial loss needs batch['lang_ids'] (the language of each sequence)")
            # Separate strengths: the discriminator learns from weight × its loss; the encoder must receive -λ × the
            # loss's gradient, so the reversal scales by λ / weight (the loss's weight multiplies it back).
            strength = adversarial_lambda(step, cfg.adversarial.warmup_steps, cfg.adversarial.lambda_max)
            adv, adv_logs = adversarial_loss(discriminator, out.layer_hidden, batch.get("attention_mask"),
                                             batch["lang_ids"], strength / cfg.adversarial.weight, language_names)
            parts.append(cfg.adversarial.weight * adv)
            adv_logs["adv_lambda"] = strength
            logs.update(adv_logs)
    if cfg.tlm_weight > 0 and "tlm" in batches:
        loss, part_logs = tlm_loss(model, batches["tlm"], cfg.masking, generator, target_weights)
        parts.append(cfg.tlm_weight * loss)
        logs.update(part_logs)
    if cfg.clm_weight > 0 and "clm" in batches:
        loss, part_logs = clm_loss(model, batches["clm"])
        parts.append(cfg.clm_weight * loss)
        logs.update(part_logs)
    if cfg.tr_weight > 0 and "tr" in batches:
        loss, part_logs = translation_ranking_loss(model, batches["tr"], cfg.translation_ranking)
        parts.append(cfg.tr_weight * cfg.translation_ranking.loss_weight * loss)
        logs.update(part_logs)
    if not parts:
        raise ValueError(f"total_loss: no objective to compute from batches {sorted(batches)} with weights "
                         f"mlm={cfg.mlm_weight}, tlm={cfg.tlm_weight}, clm={cfg.clm_weight}, tr={cfg.tr_weight}")
    total = torch.stack(parts).sum()
    logs["loss"] = float(total.detach())
    return total, logs
