"""Evaluation metrics for a cross-lingual encoder: test-split language modelling, sentence embeddings, bitext
retrieval (cosine or ratio margin) and a linear probe for zero-shot classification.

    masked_lm_score(model, batches, ...)       MLM/TLM accuracy and perplexity under fixed-seed masks (+ the language
                                               discriminator's accuracy on the same forward, as in training)
    causal_lm_score(model, batches)            next-token accuracy and perplexity
    pooled_embeddings(model, sentences, ...)   mean of a layer's hidden states over the real tokens, per sentence
    bitext_retrieval(src, tgt, scoring, k)     top-1 accuracy both ways (XTREME's Tatoeba protocol)
    train_linear_probe(x, y, ...)              logistic regression, full-batch Adam; deterministic

Everything here is a pure function of its inputs (no files, no params): the evaluate stage wires it to the data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from xlm_core.model import XLMModel
from xlm_core.adversary import masked_mean
from xlm_core.masking import mask_tokens, maskable
from xlm_core.objectives import build_mono_batch
from xlm_core.settings import MaskingConfig

SCORINGS = ("cosine", "margin")


class EvalBatch(Protocol):
    """What xlm_core.data.iter_eval_batches yields (only the parts used here)."""

    input_ids: torch.Tensor
    lang_ids: torch.Tensor
    chunk_seed: int

    def model_inputs(self) -> dict[str, torch.Tensor]: ...


# ------------------------------------------------------------------------------------------------ language models
@dataclass
class LMScore:
    """Summed cross-entropy and hits over all targets of a test pass; perplexity = exp(mean cross-entropy)."""

    loss_sum: float = 0.0
    correct: int = 0
    targets: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss_sum += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        self.correct += int((logits.argmax(-1) == targets).sum())
        self.targets += int(targets.numel())

    @property
    def accuracy(self) -> float:
        return self.correct / self.targets if self.targets else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.targets if self.targets else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0)) if self.targets else float("nan")


@dataclass
class Counter:
    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def eval_masking(mask_rate: float) -> MaskingConfig:
    """Test-time masking: every target becomes <mask> (no random/kept tokens, whose easy hits would inflate accuracy)."""
    return MaskingConfig(rate=mask_rate, mask=1.0, random=0.0, keep=0.0)


def _forward_inputs(batch: EvalBatch, device: torch.device) -> dict[str, torch.Tensor]:
    inputs = batch.model_inputs()
    return {k: v.to(device) for k, v in inputs.items() if k != "input_ids"}


@torch.inference_mode()
def masked_lm_score(model: XLMModel, batches: Iterable[EvalBatch], mask_rate: float, device: torch.device,
                    discriminator: Optional[nn.Module] = None, discriminator_layer: Optional[int] = None
                    ) -> tuple[LMScore, Optional[Counter]]:
    """MLM (or TLM, for pair batches) accuracy and perplexity at masked positions.

    Each batch is masked with a CPU generator seeded from its own ``chunk_seed``, so the targets are the same on every
    rerun and on every device. With a ``discriminator``, the pooled states of ``discriminator_layer`` from the same
    forward are classified by language, exactly as the adversarial loss sees them in training.
    """
    masking = eval_masking(mask_rate)
    score, disc = LMScore(), (Counter() if discriminator is not None else None)
    for batch in batches:
        generator = torch.Generator().manual_seed(int(batch.chunk_seed))
        masked = mask_tokens(batch.input_ids, model.config.vocab_size, masking, generator)
        inputs = _forward_inputs(batch, device)
        out = model(masked.input_ids.to(device), lang_ids=inputs.get("lang_ids"),
                    position_ids=inputs.get("position_ids"), attention_mask=inputs.get("attention_mask"),
                    causal=False, target_index=masked.target_index.to(device),
                    return_layer=discriminator_layer if discriminator is not None else None)
        score.add(out.logits, masked.targets.to(device))
        if disc is not None:
            pooled = masked_mean(out.layer_hidden, inputs.get("attention_mask"))
            labels = batch.lang_ids[:, 0].to(device)
            disc.correct += int((discriminator(pooled).argmax(-1) == labels).sum())
            disc.total += int(labels.numel())
    return score, disc


@torch.inference_mode()
def unigram_score(batches: Iterable[EvalBatch], vocab_size: int, mask_rate: float) -> LMScore:
    """The best context-free guess at the targets ``masked_lm_score`` draws from these batches (same seeds).

    The piece distribution is fitted on the very text scored (every maskable piece of the batches), so no model that
    ignores context can beat it on this text: accuracy = always guessing the most frequent piece, perplexity = that
    distribution's at the targets. A trained MLM that does not clear it has learned piece frequencies, not language.
    """
    masking = eval_masking(mask_rate)
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    targets = []
    for batch in batches:
        generator = torch.Generator().manual_seed(int(batch.chunk_seed))
        masked = mask_tokens(batch.input_ids, vocab_size, masking, generator)
        flat = batch.input_ids.reshape(-1)
        counts += torch.bincount(flat[maskable(flat, vocab_size)], minlength=vocab_size).double()
        targets.append(masked.targets)
    score = LMScore()
    if targets and counts.sum() > 0:
        log_p = (counts / counts.sum()).log()
        target = torch.cat(targets)
        score.loss_sum = float(-log_p[target].sum())
        score.correct = int((target == counts.argmax()).sum())
        score.targets = int(target.numel())
    return score


@torch.inference_mode()
def causal_lm_score(model: XLMModel, batches: Iterable[EvalBatch], device: torch.device) -> LMScore:
    """Next-token accuracy and perplexity with causal attention, at every position whose next token is real."""
    score = LMScore()
    for batch in batches:
        input_ids = batch.input_ids.to(device)
        inputs = _forward_inputs(batch, device)
        B, T = input_ids.shape
        real = inputs.get("attention_mask", input_ids != model.config.pad_id).bool()
        has_next = real[:, 1:]
        flat = torch.arange(B, device=device)[:, None] * T + torch.arange(T - 1, device=device)[None, :]
        out = model(input_ids, lang_ids=inputs.get("lang_ids"), position_ids=inputs.get("position_ids"),
                    attention_mask=inputs.get("attention_mask"), causal=True, target_index=flat[has_next])
        score.add(out.logits, input_ids[:, 1:][has_next])
    return score


# ---------------------------------------------------------------------------------------------- sentence embeddings
def _hidden_at(model: XLMModel, input_ids: torch.Tensor, lang_ids: Optional[torch.Tensor],
               attention_mask: Optional[torch.Tensor], layer: int) -> torch.Tensor:
    """Hidden states after block ``layer``, running only the blocks below it (half the work for the middle layer)."""
    return model(input_ids, lang_ids=lang_ids, attention_mask=attention_mask, return_layer=layer,
                 stop_at_layer=True).layer_hidden


@torch.inference_mode()
def pooled_embeddings(model: XLMModel, sentences: Sequence[Sequence[int]], lang_id: int, layer: int, max_len: int,
                      batch_size: int, device: torch.device) -> torch.Tensor:
    """[N, d] float32 (on CPU): ``<s> ids </s>`` per sentence, mean of layer ``layer`` over its real tokens.

    Sentences are sorted by length before batching so padding stays small; the result is in input order.
    """
    n = len(sentences)
    out = torch.empty(n, model.config.d_model, dtype=torch.float32)
    if n == 0:
        return out
    order = sorted(range(n), key=lambda i: len(sentences[i]), reverse=True)
    for start in range(0, n, batch_size):
        index = order[start:start + batch_size]
        batch = build_mono_batch([list(map(int, sentences[i])) for i in index], lang_id, max_len)
        input_ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        mask = mask.to(device) if mask is not None else None
        hidden = _hidden_at(model, input_ids, batch["lang_ids"].to(device), mask, layer)
        out[torch.tensor(index)] = masked_mean(hidden, mask).float().cpu()
    return out


# -------------------------------------------------------------------------------------------------- bitext retrieval
def center(vectors: torch.Tensor) -> torch.Tensor:
    """Subtract the mean vector: applied per language, it removes what every sentence of that language shares.

    Mean-pooled states of a multilingual encoder carry a strong language-identity component; removing each language's
    centroid before cosine retrieval is a standard, training-free step (Libovický et al., 2020, "On the Language
    Neutrality of Pre-trained Multilingual Representations").
    """
    return vectors - vectors.mean(dim=0, keepdim=True)


def cosine_similarity(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """[Ns, Nt] cosine similarities of L2-normalised rows."""
    return F.normalize(src.float(), dim=-1) @ F.normalize(tgt.float(), dim=-1).T


def ratio_margin(similarity: torch.Tensor, k: int = 4) -> torch.Tensor:
    """Artetxe & Schwenk (2019) ratio margin: cos(x, y) / (mean cos of x's k NN / 2 + mean cos of y's k NN / 2).

    A "hub" (a candidate close to every query) has a high neighbourhood mean, so its scores shrink. The denominator
    is clamped at a small positive value: mean-pooled states have positive similarities in practice, and a
    non-positive neighbourhood would make the ratio meaningless rather than merely large.
    """
    k_src = min(k, similarity.shape[1])
    k_tgt = min(k, similarity.shape[0])
    src_neighbourhood = similarity.topk(k_src, dim=1).values.mean(dim=1)   # per query x: over candidates
    tgt_neighbourhood = similarity.topk(k_tgt, dim=0).values.mean(dim=0)   # per candidate y: over queries
    denominator = (src_neighbourhood[:, None] + tgt_neighbourhood[None, :]) / 2
    return similarity / denominator.clamp_min(1e-6)


@dataclass
class RetrievalResult:
    forward: float             # top-1 accuracy src -> tgt (each src sentence finds its translation among all tgt)
    backward: float            # tgt -> src
    candidates: int            # sentences on each side; row i of src translates row i of tgt
    forward_pred: torch.Tensor = field(repr=False)
    backward_pred: torch.Tensor = field(repr=False)


def retrieval_scores(src: torch.Tensor, tgt: torch.Tensor, scoring: str = "cosine", k: int = 4) -> torch.Tensor:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring {scoring!r}: allowed: {', '.join(SCORINGS)}")
    similarity = cosine_similarity(src, tgt)
    return similarity if scoring == "cosine" else ratio_margin(similarity, k)


def bitext_retrieval(src: torch.Tensor, tgt: torch.Tensor, scoring: str = "cosine", k: int = 4) -> RetrievalResult:
    """Top-1 nearest-neighbour accuracy in both directions; every sentence of the other side is a candidate."""
    if src.shape[0] != tgt.shape[0] or src.shape[0] == 0:
        raise ValueError(f"bitext_retrieval: {src.shape[0]} source and {tgt.shape[0]} target sentences; "
                         f"need the same number, at least one")
    scores = retrieval_scores(src, tgt, scoring, k)
    gold = torch.arange(src.shape[0])
    forward_pred, backward_pred = scores.argmax(dim=1), scores.argmax(dim=0)
    return RetrievalResult(forward=float((forward_pred == gold).float().mean()),
                           backward=float((backward_pred == gold).float().mean()),
                           candidates=int(src.shape[0]), forward_pred=forward_pred, backward_pred=backward_pred)


# ---------------------------------------------------------------------------------------------------- linear probe
@dataclass
class LinearProbe:
    """Logistic regression on standardised features (the training language's mean and std)."""

    mean: torch.Tensor
    std: torch.Tensor
    linear: nn.Linear
    classes: list[str]

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features.float() - self.mean) / self.std).argmax(dim=-1)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict(features) == labels).float().mean()) if len(labels) else float("nan")


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], l2: float = 1e-3,
                       steps: int = 300, seed: int = 0, lr: float = 0.05) -> LinearProbe:
    """Full-batch Adam on cross-entropy + l2/2·|W|², from a zero init: the result depends on the data only.

    The softmax-regression gradient is written out, and so is Adam (torch.optim's first use imports TorchDynamo:
    seconds of start-up for a problem of milliseconds). One thread: these matrices are far too small to split.
    """
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode(False), torch.no_grad():
            x = features.detach().float().clone()
            mean = x.mean(dim=0)
            std = x.std(dim=0, unbiased=False).clamp_min(1e-6)
            x = (x - mean) / std
            onehot = F.one_hot(labels.detach().long().clone(), len(classes)).float()
            weight = torch.zeros(len(classes), x.shape[1])
            bias = torch.zeros(len(classes))
            state = [(p, torch.zeros_like(p), torch.zeros_like(p)) for p in (weight, bias)]
            beta1, beta2, eps = 0.9, 0.999, 1e-8
            for step in range(1, steps + 1):
                residual = (torch.softmax(x @ weight.T + bias, dim=-1) - onehot) / len(x)   # d loss / d logits
                grads = (residual.T @ x + l2 * weight, residual.sum(dim=0))
                for (p, m, v), g in zip(state, grads):
                    m.mul_(beta1).add_(g, alpha=1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    p.sub_(lr * (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + eps))
            linear = nn.Linear(x.shape[1], len(classes))
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
    finally:
        torch.set_num_threads(threads)
    linear.requires_grad_(False)
    return LinearProbe(mean=mean, std=std, linear=linear, classes=list(classes))


def label_indices(labels: Sequence[str], classes: Sequence[str]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[label] for label in labels], dtype=torch.long)

