"""The cross-lingual adversary: a language discriminator on pooled states behind a gradient reversal."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Logs = dict[str, float]


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
