"""The `evaluate` stage: score data/model on the test shards, beside the floor of a randomly initialised twin.

    MLM accuracy/perplexity per language (beside the unigram floor: the best context-free guess at the same
    targets) and TLM per pair (fixed-seed masks), CLM perplexity when the model was trained causally, the language
    discriminator's accuracy when adversarial training was on, bitext retrieval for every configured pair (XTREME's
    Tatoeba protocol: mean-pooled layer `evaluate.layer`, cosine or ratio-margin nearest neighbour, top-1 both ways;
    with `center`, each side of a pair first loses its mean vector over that pair's own sentences, for the test
    split's pairs and every suite alike), the out-of-domain suites of data/clean/eval/suites.parquet
    scored exactly so (the headline figure: the test split is the training domain), a freshly fitted language-ID
    probe and the zero-shot Bible-genre probe on the test split (xlm_core.evaluation.probes), and the user's suites
    from params.yaml (retrieval on line-aligned files; zero-shot classification with a linear probe trained on one
    language).

Outputs (each written atomically): metrics/eval.json (`dvc metrics show`: metric -> language/pair ->
{trained, baseline, unigram}), reports/eval/*.json (`dvc plots show` data), reports/eval/*.png and reports/eval.md.
Everything the run needs is validated before any output is touched. What is scored comes from
xlm_core.evaluation (the plan and the scoring), the model from the model folder (xlm_core.model_dir: the encoder,
the discriminator when there is one, the objectives it was trained with); the outputs from pipeline.eval_report.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.errors import PipelineError, disk_full_is_an_error, run_cli
from pipeline.eval_report import write_outputs
from pipeline.eval_suites import load_classification_suite, load_out_of_domain, load_retrieval_suite
from pipeline.params import StageParams, load_params
from pipeline.summary import read_pretrain_metrics, summarise
from xlm_core.evaluation.inputs import EvalPlan, read_bitexts
from xlm_core.evaluation.probes import probe_plan
from xlm_core.evaluation.scoring import Figures, score_model, unigram_floor
from xlm_core.model_config import default_layer
from xlm_core.model import XLMModel
from xlm_core.model_config import ModelConfig
from xlm_core.model_dir import CONFIG, DISCRIMINATOR, FIX, WEIGHTS, ModelDir, load_model_dir
from xlm_core.adversary import LanguageDiscriminator
from xlm_core.atomic import write_json
from xlm_core.shards import ShardSet
from xlm_core.train.runtime import device_type

def build_model(config: ModelConfig, state: Optional[dict[str, torch.Tensor]], seed: int, device: torch.device,
                folder: Path) -> XLMModel:
    """The trained model (``state``), or with ``state=None`` the baseline: the same config, initialised from ``seed``."""
    torch.manual_seed(seed)
    model = XLMModel(config)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise PipelineError(f"{folder / WEIGHTS} does not fit its {CONFIG} ({str(exc)[:200]}); {FIX}") from None
    return model.to(device).eval()


def build_discriminator(state: dict[str, torch.Tensor], d_model: int, n_languages: int, trained: bool, seed: int,
                        device: torch.device, folder: Path) -> LanguageDiscriminator:
    """The trained discriminator (``trained``), or the baseline's: the same shape, initialised from ``seed + 1``."""
    try:
        hidden = state["net.0.weight"].shape[0]
        torch.manual_seed(seed + 1)
        disc = LanguageDiscriminator(d_model, n_languages, hidden)
        if trained:
            disc.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError) as exc:
        raise PipelineError(f"{folder / DISCRIMINATOR} does not fit the model ({str(exc)[:200]}); {FIX}") from None
    return disc.to(device).eval()


SUITES = Path("data/clean/eval/suites.parquet")   # the clean stage's (xlm_core.evaluation.suite_file); a dvc.yaml dep


def make_plan(params: StageParams, model: ModelDir, shards_dir: Path, suites_path: Optional[Path] = None
              ) -> tuple[EvalPlan, list[str]]:
    """What both models are scored on, and the report's notes on what is left out and why."""
    ev = params.evaluate
    unknown = [lang for lang in params.languages if lang not in model.languages]
    if unknown:
        raise PipelineError(f"params.yaml: languages lists {unknown}, which data/model was not trained on "
                            f"({model.languages}); {FIX}")
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
    shards = ShardSet(test_dir, tokenizer=model.tokenizer)
    bitexts = read_bitexts(test_dir, model.tokenizer, pairs, ev.max_retrieval_pairs)
    notes = []
    languages = [lang for lang in params.languages if int(shards.languages.get(lang, {}).get("tokens", 0)) > 0]
    if not languages:
        raise PipelineError(f"{test_dir}: the test split holds no text in any language (clean.split.test = 0?); "
                            f"evaluate scores the test split: set clean.split.test > 0 in params.yaml (e.g. 0.02) "
                            f"and rerun `dvc repro`")
    if len(languages) < len(params.languages):
        notes.append(f"no test text for {sorted(set(params.languages) - set(languages))}: no LM figures for them")
    kept_pairs = [pair for pair in pairs if int(shards.pairs.get(pair, {}).get("tokens", 0)) > 0]
    if len(kept_pairs) < len(pairs):
        notes.append(f"no test pairs for {sorted(set(pairs) - set(kept_pairs))}: no TLM/retrieval figures for them")
    bitexts = {pair: b for pair, b in bitexts.items() if len(b.ids) >= 2}
    retrieval = [load_retrieval_suite(s, i, model) for i, s in enumerate(ev.retrieval)]
    classification = [load_classification_suite(s, i, model) for i, s in enumerate(ev.classification)]
    objectives = (model.training.get("pretrain") or {}).get("objectives") or {}
    clm = model.config.causal or float(objectives.get("clm", 0)) > 0
    discriminator_layer = None
    if model.discriminator is not None:
        recorded = model.training.get("discriminator_layer")
        discriminator_layer = int(recorded) if recorded is not None else default_layer(n_layers)
    else:
        notes.append("language discriminator: adversarial training was off (no discriminator)")
    ood, ood_notes, no_ood = load_out_of_domain(suites_path, model, list(params.languages), ev.max_retrieval_pairs)
    notes += ood_notes + ([no_ood] if no_ood else [])
    probes = probe_plan(test_dir, model.tokenizer, languages, ev.max_probe_sentences, ev.seed, layer,
                        discriminator_layer)
    notes += [f"{task}: not measured ({why})" for task, why in probes.notes.items()]
    notes += [f"genre: {note}" for note in (probes.genre.notes if probes.genre is not None else [])]
    if model.config.use_lang_emb:
        notes.append("language-ID probe: the model has language embeddings, so its input names the language")
    notes.append("MLM/TLM targets: {:.0%} of the pieces of each test block, all replaced by <mask>, with masks "
                 "fixed by evaluate.seed; at most {} batches of {} per language or pair."
                 .format(ev.mask_rate, ev.max_batches or "all", ev.batch_size))
    plan = EvalPlan(test_dir=test_dir, tokenizer=model.tokenizer, model_languages=model.languages,
                    languages=languages, pairs=kept_pairs, bitexts=bitexts, retrieval_suites=retrieval,
                    classification_suites=classification, layer=layer, clm=clm,
                    discriminator_layer=discriminator_layer, out_of_domain=ood, out_of_domain_note=no_ood,
                    probes=probes)
    return plan, notes


class _Bar:
    """scoring's progress on a tqdm bar: the running job in the postfix, one tick per finished job."""

    def __init__(self, bar):
        self.bar = bar

    def start(self, job: str) -> None:
        self.bar.set_postfix_str(job)

    def done(self) -> None:
        self.bar.update(1)


def evaluate(params: StageParams, model_dir: Path, shards_dir: Path, metrics_path: Path, report_path: Path,
             plots_dir: Path, suites_path: Optional[Path] = None, summary_path: Optional[Path] = None,
             pretrain_metrics_path: Optional[Path] = None) -> dict[str, Any]:
    """Score the trained model and its baseline; write eval.json, the report, the plots and (``summary_path``) the
    headline summary.json, whose pace figures come from ``pretrain_metrics_path``."""
    from tqdm import tqdm

    ev = params.evaluate
    if ev.threads:
        torch.set_num_threads(ev.threads)
    device = torch.device(device_type(ev.device, nproc=1, section="evaluate"))
    # Validate everything (model, shards, suites) before computing or touching any output.
    folder = load_model_dir(model_dir)
    plan, notes = make_plan(params, folder, shards_dir, suites_path)

    models = {"trained": build_model(folder.config, folder.state, ev.seed, device, folder.path)}
    if ev.baseline:
        models["baseline"] = build_model(folder.config, None, ev.seed, device, folder.path)
    discriminators: dict[str, Optional[LanguageDiscriminator]] = {name: None for name in models}
    if folder.discriminator is not None:
        for name in models:
            discriminators[name] = build_discriminator(folder.discriminator, folder.config.d_model,
                                                       len(folder.languages), name == "trained", ev.seed, device,
                                                       folder.path)
    jobs = (len(plan.languages) + len(plan.pairs) + 2 + len(plan.retrieval_suites) + len(plan.classification_suites)
            + 1)   # + 2: the test bitexts and the out-of-domain suites; + 1: the probes
    per_model: dict[str, Figures] = {}
    counts = {}
    for name, model in models.items():
        with tqdm(total=jobs, desc=f"evaluate {name}", unit="job", file=sys.stderr, dynamic_ncols=True) as bar:
            scores = score_model(model, discriminators[name], plan, ev, device, _Bar(bar))
        per_model[name], counts = scores.figures, scores.counts
    floor = unigram_floor(plan, ev, folder.config.vocab_size)
    with disk_full_is_an_error("evaluate", f"{plots_dir}, {report_path} or {metrics_path}",
                               outcome="each is whole, the previous or the new version; the rerun writes all of them"):
        metrics = write_outputs(per_model, counts, floor, plan, ev, folder.config, notes, metrics_path, report_path,
                                plots_dir)
        if summary_path is not None:
            pace = read_pretrain_metrics(pretrain_metrics_path) if pretrain_metrics_path is not None else {}
            write_json(summary_path, summarise(metrics, pace))
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xlm evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="data/model", type=Path)
    parser.add_argument("--shards", default="data/shards", type=Path, help="its test/ split is scored")
    parser.add_argument("--metrics", default="metrics/eval.json", type=Path)
    parser.add_argument("--report", default="reports/eval.md", type=Path)
    parser.add_argument("--plots", default="reports/eval", type=Path)
    parser.add_argument("--summary", default="metrics/summary.json", type=Path)
    parser.add_argument("--pretrain-metrics", default="metrics/pretrain.json", type=Path,
                        help="pretrain's metrics: the run's steps, tokens/s and minutes in the summary")
    parser.add_argument("--suites", default=SUITES, type=Path,
                        help="the clean stage's out-of-domain suites (missing: no out-of-domain figure)")
    args = parser.parse_args(argv)
    return run_cli("evaluate", lambda: evaluate(load_params("evaluate", args.params), args.model, args.shards,
                                                args.metrics, args.report, args.plots, args.suites,
                                                args.summary, args.pretrain_metrics))


if __name__ == "__main__":
    sys.exit(main())
