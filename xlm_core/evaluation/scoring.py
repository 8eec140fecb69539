"""Every figure of one model on an ``EvalPlan``, keyed by its path in eval.json (without the model's name).

    score_model(model, discriminator, plan, settings, device, progress)   -> Scores(figures, counts)
    unigram_floor(plan, settings, vocab_size)                             -> figures of the best context-free guess

Pure functions of their inputs: nothing is read from files but the plan's test shards, nothing passed in is changed.
``progress`` (optional) hears when each job (a language, a pair, the bitexts, a suite, the probes) starts and ends.
The out-of-domain suites are scored by the very function that scores the test split's bitexts, with the same settings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch

from xlm_core.data import iter_eval_batches
from xlm_core.evaluation.inputs import Bitext, EvalPlan
from xlm_core.evaluation.probes import score_probes
from xlm_core.metrics import (LMScore, RetrievalResult, bitext_retrieval, causal_lm_score, center, masked_lm_score,
                              pooled_embeddings, train_linear_probe, unigram_score)
from xlm_core.model import XLMModel
from xlm_core.adversary import LanguageDiscriminator

Key = tuple[str, ...]
Figures = dict[Key, float]
Counts = dict[Key, Any]   # what a figure was measured on (int), and facts beside it: chance, layer, notes
# Figures that get a "mean" over their languages/pairs/directions; perplexities average geometrically.
AVERAGED = ("mlm_accuracy", "mlm_perplexity", "tlm_accuracy", "clm_perplexity", "retrieval_accuracy")


class ProbeSettings(Protocol):
    steps: int
    lr: float
    l2: float


class ScoringSettings(Protocol):
    """The evaluation settings scoring reads (the evaluate section of params.yaml has them all)."""

    seq_len: int
    batch_size: int
    max_batches: Optional[int]
    mask_rate: float
    seed: int
    scoring: str
    margin_k: int
    center: bool
    probe: ProbeSettings


class Progress(Protocol):
    def start(self, job: str) -> None: ...

    def done(self) -> None: ...


@dataclass
class Scores:
    figures: Figures       # metric path -> value
    counts: Counts         # what each figure was measured on (targets, candidates, examples)


class _Silent:
    def start(self, job: str) -> None:
        pass

    def done(self) -> None:
        pass


def score_model(model: XLMModel, discriminator: Optional[LanguageDiscriminator], plan: EvalPlan,
                settings: ScoringSettings, device: torch.device, progress: Optional[Progress] = None) -> Scores:
    """All figures of one model: LM per language and pair, the discriminator, bitext retrieval, the suites."""
    progress = progress or _Silent()
    embed = _embedder(model, plan, settings, device)
    lm = _score_language_models(model, discriminator, plan, settings, device, progress)
    progress.start("retrieval")
    bitexts = _score_bitexts(embed, plan, settings)
    progress.done()
    progress.start("out-of-domain")
    ood = _score_out_of_domain(embed, plan, settings)
    progress.done()
    suites = _score_suites(embed, plan, settings, progress)
    probes = Scores({}, {})
    if plan.probes is not None:
        progress.start("probes")
        probes = Scores(*score_probes(embed, plan.probes, settings))
        progress.done()
    figures = with_means({**lm.figures, **bitexts.figures, **ood.figures, **suites.figures, **probes.figures})
    if ("retrieval_accuracy", "mean") in figures:   # the in-domain figure the out-of-domain headline stands beside
        figures[("in_domain", "retrieval_mean")] = figures[("retrieval_accuracy", "mean")]
    return Scores(figures=figures, counts={**lm.counts, **bitexts.counts, **ood.counts, **suites.counts,
                                           **probes.counts})


def unigram_floor(plan: EvalPlan, settings: ScoringSettings, vocab_size: int) -> Figures:
    """MLM figures of the best context-free guess on each language's test targets (the same targets as the models')."""
    figures: Figures = {}
    for lang in plan.languages:
        score = unigram_score(_eval_batches(plan, settings, "mlm", lang), vocab_size, settings.mask_rate)
        if score.targets:
            figures[("mlm_accuracy", lang)] = score.accuracy
            figures[("mlm_perplexity", lang)] = score.perplexity
    return with_means(figures)


def with_means(figures: Figures) -> Figures:
    """``figures`` plus a (metric, "mean") entry for each averaged metric measured on more than one key."""
    means: Figures = {}
    for metric in AVERAGED:
        values = [v for k, v in figures.items() if len(k) == 2 and k[0] == metric]
        if len(values) > 1:
            # the geometric mean of perplexities is the exp of the mean per-language cross-entropy
            means[(metric, "mean")] = (math.exp(np.mean(np.log(values))) if metric.endswith("perplexity")
                                       else float(np.mean(values)))
    return {**figures, **means}


def _eval_batches(plan: EvalPlan, settings: ScoringSettings, objective: str, key: str):
    return iter_eval_batches(plan.test_dir, plan.model_languages, objective, key, settings.seq_len,
                             settings.batch_size, max_batches=settings.max_batches, seed=settings.seed,
                             tokenizer=plan.tokenizer)


def _lm_figures(key: str, score: LMScore, prefix: str) -> Scores:
    if not score.targets:
        return Scores({}, {})
    return Scores({(f"{prefix}_accuracy", key): score.accuracy, (f"{prefix}_perplexity", key): score.perplexity},
                  {(f"{prefix}_targets", key): score.targets})


def _score_language_models(model, discriminator, plan: EvalPlan, settings: ScoringSettings, device,
                           progress: Progress) -> Scores:
    """MLM (+ the discriminator on the same forward) and CLM per language, TLM per pair."""
    figures: Figures = {}
    counts: Counts = {}

    def add(part: Scores) -> None:
        figures.update(part.figures)
        counts.update(part.counts)

    disc_correct = disc_total = 0
    for lang in plan.languages:
        progress.start(f"mlm {lang}")
        score, disc = masked_lm_score(model, _eval_batches(plan, settings, "mlm", lang), settings.mask_rate, device,
                                      discriminator, plan.discriminator_layer)
        add(_lm_figures(lang, score, "mlm"))
        if disc is not None:
            disc_correct, disc_total = disc_correct + disc.correct, disc_total + disc.total
        if plan.clm:
            progress.start(f"clm {lang}")
            add(_lm_figures(lang, causal_lm_score(model, _eval_batches(plan, settings, "clm", lang), device), "clm"))
        progress.done()
    if disc_total:
        figures[("discriminator_accuracy",)] = disc_correct / disc_total
    for pair in plan.pairs:
        progress.start(f"tlm {pair}")
        score, _ = masked_lm_score(model, _eval_batches(plan, settings, "tlm", pair), settings.mask_rate, device)
        add(_lm_figures(pair, score, "tlm"))
        progress.done()
    return Scores(figures, counts)


def retrieve(embed, bitexts: dict[str, Bitext], settings: ScoringSettings) -> dict[str, RetrievalResult]:
    """Top-1 retrieval both ways per pair; each (language, segment id) is embedded once, however many pairs share it,
    and with ``settings.center`` each side of a pair loses its mean over that pair's own sentences (the export's
    recipe: for a pair of collections, subtract each side's mean vector; the user's suites are centred so too)."""
    needed: dict[str, dict[str, np.ndarray]] = {}
    for bitext in bitexts.values():
        needed.setdefault(bitext.src_lang, {}).update(zip(bitext.ids, bitext.src))
        needed.setdefault(bitext.tgt_lang, {}).update(zip(bitext.ids, bitext.tgt))
    vectors: dict[tuple[str, str], torch.Tensor] = {}
    for lang, by_id in needed.items():
        ids = list(by_id)
        for seg_id, vec in zip(ids, embed([by_id[i] for i in ids], lang)):
            vectors[(lang, seg_id)] = vec
    out = {}
    for pair, bitext in bitexts.items():
        src = torch.stack([vectors[(bitext.src_lang, i)] for i in bitext.ids])
        tgt = torch.stack([vectors[(bitext.tgt_lang, i)] for i in bitext.ids])
        if settings.center:   # each side on its own centroid, over this pair's sentences
            src, tgt = center(src), center(tgt)
        out[pair] = bitext_retrieval(src, tgt, settings.scoring, settings.margin_k)
    return out


def _score_bitexts(embed, plan: EvalPlan, settings: ScoringSettings) -> Scores:
    figures: Figures = {}
    counts: Counts = {}
    for pair, result in retrieve(embed, plan.bitexts, settings).items():
        bitext = plan.bitexts[pair]
        figures[("retrieval_accuracy", pair)] = result.forward
        figures[("retrieval_accuracy", f"{bitext.tgt_lang}-{bitext.src_lang}")] = result.backward
        counts[("retrieval_candidates", pair)] = result.candidates
    return Scores(figures, counts)


def _score_out_of_domain(embed, plan: EvalPlan, settings: ScoringSettings) -> Scores:
    """Each out-of-domain suite as the test split's bitexts (each side centred per pair): per direction, per pair
    (the mean of its two directions), per suite, and the mean over every suite's pairs, the headline figure."""
    figures: Figures = {}
    counts: Counts = {}
    if not plan.out_of_domain:
        counts[("out_of_domain", "note")] = plan.out_of_domain_note or "no out-of-domain suite"
        return Scores(figures, counts)
    all_pairs = []
    for suite in plan.out_of_domain:
        key = ("out_of_domain", "suites", suite.name)
        pair_means = []
        for pair, result in retrieve(embed, suite.bitexts, settings).items():
            bitext = suite.bitexts[pair]
            for direction, value in ((pair, result.forward), (f"{bitext.tgt_lang}-{bitext.src_lang}", result.backward)):
                figures[(*key, "directions", direction)] = value
                counts[(*key, "directions", direction, "n")] = result.candidates
            pair_means.append((result.forward + result.backward) / 2)
            figures[(*key, "pairs", pair)] = pair_means[-1]
        figures[(*key, "mean")] = float(np.mean(pair_means))
        all_pairs += pair_means
    figures[("out_of_domain", "mean")] = float(np.mean(all_pairs))
    return Scores(figures, counts)


def _score_suites(embed, plan: EvalPlan, settings: ScoringSettings, progress: Progress) -> Scores:
    figures: Figures = {}
    counts: Counts = {}
    for suite in plan.retrieval_suites:
        progress.start(suite.name)
        src, tgt = embed(suite.src, suite.src_lang), embed(suite.tgt, suite.tgt_lang)
        if settings.center:
            src, tgt = center(src), center(tgt)
        result = bitext_retrieval(src, tgt, settings.scoring, settings.margin_k)
        figures[("suites", suite.name, "accuracy", f"{suite.src_lang}-{suite.tgt_lang}")] = result.forward
        figures[("suites", suite.name, "accuracy", f"{suite.tgt_lang}-{suite.src_lang}")] = result.backward
        counts[("suites", suite.name, "candidates")] = result.candidates
        progress.done()
    for suite in plan.classification_suites:
        progress.start(suite.name)
        features = {lang: embed(texts, lang) for lang, texts in suite.texts.items()}
        train_x, train_y = features[suite.train_lang], suite.labels[suite.train_lang]
        probe = train_linear_probe(train_x, train_y, suite.classes, settings.probe.l2, settings.probe.steps,
                                   settings.seed, settings.probe.lr)
        figures[("suites", suite.name, "train_accuracy")] = probe.accuracy(train_x, train_y)
        tested = [lang for lang in suite.texts if lang != suite.train_lang]
        for lang in tested:
            figures[("suites", suite.name, "accuracy", lang)] = probe.accuracy(features[lang], suite.labels[lang])
        figures[("suites", suite.name, "accuracy", "mean")] = float(np.mean(
            [figures[("suites", suite.name, "accuracy", lang)] for lang in tested]))
        counts[("suites", suite.name, "examples")] = sum(len(v) for v in suite.labels.values())
        progress.done()
    return Scores(figures, counts)


def _embedder(model: XLMModel, plan: EvalPlan, settings: ScoringSettings, device: torch.device
              ) -> Callable[..., torch.Tensor]:
    def embed(sentences, lang: str, layer: Optional[int] = None) -> torch.Tensor:
        return pooled_embeddings(model, sentences, plan.lang_index(lang), plan.layer if layer is None else layer,
                                 settings.seq_len, settings.batch_size, device)
    return embed
