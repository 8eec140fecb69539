"""Probes fitted at evaluation time on frozen, mean-pooled test-split states: language identity and Bible genre.

    probe_plan(test_dir, tokenizer, languages, cap, seed, ...)  -> ProbePlan (the sentences, their halves, the tasks)
    score_probes(embed, plan, settings)                         -> figures and counts of one model

Both probes are the logistic regression of xlm_core.metrics.train_linear_probe, trained on half A of the segment ids
and tested on half B, so no verse is both trained and tested on, in any language. Each half is class-balanced (every
class cut to the smallest class's count, keeping the first by a seeded order), so chance is exactly 1 / classes.

    language-ID  classes = the languages; pooled at evaluate.layer and again at the discriminator's layer when that
                 differs. Not centred: centring each language removes exactly the signal this probe measures. It is
                 the honest language-identifiability figure (the co-trained discriminator is only its own opponent's).
    genre        classes = the six genres of xlm_core.evaluation.bible_genres; trained on English verses, tested on
                 every language's (English too, for the gap). Not centred, like the classification suites.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch

from xlm_core.evaluation.bible_genres import GENRES, genre_of
from xlm_core.metrics import train_linear_probe
from xlm_core.shards import ShardSet
from xlm_core.tokenizer import Tokenizer

if TYPE_CHECKING:
    from xlm_core.evaluation.scoring import Counts, Figures, ScoringSettings

GENRE_TRAIN_LANG = "en"
Rows = list[tuple[int, int]]        # (row index into ProbePlan.tokens[lang], class index)


@dataclass
class ProbeTask:
    classes: list[str]
    train: dict[str, Rows]           # language -> balanced half-A rows
    test: dict[str, Rows]            # language -> balanced half-B rows
    notes: list[str] = field(default_factory=list)   # languages left out of the figures, and why


@dataclass
class ProbePlan:
    """A seeded sample of each language's test-split mono rows (at most ``cap``), in the seeded order of their ids."""

    ids: dict[str, list[str]]
    tokens: dict[str, list[np.ndarray]]
    half_a: dict[str, list[bool]]    # per row: its id is in half A (else half B)
    layer: int
    discriminator_layer: Optional[int]
    language_id: Optional[ProbeTask]
    genre: Optional[ProbeTask]
    notes: dict[str, str] = field(default_factory=dict)   # task -> why it was not run


def probe_plan(test_dir: Path, tokenizer: Tokenizer, languages: list[str], cap: int, seed: int, layer: int,
               discriminator_layer: Optional[int]) -> ProbePlan:
    by_lang: dict[str, dict[str, np.ndarray]] = {lang: {} for lang in languages}
    for table in ShardSet(test_dir, tokenizer=tokenizer).iter_tables("mono", columns=["id", "lang", "ids"]):
        langs = table.column("lang").cast("string").to_pylist()
        ids = table.column("id").to_pylist()
        tokens = table.column("ids")
        for i, (lang, seg_id) in enumerate(zip(langs, ids)):
            if lang in by_lang:
                by_lang[lang][seg_id] = tokens[i].values.to_numpy()
    # One seeded order of all ids, whatever their language: the same verse falls in the same half everywhere, and
    # alternate ranks make the halves, so even a capped sample is split evenly.
    all_ids = sorted({seg_id for rows in by_lang.values() for seg_id in rows})
    order = np.random.default_rng(seed).permutation(len(all_ids))
    rank = {all_ids[j]: r for r, j in enumerate(order)}
    plan = ProbePlan({}, {}, {}, layer, discriminator_layer, None, None)
    for lang in languages:
        kept = sorted(by_lang[lang], key=rank.__getitem__)[:cap]
        plan.ids[lang] = kept
        plan.tokens[lang] = [by_lang[lang][seg_id] for seg_id in kept]
        plan.half_a[lang] = [rank[seg_id] % 2 == 0 for seg_id in kept]
    plan.language_id = _language_id_task(plan, languages)
    if plan.language_id is None:
        plan.notes["language_id_probe"] = "needs test sentences of at least two languages in both halves"
    plan.genre, note = _genre_task(plan, languages)
    if note:
        plan.notes["genre"] = note
    return plan


def _balanced(rows: Rows, n_classes: int) -> Rows:
    """The first rows of each class (rows are in the seeded order), every class cut to the smallest one's count."""
    by_class: list[Rows] = [[] for _ in range(n_classes)]
    for row in rows:
        by_class[row[1]].append(row)
    keep = min(len(c) for c in by_class)
    return sorted(row for c in by_class for row in c[:keep])


def _half(plan: ProbePlan, lang: str, labels: list[Optional[int]], a: bool) -> Rows:
    return [(i, y) for i, (y, in_a) in enumerate(zip(labels, plan.half_a[lang])) if y is not None and in_a == a]


def _language_id_task(plan: ProbePlan, languages: list[str]) -> Optional[ProbeTask]:
    present = [lang for lang in languages if plan.ids[lang]]
    halves = {}
    for a in (True, False):
        rows = {lang: _half(plan, lang, [k] * len(plan.ids[lang]), a) for k, lang in enumerate(present)}
        keep = min((len(r) for r in rows.values()), default=0)      # the same count per language
        halves[a] = {lang: r[:keep] for lang, r in rows.items()}
    if len(present) < 2 or not all(halves[a][present[0]] for a in (True, False)):
        return None
    return ProbeTask(present, halves[True], halves[False])


def _genre_task(plan: ProbePlan, languages: list[str]) -> tuple[Optional[ProbeTask], Optional[str]]:
    if GENRE_TRAIN_LANG not in languages or not plan.ids[GENRE_TRAIN_LANG]:
        return None, "needs English test text: the probe is trained on English verses"
    labels = {lang: [None if genre_of(seg_id) is None else GENRES.index(genre_of(seg_id)) for seg_id in plan.ids[lang]]
              for lang in languages}
    if all(y is None for y in labels[GENRE_TRAIN_LANG]):
        return None, "the test split's ids are not Bible verse ids (BBB.CCC.VVV): no genre labels"
    train = _balanced(_half(plan, GENRE_TRAIN_LANG, labels[GENRE_TRAIN_LANG], True), len(GENRES))
    if not train:
        return None, "English half A lacks verses of some genre: a balanced six-way probe needs all six"
    test, notes = {}, []
    for lang in languages:
        half_b = _half(plan, lang, labels[lang], False)
        rows = _balanced(half_b, len(GENRES))
        if rows:
            test[lang] = rows
        elif lang != GENRE_TRAIN_LANG:   # a balanced test needs every genre: say which are missing, not drop silently
            missing = [g for k, g in enumerate(GENRES) if all(y != k for _i, y in half_b)]
            notes.append(f"{lang}: not in the genre figures, its half B has no verse of {', '.join(missing)}")
    if GENRE_TRAIN_LANG not in test:
        return None, "English half B lacks verses of some genre: no English accuracy to measure the gap against"
    return ProbeTask(list(GENRES), {GENRE_TRAIN_LANG: train}, test, notes), None


# ------------------------------------------------------------------------------------------------------- scoring
Embed = Callable[[list, str, int], torch.Tensor]     # (token ids, language, layer) -> [N, d] pooled


def _stack(features: dict[str, torch.Tensor], rows: dict[str, Rows]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.cat([features[lang][[i for i, _y in r]] for lang, r in rows.items()])
    y = torch.tensor([label for r in rows.values() for _i, label in r], dtype=torch.long)
    return x, y


def _fit(features: dict[str, torch.Tensor], task: ProbeTask, settings: ScoringSettings):
    x, y = _stack(features, task.train)
    probe = settings.probe
    return train_linear_probe(x, y, task.classes, probe.l2, probe.steps, settings.seed, probe.lr), x, y


def score_probes(embed: Embed, plan: ProbePlan, settings: ScoringSettings) -> tuple[Figures, Counts]:
    """The language-ID probe's accuracy (at the pooled layer, and at the discriminator's when different) and the
    genre probe's accuracy per language with its gap to English; counts and chance levels beside them."""
    figures: Figures = {}
    counts: dict[tuple, Any] = {}
    cache: dict[tuple[str, int], torch.Tensor] = {}

    def features(layer: int) -> dict[str, torch.Tensor]:
        for lang, tokens in plan.tokens.items():
            if (lang, layer) not in cache:
                cache[(lang, layer)] = embed(tokens, lang, layer)
        return {lang: cache[(lang, layer)] for lang in plan.tokens}

    for task_name, note in plan.notes.items():
        counts[(task_name, "note")] = note
    task = plan.language_id
    if task is not None:
        key = ("language_id_probe",)
        counts[(*key, "chance")] = 1 / len(task.classes)
        counts[(*key, "layer")] = plan.layer
        counts[(*key, "n_train")] = sum(map(len, task.train.values()))
        counts[(*key, "n_test")] = sum(map(len, task.test.values()))
        layers = [(key, plan.layer)]
        if plan.discriminator_layer is not None and plan.discriminator_layer != plan.layer:
            layers.append(((*key, "at_discriminator_layer"), plan.discriminator_layer))
            counts[(*key, "at_discriminator_layer", "layer")] = plan.discriminator_layer
        for where, layer in layers:
            feats = features(layer)
            probe, _x, _y = _fit(feats, task, settings)
            figures[(*where, "accuracy")] = probe.accuracy(*_stack(feats, task.test))
    task = plan.genre
    if task is not None:
        feats = features(plan.layer)
        probe, x, y = _fit(feats, task, settings)
        counts[("genre", "chance")] = 1 / len(task.classes)
        counts[("genre", "train_lang")] = GENRE_TRAIN_LANG
        counts[("genre", "n_train")] = len(y)
        if task.notes:
            counts[("genre", "notes")] = "; ".join(task.notes)   # one string: dvc metrics show prints it as is
        figures[("genre", "train_accuracy")] = probe.accuracy(x, y)
        for lang, rows in task.test.items():
            figures[("genre", "accuracy", lang)] = probe.accuracy(*_stack(feats, {lang: rows}))
            counts[("genre", "n_test", lang)] = len(rows)
        english = figures[("genre", "accuracy", GENRE_TRAIN_LANG)]
        others = [lang for lang in task.test if lang != GENRE_TRAIN_LANG]
        for lang in others:
            figures[("genre", "gap_to_en", lang)] = english - figures[("genre", "accuracy", lang)]
        if others:
            figures[("genre", "mean_non_en")] = float(np.mean([figures[("genre", "accuracy", k)] for k in others]))
    return figures, counts
