"""The evaluate stage's outputs: metrics/eval.json (`dvc metrics show`), reports/eval/*.json (`dvc plots show`) and
*.png, and the markdown report reports/eval.md. Figures arrive keyed by their eval.json path (xlm_core.evaluation).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

from xlm_core.atomic import atomic_dir, atomic_file, write_json
from xlm_core.evaluation.inputs import EvalPlan
from xlm_core.evaluation.scoring import Counts, Figures
from xlm_core.model_config import ModelConfig


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def assemble_metrics(per_model: dict[str, Figures], counts: Counts) -> dict[str, Any]:
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
        put(path, _round(value) if isinstance(value, float) else value)
    return out


def plot_rows(per_model: dict[str, Figures], metric: str, key_name: str, keys: list[str]) -> list[dict]:
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


def retrieval_heatmap(per_model: dict[str, Figures], languages: list[str], scoring: str):
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


def perplexity_bars(per_model: dict[str, Figures], languages: list[str]):
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
    measured = [v for name in names for v in (per_model[name].get(("mlm_perplexity", lang), np.nan)
                                               for lang in languages) if np.isfinite(v) and v > 0]
    if measured:   # a log axis needs one positive value; with none, the chart says so instead of failing
        ax.set_ylabel("MLM perplexity (test split, log scale)")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no perplexity measured", transform=ax.transAxes, ha="center", va="center")
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


def _retrieval_sections(cells, names: list[str], counts: Counts, plan: EvalPlan, ev) -> list[str]:
    """The headline (out-of-domain retrieval beside in-domain, trained vs baseline) and the out-of-domain pairs."""
    how = (f"top-1, {ev.scoring}{', languages centred' if ev.center else ''}, layer {plan.layer}, "
           "mean of both directions")
    suites = ", ".join(f"`{s.name}`" for s in plan.out_of_domain)
    n_pairs = sum(len(s.bitexts) for s in plan.out_of_domain)
    ood_what = (f"{suites}: {n_pairs} language pair(s) of text from outside the training domain" if suites
                else plan.out_of_domain_note or "no out-of-domain suite")
    lines = _table(f"Headline: bitext retrieval out of domain vs in domain ({how})", ["", *names, "scored on"],
                   [["**out-of-domain**", *[f"**{c}**" for c in cells(("out_of_domain", "mean"))], ood_what],
                    ["in-domain (test split)", *cells(("in_domain", "retrieval_mean")),
                     f"{len(plan.bitexts)} pair(s) of the training corpus's held-out test split"]])
    rows = []
    for suite in plan.out_of_domain:
        key = ("out_of_domain", "suites", suite.name)
        for pair, bitext in suite.bitexts.items():
            back = f"{bitext.tgt_lang}-{bitext.src_lang}"
            rows.append([suite.name, pair, *cells((*key, "pairs", pair)), *cells((*key, "directions", pair)),
                         *cells((*key, "directions", back)), str(counts.get((*key, "directions", pair, "n"), 0))])
        rows.append([suite.name, "**mean**", *cells((*key, "mean")), *["" for _ in names * 2], ""])
    return lines + _table("Out-of-domain retrieval per pair", [
        "suite", "pair", *[f"mean ({n})" for n in names], *[f"src → tgt ({n})" for n in names],
        *[f"tgt → src ({n})" for n in names], "candidates"], rows)


def _probe_sections(cells, names: list[str], counts: Counts, plan: EvalPlan) -> list[str]:
    """The freshly fitted language-ID probe and the zero-shot genre probe (xlm_core.evaluation.probes)."""
    lines: list[str] = []
    key = ("language_id_probe",)
    if (*key, "chance") in counts:
        rows = [[f"layer {counts[(*key, 'layer')]} (evaluate.layer)", *cells((*key, "accuracy"))]]
        if (*key, "at_discriminator_layer", "layer") in counts:
            rows.append([f"layer {counts[(*key, 'at_discriminator_layer', 'layer')]} (the discriminator's)",
                         *cells((*key, "at_discriminator_layer", "accuracy"))])
        rows.append(["chance", *[f"{counts[(*key, 'chance')]:.3f}" for _ in names]])
        lines += _table("Language identifiability: a freshly fitted language-ID probe (lower = more "
                        "language-neutral)", ["", *names], rows)
        lines += [f"Logistic regression on frozen, mean-pooled, uncentred test-split states: trained on half A of "
                  f"the segment ids ({counts[(*key, 'n_train')]} sentences), tested on half B "
                  f"({counts[(*key, 'n_test')]}), the same count per language. This, not the co-trained "
                  f"discriminator, says how much language identity the representation keeps.", ""]
    if ("genre", "chance") in counts:
        langs = [lang for lang in plan.languages if ("genre", "n_test", lang) in counts]
        rows = [[lang, *cells(("genre", "accuracy", lang)),
                 *(cells(("genre", "gap_to_en", lang)) if lang != "en" else ["" for _ in names]),
                 str(counts[("genre", "n_test", lang)])] for lang in langs]
        rows.append(["mean (non-English)", *cells(("genre", "mean_non_en")), *["" for _ in names], ""])
        rows.append(["chance", *[f"{counts[('genre', 'chance')]:.3f}" for _ in names], *["" for _ in names], ""])
        lines += _table(f"Zero-shot genre classification (6 Bible genres; probe trained on "
                        f"{counts[('genre', 'n_train')]} English verses of half A, tested on half B)",
                        ["language", *[f"accuracy ({n})" for n in names], *[f"gap to en ({n})" for n in names],
                         "verses"], rows)
    return lines


DISCRIMINATOR_TOO_GOOD = 0.95   # the co-trained discriminator's test accuracy above which the adversary failed


def report_warnings(per_model: dict[str, Figures], floor: Figures, languages: list[str]) -> list[str]:
    """What says the trained model looks broken, from its test figures: a co-trained discriminator (there is one
    only when the adversary was on) that still tells the languages apart, and a language whose MLM accuracy is at or
    below the unigram level's or whose perplexity is at or above it (no better than piece frequencies). The
    baseline is at that level by construction, so only "trained" is judged."""
    trained = per_model.get("trained", {})
    out = []
    accuracy = trained.get(("discriminator_accuracy",))
    if accuracy is not None and math.isfinite(accuracy) and accuracy >= DISCRIMINATOR_TOO_GOOD:
        out.append(f"the co-trained language discriminator tells the language of {accuracy:.1%} of the test "
                   f"sentences (≥ {DISCRIMINATOR_TOO_GOOD:.0%}) although the adversary was on: the encoder does not "
                   f"hide the language; raise pretrain.adversarial.lambda_max")
    for lang in languages:
        worse = []
        acc, floor_acc = trained.get(("mlm_accuracy", lang)), floor.get(("mlm_accuracy", lang))
        if acc is not None and floor_acc is not None and acc <= floor_acc:
            worse.append(f"accuracy {acc:.3f} ≤ unigram {floor_acc:.3f}")
        ppl, floor_ppl = trained.get(("mlm_perplexity", lang)), floor.get(("mlm_perplexity", lang))
        if ppl is not None and floor_ppl is not None and ppl >= floor_ppl:
            worse.append(f"perplexity {ppl:.4g} ≥ unigram {floor_ppl:.4g}")
        if worse:
            out.append(f"MLM on {lang} (test split) is at or below the unigram level ({', '.join(worse)}): the model "
                       f"does no better than piece frequencies on {lang}; train longer (pretrain.steps) or check the "
                       f"{lang} data")
    return out


def render_report(per_model: dict[str, Figures], counts: Counts, plan: EvalPlan, ev, config: ModelConfig,
                  plots_rel: str, floor: Optional[Figures] = None, notes: Optional[list[str]] = None,
                  warnings: Optional[list[str]] = None) -> str:
    """reports/eval.md: the warnings first, then a table per kind of figure, each model's column beside the floor,
    then the notes. ``warnings``: default ``report_warnings`` of these figures."""
    names = list(per_model)
    if warnings is None:
        warnings = report_warnings(per_model, floor or {}, plan.languages)

    def cells(metric_path: tuple, perplexity: bool = False) -> list[str]:
        return [_fmt(per_model[n].get(metric_path), perplexity) for n in names]

    lines = ["# Evaluation", "",
             f"Model: {config.n_layers} layers × {config.d_model} (vocabulary {config.vocab_size}), "
             f"{'causal' if config.causal else 'bidirectional'}. Test split: `{plan.test_dir}`. "
             + ("The baseline is the same architecture randomly initialised (seed "
                f"{ev.seed}): the floor of every figure." if "baseline" in names else ""), ""]
    if warnings:   # at the top: a run that looks broken should not be read for its figures first
        lines[1:1] = ["", "## Warnings", "", *[f"- **warning:** {w}" for w in warnings]]
    lines += _retrieval_sections(cells, names, counts, plan, ev)
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
    lines += _probe_sections(cells, names, counts, plan)
    if any(("discriminator_accuracy",) in per_model[n] for n in names):
        lines += _table("Co-trained language discriminator (its adversary's view only; the probe above is the "
                        "language-identifiability figure)", ["", *names],
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
    if notes:
        lines += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    return "\n".join(lines)


def write_outputs(per_model: dict[str, Figures], counts: Counts, floor: Figures, plan: EvalPlan, ev,
                  config: ModelConfig, notes: list[str], metrics_path: Path, report_path: Path,
                  plots_dir: Path, run_warnings: Optional[list[str]] = None) -> dict[str, Any]:
    """Write the plots folder, the report and eval.json (each atomically, in that order); return eval.json's dict.

    The report's warnings are ``run_warnings`` (the training run's, when the caller has them) and the model's own
    (``report_warnings``), each also a ``warning: [evaluate] ...`` line on stderr."""
    warnings = [*(run_warnings or []), *report_warnings(per_model, floor, plan.languages)]
    for warning in warnings:
        print(f"warning: [evaluate] {warning}", file=sys.stderr, flush=True)
    metrics = assemble_metrics({**per_model, "unigram": floor}, counts)
    in_pairs = {lang for b in plan.bitexts.values() for lang in (b.src_lang, b.tgt_lang)}
    heatmap_languages = [lang for lang in plan.model_languages if lang in in_pairs]
    plots_rel = Path(os.path.relpath(plots_dir.resolve(), report_path.parent.resolve())).as_posix()
    report = render_report(per_model, counts, plan, ev, config, plots_rel, floor, notes, warnings)
    with atomic_dir(plots_dir) as tmp:
        write_json(tmp / "perplexity.json", plot_rows(per_model, "mlm_perplexity", "language", plan.languages))
        write_json(tmp / "retrieval.json", plot_rows(per_model, "retrieval_accuracy", "direction", plan.directions()))
        save_png(retrieval_heatmap(per_model, heatmap_languages, ev.scoring), tmp / "retrieval.png")
        save_png(perplexity_bars(per_model, plan.languages), tmp / "perplexity.png")
    with atomic_file(report_path, "w", encoding="utf-8") as fh:
        fh.write(report + "\n")
    write_json(metrics_path, metrics)
    return metrics
