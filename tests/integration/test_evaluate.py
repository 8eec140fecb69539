"""evaluate stage and xlm_core.metrics: known-answer retrieval and probes, and the stage on a real tiny run
(real sentencepiece, Parquet shards, a model folder with a language discriminator, written by save_model_dir)."""
from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from tests.helpers.model_runs import LANGS, PAIRS, build_run, set_section
from tests.helpers.project import python_module, run

from pipeline.errors import PipelineError
from pipeline.eval_report import perplexity_bars, retrieval_heatmap, save_png
from pipeline.evaluate import evaluate
from pipeline.params import load_params
from xlm_core.data import iter_eval_batches
from xlm_core.evaluation.inputs import Bitext
from xlm_core.evaluation.scoring import retrieve
from xlm_core.metrics import (bitext_retrieval, center, eval_masking, masked_lm_score, pooled_embeddings, ratio_margin,
                              train_linear_probe, unigram_score)
from xlm_core.model import XLMModel
from xlm_core.model_config import ModelConfig
from xlm_core.masking import mask_tokens
from xlm_core.tokenizer import Tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------------ fixtures
def run_evaluate(root: Path, params_path: Path) -> dict:
    return evaluate(load_params("evaluate", params_path), root / "model", root / "shards",
                    root / "metrics" / "eval.json", root / "reports" / "eval.md", root / "reports" / "eval")


def refused_keeping_outputs(params: Path, model: Path, shards: Path, out: Path) -> str:
    """evaluate's one-line refusal; the previous eval.json beside it is untouched and nothing else is written."""
    out.mkdir()
    (out / "eval.json").write_text('{"previous": 1}\n')
    with pytest.raises(PipelineError) as info:
        evaluate(load_params("evaluate", params), model, shards, out / "eval.json", out / "eval.md", out / "plots")
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["eval.json"]
    assert (out / "eval.json").read_text() == '{"previous": 1}\n'
    return str(info.value)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    return root, build_run(root)


def write_suites(root: Path) -> tuple[list[dict], list[dict]]:
    """A retrieval suite (line-aligned en/fr files) and a classification suite (label<TAB>text per language)."""
    suites = root / "suites"
    suites.mkdir(exist_ok=True)
    en = ["The light of day.", "The king of the sea.", "A good night.", "The great city."]
    fr = ["La lumière du jour.", "Le roi de la mer.", "Une bonne nuit.", "La grande ville."]
    (suites / "bitext.en").write_text("\n".join(en) + "\n", encoding="utf-8")
    (suites / "bitext.fr").write_text("\n".join(fr) + "\n", encoding="utf-8")
    (suites / "topic.en.tsv").write_text("sea\tThe water of the sea.\nsea\tThe great sea.\n"
                                         "city\tThe house in the city.\ncity\tThe people of the city.\n",
                                         encoding="utf-8")
    (suites / "topic.ru.tsv").write_text("sea\tвода море.\ncity\tдом город.\n", encoding="utf-8")
    retrieval = [{"name": "mini_bitext", "src": str(suites / "bitext.en"), "tgt": str(suites / "bitext.fr"),
                  "src_lang": "en", "tgt_lang": "fr"}]
    classification = [{"name": "topics", "train_lang": "en",
                       "files": {"en": str(suites / "topic.en.tsv"), "ru": str(suites / "topic.ru.tsv")}}]
    return retrieval, classification


# --------------------------------------------------------------------------------------- metrics: known answers
def test_retrieval_finds_planted_translations_both_ways():
    torch.manual_seed(0)
    n, d = 50, 32
    src = torch.randn(n, d)
    perm = torch.randperm(n)
    tgt = torch.empty(n, d)
    tgt[perm] = src + 0.05 * torch.randn(n, d)       # tgt row perm[i] translates src row i
    aligned_tgt = tgt[perm]
    result = bitext_retrieval(src, aligned_tgt, "cosine")
    assert result.forward == result.backward == 1.0 and result.candidates == n
    # break three translations: exactly those queries fail
    broken = aligned_tgt.clone()
    broken[[3, 17, 41]] = torch.randn(3, d)
    result = bitext_retrieval(src, broken, "cosine")
    assert result.forward == pytest.approx(1 - 3 / n)
    wrong = set(torch.nonzero(result.forward_pred != torch.arange(n)).flatten().tolist())
    assert wrong == {3, 17, 41}


def test_margin_scoring_demotes_a_hub_that_cosine_picks():
    """A hub candidate closer to every query than their own translations wins under cosine; the ratio margin divides
    by its crowded neighbourhood and recovers every translation.

    Query i = 0.6·u + 0.8·e_i; its translation = 0.7·e_i + 0.71·v_i (cos 0.56); the hub = u (cos 0.6 to every query)
    is the translation of query 0. u, e_i, v_i are orthonormal.
    """
    n = 12
    eye = torch.eye(2 * n + 1)
    u, e, v = eye[0], eye[1:n + 1], eye[n + 1:]
    src = 0.6 * u + 0.8 * e
    tgt = 0.7 * e + (1 - 0.7 ** 2) ** 0.5 * v
    tgt[0] = u
    cosine = bitext_retrieval(src, tgt, "cosine")
    assert cosine.forward_pred.tolist() == [0] * n          # the hub wins every query
    assert cosine.forward == pytest.approx(1 / n)
    margin = bitext_retrieval(src, tgt, "margin", k=4)
    assert margin.forward == 1.0
    assert margin.forward_pred.tolist() == list(range(n))


def test_centering_each_language_removes_a_shared_language_offset():
    """Each side carries a large offset of its own language: under raw cosine the candidates that happen to lean
    towards the query language's offset win every query; centring each side on its own mean recovers them all."""
    torch.manual_seed(0)
    n, d = 40, 64
    meaning = torch.randn(n, d)
    offset_src, offset_tgt = 8 * torch.randn(d), 8 * torch.randn(d)
    src = meaning + offset_src
    tgt = meaning + 0.1 * torch.randn(n, d) + offset_tgt
    raw = bitext_retrieval(src, tgt, "cosine")
    centred = bitext_retrieval(center(src), center(tgt), "cosine")
    assert raw.forward < 0.5 and raw.backward < 0.5
    assert centred.forward == centred.backward == 1.0
    assert torch.allclose(center(src).mean(0), torch.zeros(d), atol=1e-4)


def test_retrieve_centres_each_side_of_a_pair_on_that_pair_alone():
    """The export's recipe: for a pair of collections, subtract each side's mean vector. en-fr and en-ru share the
    language en but not its sentences: centred on the union of both pairs' English, en-fr's two English vectors both
    lean away from one French translation; centred on en-fr's own English they are found."""
    table = {("en", 0): [10., 1.], ("en", 1): [10., -1.], ("en", 2): [10., 8.], ("en", 3): [10., 8.],
             ("fr", 0): [5., 6.], ("fr", 1): [5., 4.], ("ru", 2): [0., 1.], ("ru", 3): [0., -1.]}

    def embed(sentences, lang):
        return torch.tensor([table[(lang, int(s[0]))] for s in sentences])

    bitexts = {"en-fr": Bitext("en", "fr", ["a0", "a1"], [np.array([0]), np.array([1])],
                               [np.array([0]), np.array([1])]),
               "en-ru": Bitext("en", "ru", ["b2", "b3"], [np.array([2]), np.array([3])],
                               [np.array([2]), np.array([3])])}
    settings = SimpleNamespace(center=True, scoring="cosine", margin_k=4)
    got = retrieve(embed, bitexts, settings)
    assert got["en-fr"].forward == got["en-fr"].backward == 1.0
    for pair, bitext in bitexts.items():   # exactly what a user's retrieval suite gets: each side on its own mean
        src, tgt = embed(bitext.src, bitext.src_lang), embed(bitext.tgt, bitext.tgt_lang)
        alone = bitext_retrieval(center(src), center(tgt), "cosine")
        assert (got[pair].forward, got[pair].backward) == (alone.forward, alone.backward)


def test_ratio_margin_formula_on_a_small_matrix():
    sim = torch.tensor([[0.9, 0.5, 0.1], [0.4, 0.8, 0.2], [0.3, 0.6, 0.7]])
    got = ratio_margin(sim, k=2)
    row = torch.tensor([(0.9 + 0.5) / 2, (0.8 + 0.4) / 2, (0.7 + 0.6) / 2])
    col = torch.tensor([(0.9 + 0.4) / 2, (0.8 + 0.6) / 2, (0.7 + 0.2) / 2])
    expected = sim / ((row[:, None] + col[None, :]) / 2)
    assert torch.allclose(got, expected)


def test_linear_probe_transfers_on_a_separable_shifted_language():
    gen = torch.Generator().manual_seed(3)
    d, per_class = 16, 40
    centres = torch.randn(3, d, generator=gen) * 3
    x = torch.cat([c + 0.5 * torch.randn(per_class, d, generator=gen) for c in centres])
    y = torch.arange(3).repeat_interleave(per_class)
    probe = train_linear_probe(x, y, ["a", "b", "c"], l2=1e-3, steps=50, seed=0)
    assert probe.accuracy(x, y) == 1.0
    other = x + 0.3 * torch.randn(x.shape, generator=gen)       # "another language": same classes, noisier
    assert probe.accuracy(other, y) >= 0.95
    again = train_linear_probe(x, y, ["a", "b", "c"], l2=1e-3, steps=50, seed=0)
    assert torch.equal(again.linear.weight, probe.linear.weight)   # deterministic
    shuffled = y[torch.randperm(len(y), generator=gen)]
    assert train_linear_probe(x, shuffled, ["a", "b", "c"], steps=50).accuracy(other, y) < 0.6


def test_pooled_embeddings_match_the_full_forward_and_ignore_padding():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=100, dropout=0.0, attention_dropout=0.0)
    model = XLMModel(cfg).eval()
    sentences = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    got = pooled_embeddings(model, sentences, 0, layer=1, max_len=32, batch_size=2, device=torch.device("cpu"))
    for i, s in enumerate(sentences):   # one at a time: no padding at all
        ids = torch.tensor([[0, *s, 2]])
        with torch.no_grad():
            hidden = model(ids, return_layer=1).layer_hidden
        assert torch.allclose(got[i], hidden.mean(dim=1)[0], atol=1e-5)


def test_masked_lm_score_is_identical_across_reruns(tiny_run):
    root, _ = tiny_run
    tok = Tokenizer.load(root / "model")
    torch.manual_seed(0)
    model = XLMModel(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, n_languages=4, dropout=0.0)).eval()

    def score():
        batches = iter_eval_batches(root / "shards" / "test", LANGS, "mlm", "fr", 64, 8, max_batches=3, seed=5,
                                    tokenizer=tok)
        return masked_lm_score(model, batches, 0.15, torch.device("cpu"))[0]

    a, b = score(), score()
    assert a.targets > 20 and (a.loss_sum, a.correct, a.targets) == (b.loss_sum, b.correct, b.targets)
    assert 0 < a.perplexity < float("inf")


def test_unigram_floor_guesses_the_most_frequent_piece_at_the_models_targets():
    vocab = 40
    rows = torch.tensor([[10] * 12 + [11] * 6 + [12] * 2, [10] * 8 + [13] * 10 + [1] * 2])   # 1 = <pad>, never a target
    batches = [SimpleNamespace(input_ids=rows, chunk_seed=7)]
    floor = unigram_score(batches, vocab, 0.5)
    # the targets masked_lm_score would draw from the same seed
    masked = mask_tokens(rows, vocab, eval_masking(0.5), torch.Generator().manual_seed(7))
    p = {10: 20 / 38, 11: 6 / 38, 12: 2 / 38, 13: 10 / 38}
    assert floor.targets == masked.targets.numel() == 19
    assert floor.correct == int((masked.targets == 10).sum())
    expected = -sum(math.log(p[int(t)]) for t in masked.targets) / 19
    assert floor.loss == pytest.approx(expected)


def test_plots_have_labelled_axes():
    per_model = {"trained": {("retrieval_accuracy", "en-fr"): 0.8, ("retrieval_accuracy", "fr-en"): 0.7,
                             ("mlm_perplexity", "en"): 30.0, ("mlm_perplexity", "fr"): 40.0},
                 "baseline": {("retrieval_accuracy", "en-fr"): 0.1, ("retrieval_accuracy", "fr-en"): 0.05,
                              ("mlm_perplexity", "en"): 900.0, ("mlm_perplexity", "fr"): 950.0}}
    fig = retrieval_heatmap(per_model, ["en", "fr"], "cosine")
    for ax in fig.axes[:2]:
        assert ax.get_xlabel() == "target language (candidates)"
        assert ax.get_ylabel() == "source language (queries)"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["en", "fr"]
        assert {t.get_text() for t in ax.texts} >= {"0.80", "0.70"} or {t.get_text() for t in ax.texts} >= {"0.10"}
    fig = perplexity_bars(per_model, ["en", "fr"])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "language" and "perplexity" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["trained", "baseline"]


# ------------------------------------------------------------------------------------------------- the stage
def test_evaluate_writes_metrics_plots_and_report(tiny_run, tmp_path):
    root, params_path = tiny_run
    retrieval, classification = write_suites(root)
    set_section(params_path, "evaluate", retrieval=retrieval, classification=classification)
    metrics = run_evaluate(root, params_path)
    on_disk = json.loads((root / "metrics" / "eval.json").read_text())
    assert on_disk == metrics
    for lang in LANGS:
        figure = metrics["mlm_perplexity"][lang]
        assert set(figure) == {"trained", "baseline", "unigram"} and figure["trained"] > 1
        assert 0 <= metrics["mlm_accuracy"][lang]["trained"] <= 1
        assert 0 < metrics["mlm_accuracy"][lang]["unigram"] < 1 and 1 < figure["unigram"] < figure["baseline"]
        assert metrics["mlm_targets"][lang] > 0
    for pair in PAIRS:
        src, tgt = pair.split("-")
        assert set(metrics["tlm_accuracy"][pair]) == {"trained", "baseline"}
        for direction in (pair, f"{tgt}-{src}"):
            assert 0 <= metrics["retrieval_accuracy"][direction]["trained"] <= 1
        assert metrics["retrieval_candidates"][pair] == 30          # every test pair of the fixture
    assert "mean" in metrics["retrieval_accuracy"] and "mean" in metrics["mlm_accuracy"]
    assert 0 <= metrics["discriminator_accuracy"]["trained"] <= 1
    assert "clm_perplexity" not in metrics                             # not trained causally
    # no suite file given, fixture ids that are not verses: said so, and every other figure is there
    assert metrics["out_of_domain"] == {"note": "no out-of-domain suite (no suite file given)"}
    assert set(metrics["genre"]) == {"note"}
    assert metrics["in_domain"]["retrieval_mean"] == metrics["retrieval_accuracy"]["mean"]
    assert set(metrics["language_id_probe"]["accuracy"]) == {"trained", "baseline"}
    # user suites, under their names
    suite = metrics["suites"]["mini_bitext"]
    assert suite["candidates"] == 4 and set(suite["accuracy"]) == {"en-fr", "fr-en"}
    topics = metrics["suites"]["topics"]
    assert set(topics["accuracy"]) == {"ru", "mean"} and topics["examples"] == 6
    assert topics["train_accuracy"]["trained"] == 1.0                 # 4 points in 32 dims: separable
    # plots: DVC data files and PNGs
    plots = root / "reports" / "eval"
    rows = json.loads((plots / "perplexity.json").read_text())
    assert [r["language"] for r in rows] == LANGS and all({"trained", "baseline"} <= set(r) for r in rows)
    assert {r["direction"] for r in json.loads((plots / "retrieval.json").read_text())} == {
        "en-fr", "fr-en", "en-ru", "ru-en", "en-ar", "ar-en"}
    for png in ("retrieval.png", "perplexity.png"):
        data = (plots / png).read_bytes()
        assert data[:8] == PNG_MAGIC
        width, height = struct.unpack(">II", data[16:24])
        assert width > 300 and height > 200
    report = (root / "reports" / "eval.md").read_text()
    assert "](eval/retrieval.png)" in report and "](eval/perplexity.png)" in report
    assert "| en → fr |" in report and "mini_bitext" in report and "topics" in report
    assert "accuracy (unigram)" in report
    assert not list((root / "reports").glob("*.tmp-*")) and not list((root / "metrics").glob("*.tmp-*"))

    # reruns give the same figures (fixed-seed masks, deterministic probe)
    again = run_evaluate(root, params_path)
    assert again == metrics


def test_margin_scoring_and_no_baseline(tiny_run, tmp_path):
    root, params_path = tiny_run
    data = yaml.safe_load(params_path.read_text())
    data["evaluate"].update(scoring="margin", baseline=False, retrieval=[], classification=[], layer=0)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data))
    metrics = evaluate(load_params("evaluate", params), root / "model", root / "shards",
                       tmp_path / "eval.json", tmp_path / "eval.md", tmp_path / "plots")
    assert set(metrics["mlm_accuracy"]["en"]) == {"trained", "unigram"}
    assert "suites" not in metrics
    assert "margin" in (tmp_path / "eval.md").read_text()


def test_clm_figures_for_a_causal_run_and_no_discriminator(tmp_path):
    params_path = build_run(tmp_path, causal=True, adversarial=False, objectives={"clm": 1.0})
    metrics = run_evaluate(tmp_path, params_path)
    assert set(metrics["clm_perplexity"]["en"]) == {"trained", "baseline"}
    assert "discriminator_accuracy" not in metrics
    assert "adversarial training was off" in (tmp_path / "reports" / "eval.md").read_text()


def _cli(root: Path, params_path: Path):
    return run(python_module("pipeline.evaluate", "--params", str(params_path), "--model", str(root / "model"),
                             "--shards", str(root / "shards"),
                             "--metrics", str(root / "metrics" / "eval.json"),
                             "--report", str(root / "reports" / "eval.md"), "--plots", str(root / "reports" / "eval")),
               cwd=root, check=False)


@pytest.mark.parametrize("problem, fragments", [
    ("missing", ["nope.fr", "not found", "evaluate.retrieval[0].tgt"]),
    ("misaligned", ["bitext.en: 4 lines", "bitext.fr has 3", "line-aligned"]),
    ("no_tab", ["topic.ru.tsv:2", "no tab", "label<TAB>text"]),
    ("unknown_label", ["topic.ru.tsv:1", "'weather'", "does not occur"]),
    ("bad_utf8", ["topic.ru.tsv:2", "not valid UTF-8"]),
])
def test_bad_suite_is_one_clear_error_and_outputs_stay(tiny_run, tmp_path, problem, fragments):
    root, params_path = tiny_run
    retrieval, classification = write_suites(root)
    suites = tmp_path / "s"
    suites.mkdir()
    (suites / "bitext.en").write_text("a b.\nc d.\ne f.\n")
    (suites / "bitext.fr").write_text("a b.\nc d.\ne f.\n")
    (suites / "topic.ru.tsv").write_text("sea\tвода.\ncity\tдом.\n")
    retrieval[0]["tgt"], retrieval[0]["src"] = str(suites / "bitext.fr"), str(suites / "bitext.en")
    classification[0]["files"]["ru"] = str(suites / "topic.ru.tsv")
    if problem == "missing":
        retrieval[0]["tgt"] = str(suites / "nope.fr")
    elif problem == "misaligned":
        (suites / "bitext.en").write_text("a b.\nc d.\ne f.\ng h.\n")
    elif problem == "no_tab":
        (suites / "topic.ru.tsv").write_text("sea\tвода.\ncity дом.\n")
    elif problem == "unknown_label":
        (suites / "topic.ru.tsv").write_text("weather\tвода.\n")
    elif problem == "bad_utf8":
        (suites / "topic.ru.tsv").write_bytes("sea\tвода.\n".encode() + b"city\t\xff\xfe\n")
    data = yaml.safe_load(params_path.read_text())
    data["evaluate"].update(retrieval=retrieval, classification=classification)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data, allow_unicode=True))
    message = refused_keeping_outputs(params, root / "model", root / "shards", tmp_path / "out")
    for fragment in fragments:
        assert fragment in message


def test_cli_reports_errors_in_one_line(tiny_run, tmp_path):
    root, params_path = tiny_run
    data = yaml.safe_load(params_path.read_text())
    data["evaluate"].update(layer=9, retrieval=[], classification=[])
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data))
    proc = _cli(root, params)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: [evaluate] ") and "evaluate.layer = 9" in lines[-1]
    assert "layers 0..2" in lines[-1]
    data["evaluate"]["scoring"] = "euclid"
    params.write_text(yaml.safe_dump(data))
    proc = _cli(root, params)
    assert proc.returncode == 2 and "evaluate.scoring" in proc.stderr and "cosine" in proc.stderr


def test_an_empty_test_split_is_one_line_and_outputs_stay(tiny_run, tmp_path):
    """clean.split.test = 0 leaves data/shards/test without text: evaluate says so, before writing anything."""
    import pyarrow.parquet as pq
    from pipeline.shard import make_shards

    root, params_path = tiny_run
    clean = tmp_path / "clean"
    shutil.copytree(root / "clean", clean)
    for path in clean.glob("*/test.parquet"):     # what clean writes with split.test = 0: empty test files
        table = pq.read_table(path)
        pq.write_table(table.slice(0, 0), path)
    make_shards(load_params("shard", params_path), clean, root / "tokenizer", tmp_path / "shards",
                tmp_path / "shard.json")
    message = refused_keeping_outputs(params_path, root / "model", tmp_path / "shards", tmp_path / "out")
    assert "the test split holds no text in any language" in message and "clean.split.test > 0" in message


def test_the_perplexity_chart_survives_languages_without_figures(tmp_path):
    """No positive perplexity at all (nothing measured): no log axis, a note on the chart, and the PNG is written."""
    per_model = {"trained": {("mlm_perplexity", "en"): float("nan")}, "baseline": {}}
    fig = perplexity_bars(per_model, ["en", "fr"])
    assert fig.axes[0].get_yscale() == "linear"
    assert "no perplexity measured" in {t.get_text() for t in fig.axes[0].texts}
    save_png(fig, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes().startswith(PNG_MAGIC)
