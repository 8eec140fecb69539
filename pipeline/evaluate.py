"""The `evaluate` stage: score data/model on the test shards, beside the floor of a randomly initialised twin.

    MLM accuracy/perplexity per language (beside the unigram floor: the best context-free guess at the same
    targets) and TLM per pair (fixed-seed masks), CLM perplexity when the model was trained causally, the language
    discriminator's accuracy when adversarial training was on, bitext retrieval for every configured pair (XTREME's
    Tatoeba protocol: mean-pooled layer `evaluate.layer`, cosine or ratio-margin nearest neighbour, top-1 both ways;
    with `center`, each language's vectors first lose their mean over all of that language's test sentences in the
    configured pairs, a suite's over the suite's file), and the user's suites from params.yaml (retrieval on
    line-aligned files; zero-shot classification with a linear probe trained on one language).

Outputs (each written atomically): metrics/eval.json (`dvc metrics show`: metric -> language/pair ->
{trained, baseline, unigram}), reports/eval/*.json (`dvc plots show` data), reports/eval/*.png and reports/eval.md.
Everything the run needs is validated before any output is touched.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pipeline.errors import PipelineError, disk_full_is_an_error, run_cli
from pipeline.params import ClassificationSuite, RetrievalSuite, StageParams, load_params
from xlm_core import checkpoint as ckpt
from xlm_core.atomic import atomic_dir, atomic_file, write_json
from xlm_core.data import DataError, iter_eval_batches
from xlm_core.metrics import (LMScore, bitext_retrieval, causal_lm_score, center, default_layer, unigram_score,
                              label_indices, masked_lm_score, pooled_embeddings, train_linear_probe)
from xlm_core.model import ModelConfig, XLMModel
from xlm_core.objectives import LanguageDiscriminator
from xlm_core.shards import ShardError, ShardSet
from xlm_core.tokenizer import Tokenizer, TokenizerError

MODELS = ("trained", "baseline")
Key = tuple[str, ...]   # a key path into eval.json, without the trailing model name


# ----------------------------------------------------------------------------------------------------- the model
@dataclass
class ModelDir:
    config: ModelConfig
    state: dict[str, torch.Tensor]
    languages: list[str]
    pairs: list[str]
    tokenizer: Tokenizer


def read_model_dir(model_dir: Path) -> ModelDir:
    """data/model/ as pipeline.pretrain writes it: model.safetensors, config.json and the tokenizer files."""
    from safetensors.torch import load_file

    fix = "run `dvc repro pretrain`"
    config_path, weights_path = model_dir / "config.json", model_dir / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise PipelineError(f"{path}: not found; {fix}")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
        config = ModelConfig.from_dict(meta["model"])
        languages, pairs = list(meta["languages"]), list(meta.get("pairs", []))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"{config_path}: not a model config ({exc}); {fix}") from None
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise PipelineError(f"{weights_path}: unreadable ({exc}); {fix}") from None
    try:
        tokenizer = Tokenizer.load(model_dir)
    except TokenizerError as exc:
        raise PipelineError(f"{model_dir}: {exc}") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise PipelineError(f"{model_dir}: tokenizer has {tokenizer.vocab_size} ids but the model {config.vocab_size}; "
                            f"{fix}")
    return ModelDir(config=config, state=state, languages=languages, pairs=pairs, tokenizer=tokenizer)


def build_model(config: ModelConfig, state: Optional[dict[str, torch.Tensor]], seed: int,
                device: torch.device) -> XLMModel:
    """The trained model (``state``), or with ``state=None`` the baseline: the same config, initialised from ``seed``."""
    torch.manual_seed(seed)
    model = XLMModel(config)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise PipelineError(f"data/model/model.safetensors does not fit its config.json ({str(exc)[:200]}); "
                                f"run `dvc repro pretrain`") from None
    return model.to(device).eval()


@dataclass
class TrainingInfo:
    """What only the newest checkpoint knows: the objectives and the language discriminator."""

    objectives: dict[str, float] = field(default_factory=dict)
    discriminator_state: Optional[dict[str, torch.Tensor]] = None
    discriminator_layer: Optional[int] = None
    note: str = ""


def read_training_info(checkpoints_dir: Path, model: ModelDir) -> TrainingInfo:
    """Objectives and discriminator weights from the newest committed checkpoint, if it is the one data/model holds.

    The discriminator exists only in checkpoints (data/model is the encoder alone). A checkpoint from another run
    (its config or weights differ from data/model) is ignored, with a note in the report.
    """
    from safetensors import safe_open

    latest = ckpt.latest_checkpoint(checkpoints_dir) if checkpoints_dir.is_dir() else None
    if latest is None:
        return TrainingInfo(note=f"no committed checkpoint under {checkpoints_dir}")
    try:
        meta = json.loads((latest / "meta.json").read_text(encoding="utf-8"))
        with safe_open(str(latest / "model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
            probe = "model.mlm_head.bias"
            same = (meta.get("model_config") == model.config.to_dict() and probe in keys
                    and torch.equal(f.get_tensor(probe), model.state["mlm_head.bias"]))
            disc = {k[len("discriminator."):]: f.get_tensor(k) for k in keys if k.startswith("discriminator.")}
    except (OSError, ValueError, KeyError) as exc:
        return TrainingInfo(note=f"checkpoint {latest} unreadable ({exc})")
    if not same:
        return TrainingInfo(note=f"checkpoint {latest.name} is not the run data/model comes from")
    pretrain = meta.get("identity", {}).get("pretrain", {})
    objectives = {k: float(v) for k, v in pretrain.get("objectives", {}).items()}
    if not disc:
        return TrainingInfo(objectives=objectives, note="adversarial training was off (no discriminator)")
    layer = pretrain.get("adversarial", {}).get("layer")
    return TrainingInfo(objectives=objectives, discriminator_state=disc,
                        discriminator_layer=layer if layer is not None else default_layer(model.config.n_layers))


def build_discriminator(state: dict[str, torch.Tensor], d_model: int, n_languages: int, trained: bool, seed: int,
                        device: torch.device) -> LanguageDiscriminator:
    hidden = state["net.0.weight"].shape[0]
    torch.manual_seed(seed + 1)
    disc = LanguageDiscriminator(d_model, n_languages, hidden)
    if trained:
        disc.load_state_dict(state, strict=True)
    return disc.to(device).eval()


# ------------------------------------------------------------------------------------------------- the test data
@dataclass
class Bitext:
    """Aligned test sentences of one pair (row i of src translates row i of tgt), sorted by segment id."""

    src_lang: str
    tgt_lang: str
    ids: list[str]
    src: list[np.ndarray]
    tgt: list[np.ndarray]


def read_bitexts(test_dir: Path, tokenizer: Tokenizer, pairs: list[str], cap: int) -> dict[str, Bitext]:
    """The para test rows of each pair, joined on `id` by the clean stage; the first ``cap`` ids of each pair."""
    rows: dict[str, dict[str, tuple]] = {pair: {} for pair in pairs}
    shards = ShardSet(test_dir, tokenizer=tokenizer)
    for table in shards.iter_tables("para", columns=["id", "src_lang", "tgt_lang", "src_ids", "tgt_ids"]):
        src_lang = table.column("src_lang").cast("string").to_pylist()
        tgt_lang = table.column("tgt_lang").cast("string").to_pylist()
        ids = table.column("id").to_pylist()
        src_ids, tgt_ids = table.column("src_ids"), table.column("tgt_ids")
        for i, (a, b) in enumerate(zip(src_lang, tgt_lang)):
            pair = f"{a}-{b}"
            if pair in rows:
                rows[pair][ids[i]] = (src_ids[i].values.to_numpy(), tgt_ids[i].values.to_numpy())
    out = {}
    for pair, by_id in rows.items():
        keys = sorted(by_id)[:cap]
        src_lang, tgt_lang = pair.split("-")
        out[pair] = Bitext(src_lang, tgt_lang, keys, [by_id[k][0] for k in keys], [by_id[k][1] for k in keys])
    return out


@dataclass
class RetrievalData:
    name: str
    src_lang: str
    tgt_lang: str
    src: list[np.ndarray]
    tgt: list[np.ndarray]


@dataclass
class ClassificationData:
    name: str
    train_lang: str
    classes: list[str]
    labels: dict[str, torch.Tensor]            # language -> class indices
    texts: dict[str, list[np.ndarray]]         # language -> token ids


def _read_lines(path_text: str, where: str) -> list[str]:
    """The lines of a UTF-8 text file, or one error naming the file (and line) and the fix."""
    path = Path(path_text)
    if not path.is_file():
        raise PipelineError(f"{path}: not found (params.yaml {where}); fix the path or create the file")
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            raise PipelineError(f"{path}:{number}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from None
        out.append(text)
    if not out:
        raise PipelineError(f"{path}: empty file (params.yaml {where}); it needs one example per line")
    return out


def _check_suite_lang(lang: str, where: str, model: ModelDir) -> None:
    if model.config.use_lang_emb and lang not in model.languages:
        raise PipelineError(f"params.yaml: {where} = {lang!r}: this model has language embeddings for "
                            f"{model.languages} only; use one of those")


def load_retrieval_suite(suite: RetrievalSuite, index: int, model: ModelDir) -> RetrievalData:
    where = f"evaluate.retrieval[{index}]"
    _check_suite_lang(suite.src_lang, f"{where}.src_lang", model)
    _check_suite_lang(suite.tgt_lang, f"{where}.tgt_lang", model)
    src = _read_lines(suite.src, f"{where}.src")
    tgt = _read_lines(suite.tgt, f"{where}.tgt")
    if len(src) != len(tgt):
        raise PipelineError(f"{suite.src}: {len(src)} lines but {suite.tgt} has {len(tgt)}; the two files of "
                            f"suite {suite.name!r} must be line-aligned (line i translates line i)")
    for path, lines in ((suite.src, src), (suite.tgt, tgt)):
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                raise PipelineError(f"{path}:{number}: empty line; every line of suite {suite.name!r} must hold a "
                                    f"sentence (remove line {number} from both files)")
    if len(src) < 2:
        raise PipelineError(f"{suite.src}: one line; retrieval needs at least two sentence pairs")
    return RetrievalData(suite.name, suite.src_lang, suite.tgt_lang, model.tokenizer.encode_batch(src),
                         model.tokenizer.encode_batch(tgt))


def _read_labelled(path: str, where: str) -> tuple[list[str], list[str], list[int]]:
    labels, texts, numbers = [], [], []
    for number, line in enumerate(_read_lines(path, where), start=1):
        label, tab, text = line.partition("\t")
        if not tab:
            raise PipelineError(f"{path}:{number}: no tab; each line must be `label<TAB>text`")
        if not label.strip() or not text.strip():
            raise PipelineError(f"{path}:{number}: empty {'label' if not label.strip() else 'text'}; each line must "
                                f"be `label<TAB>text` with both parts non-empty")
        labels.append(label.strip())
        texts.append(text)
        numbers.append(number)
    return labels, texts, numbers


def load_classification_suite(suite: ClassificationSuite, index: int, model: ModelDir) -> ClassificationData:
    where = f"evaluate.classification[{index}]"
    for lang in suite.files:
        _check_suite_lang(lang, f"{where}.files.{lang}", model)
    read = {lang: _read_labelled(path, f"{where}.files.{lang}") for lang, path in suite.files.items()}
    classes = sorted(set(read[suite.train_lang][0]))
    if len(classes) < 2:
        raise PipelineError(f"{suite.files[suite.train_lang]}: one label ({classes[0]!r}); a classifier needs "
                            f"examples of at least two labels in the training language's file")
    for lang, (labels, _texts, numbers) in read.items():
        for label, number in zip(labels, numbers):
            if label not in classes:
                raise PipelineError(f"{suite.files[lang]}:{number}: label {label!r} does not occur in the training "
                                    f"file {suite.files[suite.train_lang]} (labels {classes}); fix the label or add "
                                    f"training examples of it")
    return ClassificationData(
        name=suite.name, train_lang=suite.train_lang, classes=classes,
        labels={lang: label_indices(labels, classes) for lang, (labels, _t, _n) in read.items()},
        texts={lang: model.tokenizer.encode_batch(texts) for lang, (_l, texts, _n) in read.items()})


# ---------------------------------------------------------------------------------------------------- scoring
@dataclass
class Plan:
    """Everything one model is scored on (the same for the trained model and its baseline)."""

    test_dir: Path
    tokenizer: Tokenizer
    model_languages: list[str]
    languages: list[str]
    pairs: list[str]
    bitexts: dict[str, Bitext]
    retrieval_suites: list[RetrievalData]
    classification_suites: list[ClassificationData]
    layer: int
    clm: bool
    discriminator_layer: Optional[int]
    notes: list[str] = field(default_factory=list)


def _lang_index(plan: Plan, lang: str) -> int:
    # A language the model never saw (allowed without language embeddings) gets id 0, which is then unused.
    return plan.model_languages.index(lang) if lang in plan.model_languages else 0


def _eval_batches(plan: Plan, ev, objective: str, key: str):
    return iter_eval_batches(plan.test_dir, plan.model_languages, objective, key, ev.seq_len, ev.batch_size,
                             max_batches=ev.max_batches, seed=ev.seed, tokenizer=plan.tokenizer)


def score_model(model: XLMModel, discriminator: Optional[LanguageDiscriminator], plan: Plan, ev,
                device: torch.device, progress) -> tuple[dict[Key, float], dict[Key, int]]:
    """All figures of one model keyed by their path in eval.json, and the sizes they were measured on."""
    figures: dict[Key, float] = {}
    counts: dict[Key, int] = {}
    embed = _embedder(model, plan, ev, device)
    _score_language_models(model, discriminator, plan, ev, device, progress, figures, counts)
    progress.set_postfix_str("retrieval")
    _score_bitexts(embed, plan, ev, figures, counts)
    progress.update(1)
    _score_suites(embed, plan, ev, progress, figures, counts)
    _add_means(figures)
    return figures, counts


def unigram_floor(plan: Plan, ev, vocab_size: int) -> dict[Key, float]:
    """MLM figures of the best context-free guess on each language's test targets (the same targets as the models')."""
    figures: dict[Key, float] = {}
    for lang in plan.languages:
        score = unigram_score(_eval_batches(plan, ev, "mlm", lang), vocab_size, ev.mask_rate)
        if score.targets:
            figures[("mlm_accuracy", lang)] = score.accuracy
            figures[("mlm_perplexity", lang)] = score.perplexity
    _add_means(figures)
    return figures


def _add_means(figures: dict[Key, float]) -> None:
    for metric in ("mlm_accuracy", "mlm_perplexity", "tlm_accuracy", "clm_perplexity", "retrieval_accuracy"):
        values = [v for k, v in figures.items() if len(k) == 2 and k[0] == metric]
        if len(values) > 1:
            # perplexities average geometrically (the mean of the per-language cross-entropies)
            mean = (math.exp(np.mean(np.log(values))) if metric.endswith("perplexity") else float(np.mean(values)))
            figures[(metric, "mean")] = mean


def _score_language_models(model, discriminator, plan: Plan, ev, device, progress, figures, counts) -> None:
    """MLM (+ the discriminator on the same forward) and CLM per language, TLM per pair."""
    def record(key: str, score: LMScore, prefix: str) -> None:
        if score.targets:
            figures[(f"{prefix}_accuracy", key)] = score.accuracy
            figures[(f"{prefix}_perplexity", key)] = score.perplexity
            counts[(f"{prefix}_targets", key)] = score.targets

    disc_correct = disc_total = 0
    for lang in plan.languages:
        progress.set_postfix_str(f"mlm {lang}")
        score, disc = masked_lm_score(model, _eval_batches(plan, ev, "mlm", lang), ev.mask_rate, device,
                                      discriminator, plan.discriminator_layer)
        record(lang, score, "mlm")
        if disc is not None:
            disc_correct, disc_total = disc_correct + disc.correct, disc_total + disc.total
        if plan.clm:
            progress.set_postfix_str(f"clm {lang}")
            record(lang, causal_lm_score(model, _eval_batches(plan, ev, "clm", lang), device), "clm")
        progress.update(1)
    if disc_total:
        figures[("discriminator_accuracy",)] = disc_correct / disc_total
    for pair in plan.pairs:
        progress.set_postfix_str(f"tlm {pair}")
        score, _ = masked_lm_score(model, _eval_batches(plan, ev, "tlm", pair), ev.mask_rate, device)
        record(pair, score, "tlm")
        progress.update(1)


def _score_bitexts(embed, plan: Plan, ev, figures, counts) -> None:
    """Top-1 retrieval both ways per pair; each (language, segment id) is embedded once, however many pairs share it."""
    needed: dict[str, dict[str, np.ndarray]] = {}
    for bitext in plan.bitexts.values():
        needed.setdefault(bitext.src_lang, {}).update(zip(bitext.ids, bitext.src))
        needed.setdefault(bitext.tgt_lang, {}).update(zip(bitext.ids, bitext.tgt))
    vectors: dict[tuple[str, str], torch.Tensor] = {}
    for lang, by_id in needed.items():
        ids = list(by_id)
        embedded = embed([by_id[i] for i in ids], lang)
        if ev.center:   # the language's centroid over all its test sentences
            embedded = center(embedded)
        for seg_id, vec in zip(ids, embedded):
            vectors[(lang, seg_id)] = vec
    for pair, bitext in plan.bitexts.items():
        src = torch.stack([vectors[(bitext.src_lang, i)] for i in bitext.ids])
        tgt = torch.stack([vectors[(bitext.tgt_lang, i)] for i in bitext.ids])
        result = bitext_retrieval(src, tgt, ev.scoring, ev.margin_k)
        figures[("retrieval_accuracy", pair)] = result.forward
        figures[("retrieval_accuracy", f"{bitext.tgt_lang}-{bitext.src_lang}")] = result.backward
        counts[("retrieval_candidates", pair)] = result.candidates


def _score_suites(embed, plan: Plan, ev, progress, figures, counts) -> None:
    for suite in plan.retrieval_suites:
        progress.set_postfix_str(suite.name)
        src, tgt = embed(suite.src, suite.src_lang), embed(suite.tgt, suite.tgt_lang)
        if ev.center:
            src, tgt = center(src), center(tgt)
        result = bitext_retrieval(src, tgt, ev.scoring, ev.margin_k)
        figures[("suites", suite.name, "accuracy", f"{suite.src_lang}-{suite.tgt_lang}")] = result.forward
        figures[("suites", suite.name, "accuracy", f"{suite.tgt_lang}-{suite.src_lang}")] = result.backward
        counts[("suites", suite.name, "candidates")] = result.candidates
        progress.update(1)
    for suite in plan.classification_suites:
        progress.set_postfix_str(suite.name)
        features = {lang: embed(texts, lang) for lang, texts in suite.texts.items()}
        train_x, train_y = features[suite.train_lang], suite.labels[suite.train_lang]
        probe = train_linear_probe(train_x, train_y, suite.classes, ev.probe.l2, ev.probe.steps, ev.seed,
                                   ev.probe.lr)
        figures[("suites", suite.name, "train_accuracy")] = probe.accuracy(train_x, train_y)
        tested = [lang for lang in suite.texts if lang != suite.train_lang]
        for lang in tested:
            figures[("suites", suite.name, "accuracy", lang)] = probe.accuracy(features[lang], suite.labels[lang])
        figures[("suites", suite.name, "accuracy", "mean")] = float(np.mean(
            [figures[("suites", suite.name, "accuracy", lang)] for lang in tested]))
        counts[("suites", suite.name, "examples")] = sum(len(v) for v in suite.labels.values())
        progress.update(1)


def _embedder(model: XLMModel, plan: Plan, ev, device: torch.device):
    def embed(sentences, lang: str) -> torch.Tensor:
        return pooled_embeddings(model, sentences, _lang_index(plan, lang), plan.layer, ev.seq_len,
                                 ev.batch_size, device)
    return embed


# ------------------------------------------------------------------------------------------------------ outputs
def _round(value: float) -> float:
    return float(f"{value:.6g}")


def assemble_metrics(per_model: dict[str, dict[Key, float]], counts: dict[Key, int]) -> dict[str, Any]:
    """{metric: {key: {trained, baseline}}}: each figure beside its floor, as `dvc metrics show` columns."""
    out: dict[str, Any] = {}

    def put(path: tuple, value) -> None:
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value

    for name, figures in per_model.items():
        for path, value in figures.items():
            if math.isfinite(value):
                put((*path, name), _round(value))
    for path, value in counts.items():
        put(path, value)
    return out


def _plot_rows(per_model: dict[str, dict[Key, float]], metric: str, key_name: str, keys: list[str]) -> list[dict]:
    rows = []
    for key in keys:
        row: dict[str, Any] = {key_name: key}
        for name, figures in per_model.items():
            value = figures.get((metric, key))
            if value is not None and math.isfinite(value):
                row[name] = _round(value)
        if len(row) > 1:
            rows.append(row)
    return rows


def retrieval_heatmap(per_model: dict[str, dict[Key, float]], languages: list[str], scoring: str):
    """Source × target language grid of top-1 retrieval accuracy, one panel per model, values written in the cells."""
    from matplotlib.figure import Figure

    names = list(per_model)
    fig = Figure(figsize=(4.2 * len(names) + 1.0, 4.0), constrained_layout=True)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    image = None
    for ax, name in zip(axes, names):
        grid = np.full((len(languages), len(languages)), np.nan)
        for i, src in enumerate(languages):
            for j, tgt in enumerate(languages):
                value = per_model[name].get(("retrieval_accuracy", f"{src}-{tgt}"))
                if value is not None:
                    grid[i, j] = value
        image = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(languages)), languages)
        ax.set_yticks(range(len(languages)), languages)
        ax.set_xlabel("target language (candidates)")
        ax.set_ylabel("source language (queries)")
        ax.set_title(f"{name}: top-1 retrieval ({scoring})")
        for i in range(len(languages)):
            for j in range(len(languages)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
                            color="black" if grid[i, j] > 0.6 else "white", fontsize=9)
        if np.isnan(grid).all():
            ax.text(0.5, 0.5, "no pairs evaluated", transform=ax.transAxes, ha="center", va="center")
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="accuracy")
    return fig


def _short(value: float) -> str:
    if not np.isfinite(value):
        return ""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def perplexity_bars(per_model: dict[str, dict[Key, float]], languages: list[str]):
    """MLM perplexity per language, trained beside baseline (log scale: the floor is near the vocabulary size)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 1.1 * len(languages) + 2), 4.0), constrained_layout=True)
    ax = fig.subplots()
    names = list(per_model)
    width = 0.8 / max(1, len(names))
    x = np.arange(len(languages))
    for k, name in enumerate(names):
        values = [per_model[name].get(("mlm_perplexity", lang), np.nan) for lang in languages]
        bars = ax.bar(x + (k - (len(names) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, labels=[_short(v) for v in values], fontsize=8)
    ax.set_xticks(x, languages)
    ax.set_xlabel("language")
    ax.set_ylabel("MLM perplexity (test split, log scale)")
    ax.set_yscale("log")
    ax.set_title("Masked-LM perplexity: trained vs random-init baseline")
    ax.legend()
    return fig


def save_png(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)


def _fmt(value: Optional[float], perplexity: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.4g}" if perplexity else f"{value:.3f}"


def _table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def render_report(per_model: dict[str, dict[Key, float]], counts: dict[Key, int], plan: Plan, ev,
                  config: ModelConfig, plots_rel: str, floor: Optional[dict[Key, float]] = None) -> str:
    names = list(per_model)

    def cells(metric_path: tuple, perplexity: bool = False) -> list[str]:
        return [_fmt(per_model[n].get(metric_path), perplexity) for n in names]

    lines = ["# Evaluation", "",
             f"Model: {config.n_layers} layers × {config.d_model} (vocabulary {config.vocab_size}), "
             f"{'causal' if config.causal else 'bidirectional'}. Test split: `{plan.test_dir}`. "
             + ("The baseline is the same architecture randomly initialised (seed "
                f"{ev.seed}): the floor of every figure." if "baseline" in names else ""), ""]
    floor = floor or {}
    rows = [[lang, *cells(("mlm_accuracy", lang)), _fmt(floor.get(("mlm_accuracy", lang))),
             *cells(("mlm_perplexity", lang), True), _fmt(floor.get(("mlm_perplexity", lang)), True),
             str(counts.get(("mlm_targets", lang), 0))] for lang in plan.languages]
    lines += _table("Masked LM (test split; unigram = the best context-free guess at the same targets)",
                    ["language", *[f"accuracy ({n})" for n in names], "accuracy (unigram)",
                     *[f"perplexity ({n})" for n in names], "perplexity (unigram)", "targets"], rows)
    rows = [[pair, *cells(("tlm_accuracy", pair)), *cells(("tlm_perplexity", pair), True)] for pair in plan.pairs]
    lines += _table("Translation LM (both sides masked)",
                    ["pair", *[f"accuracy ({n})" for n in names], *[f"perplexity ({n})" for n in names]], rows)
    if plan.clm:
        rows = [[lang, *cells(("clm_accuracy", lang)), *cells(("clm_perplexity", lang), True)]
                for lang in plan.languages]
        lines += _table("Causal LM", ["language", *[f"accuracy ({n})" for n in names],
                                      *[f"perplexity ({n})" for n in names]], rows)
    if any(("discriminator_accuracy",) in per_model[n] for n in names):
        lines += _table("Language discriminator (lower = more language-neutral)", ["", *names],
                        [["accuracy", *cells(("discriminator_accuracy",))],
                         ["chance", *[f"{1 / len(plan.model_languages):.3f}" for _ in names]]])
    rows = []
    for pair, bitext in plan.bitexts.items():
        for direction in (pair, f"{bitext.tgt_lang}-{bitext.src_lang}"):
            rows.append([direction.replace("-", " → "), *cells(("retrieval_accuracy", direction)),
                         str(len(bitext.ids))])
    lines += _table(f"Bitext retrieval (top-1, {ev.scoring}{', languages centred' if ev.center else ''}, "
                    f"layer {plan.layer})",
                    ["direction", *names, "candidates"], rows)
    lines += [f"![retrieval accuracy heatmap]({plots_rel}/retrieval.png)", "",
              f"![MLM perplexity per language]({plots_rel}/perplexity.png)", ""]
    for suite in plan.retrieval_suites:
        rows = [[d.replace("-", " → "), *cells(("suites", suite.name, "accuracy", d)), str(len(suite.src))]
                for d in (f"{suite.src_lang}-{suite.tgt_lang}", f"{suite.tgt_lang}-{suite.src_lang}")]
        lines += _table(f"Suite `{suite.name}`: retrieval", ["direction", *names, "candidates"], rows)
    for suite in plan.classification_suites:
        rows = [[f"{suite.train_lang} (train)", *cells(("suites", suite.name, "train_accuracy")),
                 str(len(suite.labels[suite.train_lang]))]]
        rows += [[lang, *cells(("suites", suite.name, "accuracy", lang)), str(len(suite.labels[lang]))]
                 for lang in suite.texts if lang != suite.train_lang]
        lines += _table(f"Suite `{suite.name}`: zero-shot classification ({len(suite.classes)} labels)",
                        ["language", *names, "examples"], rows)
    if plan.notes:
        lines += ["## Notes", "", *[f"- {note}" for note in plan.notes], ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- the stage
def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise PipelineError("params.yaml: evaluate.device = 'cuda' but no CUDA GPU is visible; use auto or cpu")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def make_plan(params: StageParams, model: ModelDir, shards_dir: Path, info: TrainingInfo) -> Plan:
    ev = params.evaluate
    unknown = [lang for lang in params.languages if lang not in model.languages]
    if unknown:
        raise PipelineError(f"params.yaml: languages lists {unknown}, which data/model was not trained on "
                            f"({model.languages}); run `dvc repro pretrain`")
    n_layers = model.config.n_layers
    layer = default_layer(n_layers) if ev.layer is None else ev.layer
    if layer > n_layers:
        raise PipelineError(f"params.yaml: evaluate.layer = {ev.layer}: this model has layers 0..{n_layers} "
                            f"(0 = embeddings); use null for the middle one")
    if ev.seq_len > model.config.max_positions:
        raise PipelineError(f"params.yaml: evaluate.seq_len = {ev.seq_len} exceeds the model's max_positions = "
                            f"{model.config.max_positions}; lower it")
    test_dir = shards_dir / "test"
    pairs = ["-".join(p) for p in params.pairs]
    try:
        shards = ShardSet(test_dir, tokenizer=model.tokenizer)
        bitexts = read_bitexts(test_dir, model.tokenizer, pairs, ev.max_retrieval_pairs)
    except ShardError as exc:
        raise PipelineError(str(exc)) from None
    notes = []
    languages = [lang for lang in params.languages if int(shards.languages.get(lang, {}).get("tokens", 0)) > 0]
    if len(languages) < len(params.languages):
        notes.append(f"no test text for {sorted(set(params.languages) - set(languages))}: no LM figures for them")
    kept_pairs = [pair for pair in pairs if int(shards.pairs.get(pair, {}).get("tokens", 0)) > 0]
    if len(kept_pairs) < len(pairs):
        notes.append(f"no test pairs for {sorted(set(pairs) - set(kept_pairs))}: no TLM/retrieval figures for them")
    bitexts = {pair: b for pair, b in bitexts.items() if len(b.ids) >= 2}
    retrieval = [load_retrieval_suite(s, i, model) for i, s in enumerate(ev.retrieval)]
    classification = [load_classification_suite(s, i, model) for i, s in enumerate(ev.classification)]
    clm = model.config.causal or info.objectives.get("clm", 0) > 0
    if info.note:
        notes.append(f"language discriminator: {info.note}")
    notes.append("MLM/TLM targets: {:.0%} of the pieces of each test block, all replaced by <mask>, with masks "
                 "fixed by evaluate.seed; at most {} batches of {} per language or pair."
                 .format(ev.mask_rate, ev.max_batches or "all", ev.batch_size))
    return Plan(test_dir=test_dir, tokenizer=model.tokenizer, model_languages=model.languages, languages=languages,
                pairs=kept_pairs, bitexts=bitexts, retrieval_suites=retrieval, classification_suites=classification,
                layer=layer, clm=clm, discriminator_layer=info.discriminator_layer, notes=notes)


def evaluate(params: StageParams, model_dir: Path, shards_dir: Path, checkpoints_dir: Path, metrics_path: Path,
             report_path: Path, plots_dir: Path) -> dict[str, Any]:
    from tqdm import tqdm

    ev = params.evaluate
    if ev.threads:
        torch.set_num_threads(ev.threads)
    device = pick_device(ev.device)
    # Validate everything (model, shards, suites) before computing or touching any output.
    model_files = read_model_dir(model_dir)
    info = read_training_info(checkpoints_dir, model_files)
    plan = make_plan(params, model_files, shards_dir, info)

    models = {"trained": build_model(model_files.config, model_files.state, ev.seed, device)}
    if ev.baseline:
        models["baseline"] = build_model(model_files.config, None, ev.seed, device)
    discriminators: dict[str, Optional[LanguageDiscriminator]] = {name: None for name in models}
    if info.discriminator_state is not None:
        try:
            for name in models:
                discriminators[name] = build_discriminator(info.discriminator_state, model_files.config.d_model,
                                                           len(model_files.languages), name == "trained", ev.seed,
                                                           device)
        except (KeyError, RuntimeError) as exc:  # weights of another shape: report, do not fail the evaluation
            discriminators = {name: None for name in models}
            plan.discriminator_layer = None
            plan.notes.append(f"language discriminator: checkpoint weights unusable ({str(exc)[:120]})")
    jobs = len(plan.languages) + len(plan.pairs) + 1 + len(plan.retrieval_suites) + len(plan.classification_suites)
    per_model: dict[str, dict[Key, float]] = {}
    counts: dict[Key, int] = {}
    try:
        for name, model in models.items():
            with tqdm(total=jobs, desc=f"evaluate {name}", unit="job", file=sys.stderr, dynamic_ncols=True) as bar:
                per_model[name], counts = score_model(model, discriminators[name], plan, ev, device, bar)
    except DataError as exc:
        raise PipelineError(str(exc)) from None

    floor = unigram_floor(plan, ev, model_files.config.vocab_size)
    metrics = assemble_metrics({**per_model, "unigram": floor}, counts)
    in_pairs = {lang for b in plan.bitexts.values() for lang in (b.src_lang, b.tgt_lang)}
    heatmap_languages = [lang for lang in plan.model_languages if lang in in_pairs]
    plots_rel = Path(os.path.relpath(plots_dir.resolve(), report_path.parent.resolve())).as_posix()
    report = render_report(per_model, counts, plan, ev, model_files.config, plots_rel, floor)
    with disk_full_is_an_error("evaluate", f"{plots_dir}, {report_path} or {metrics_path}",
                               outcome="each is whole, the previous or the new version; the rerun writes all three"):
        with atomic_dir(plots_dir) as tmp:
            write_json(tmp / "perplexity.json", _plot_rows(per_model, "mlm_perplexity", "language", plan.languages))
            directions = [d for pair, b in plan.bitexts.items() for d in (pair, f"{b.tgt_lang}-{b.src_lang}")]
            write_json(tmp / "retrieval.json", _plot_rows(per_model, "retrieval_accuracy", "direction", directions))
            save_png(retrieval_heatmap(per_model, heatmap_languages, ev.scoring), tmp / "retrieval.png")
            save_png(perplexity_bars(per_model, plan.languages), tmp / "perplexity.png")
        with atomic_file(report_path, "w", encoding="utf-8") as fh:
            fh.write(report + "\n")
        write_json(metrics_path, metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xlm evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="data/model", type=Path)
    parser.add_argument("--shards", default="data/shards", type=Path, help="its test/ split is scored")
    parser.add_argument("--checkpoints", default="data/checkpoints", type=Path,
                        help="the newest one gives the language discriminator")
    parser.add_argument("--metrics", default="metrics/eval.json", type=Path)
    parser.add_argument("--report", default="reports/eval.md", type=Path)
    parser.add_argument("--plots", default="reports/eval", type=Path)
    args = parser.parse_args(argv)
    return run_cli("evaluate", lambda: evaluate(load_params("evaluate", args.params), args.model, args.shards,
                                                args.checkpoints, args.metrics, args.report, args.plots))


if __name__ == "__main__":
    sys.exit(main())
