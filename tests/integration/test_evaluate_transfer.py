"""evaluate stage: the out-of-domain suites (data/clean/eval/suites.parquet), the zero-shot Bible-genre probe and the
freshly fitted language-ID probe, on a real tiny run whose segment ids are Bible verse ids."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tests.helpers.corpora import sentence
from tests.helpers.model_runs import LANGS, build_run, set_section

from pipeline.errors import PipelineError
from pipeline.evaluate import build_model, evaluate, make_plan
from pipeline.params import load_params
from xlm_core.evaluation.bible_genres import GENRES, book_of, genre_of
from xlm_core.evaluation.probes import ProbePlan, _genre_task, score_probes
from xlm_core.evaluation.suite_file import TextSuite, write_suites
from xlm_core.metrics import bitext_retrieval, center, pooled_embeddings, train_linear_probe
from xlm_core.model_config import default_layer
from xlm_core.model_dir import load_model_dir

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bible_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    return root, build_run(root, bible_ids=True)


def write_django(path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """A suite file like clean's: suite django, en-fr (20 pairs) and en-ru (15, whose English is en-fr's first 15),
    plus two entries evaluate must leave out (a language outside params.yaml languages, another domain)."""
    rng = random.Random(5)
    en = [sentence("en", rng) for _ in range(20)]
    pairs = {"en-fr": (en, [sentence("fr", rng) for _ in range(20)]),
             "en-ru": (en[:15], [sentence("ru", rng) for _ in range(15)])}
    ids = [f"msg{i:03d}" for i in range(20)]
    suites = [TextSuite("django", "out_of_domain", *pair.split("-"), ids[:len(src)], src, tgt)
              for pair, (src, tgt) in pairs.items()]
    suites += [TextSuite("django", "out_of_domain", "en", "de", ids[:3], en[:3], ["Hallo Welt"] * 3),
               TextSuite("news", "in_domain", "en", "fr", ids[:3], en[:3], pairs["en-fr"][1][:3])]
    write_suites(path, suites)
    return pairs


def run_evaluate(root: Path, params_path: Path, suites: Path | None, out: Path) -> dict:
    return evaluate(load_params("evaluate", params_path), root / "model", root / "shards", out / "eval.json",
                    out / "eval.md", out / "plots", suites)


def _models(root: Path, params_path: Path):
    seed = load_params("evaluate", params_path).evaluate.seed
    folder = load_model_dir(root / "model")
    return folder, {"trained": build_model(folder.config, folder.state, seed, CPU, folder.path),
                    "baseline": build_model(folder.config, None, seed, CPU, folder.path)}


# ---------------------------------------------------------------------------------------------- the genre table
def test_bible_ids_map_to_the_six_genres_at_their_boundaries():
    assert [genre_of(f"bible:{b:03d}.001.001") for b in (1, 5, 6, 17, 18, 22, 23, 39, 40, 44, 45, 66)] == [
        g for g in GENRES for _ in (0, 1)]
    assert book_of("019.023.001") == 19 and book_of("src:with:colons:043.003.016") == 43   # prefix optional
    for not_a_verse in ("fixture:test.000001", "bible:067.001.001", "bible:000.001.001", "bible:1.1.1",
                        "bible:001.001.001x"):
        assert genre_of(not_a_verse) is None


# ------------------------------------------------------------------------------------------------- out of domain
def test_out_of_domain_section_matches_a_direct_computation(bible_run, tmp_path):
    root, params_path = bible_run
    suites = tmp_path / "suites.parquet"
    pairs = write_django(suites)
    metrics = run_evaluate(root, params_path, suites, tmp_path)
    ood = metrics["out_of_domain"]
    assert set(ood) == {"suites", "mean"} and set(ood["suites"]) == {"django"}   # news (in_domain) left out
    django = ood["suites"]["django"]
    assert set(django["directions"]) == {"en-fr", "fr-en", "en-ru", "ru-en"}     # en-de left out (no de)
    assert django["directions"]["en-fr"]["n"] == 20 and django["directions"]["ru-en"]["n"] == 15

    # the same machinery by hand: layer evaluate.layer (null: the middle one), each side of a pair centred on that
    # pair's own sentences (English of en-ru: its 15, not the 20 of en-fr they are part of), cosine top-1 both ways
    folder, models = _models(root, params_path)
    layer = default_layer(folder.config.n_layers)
    tok = folder.tokenizer
    for name, model in models.items():
        def vectors(texts, model=model):
            return center(pooled_embeddings(model, tok.encode_batch(texts), 0, layer, 64, 16, CPU))
        pair_means = []
        for pair, (src, tgt) in pairs.items():
            result = bitext_retrieval(vectors(src), vectors(tgt), "cosine")
            back = f"{pair[3:]}-en"
            assert django["directions"][pair][name] == pytest.approx(result.forward, rel=1e-5)
            assert django["directions"][back][name] == pytest.approx(result.backward, rel=1e-5)
            pair_means.append((result.forward + result.backward) / 2)
            assert django["pairs"][pair][name] == pytest.approx(pair_means[-1], rel=1e-5)
        assert django["mean"][name] == pytest.approx(sum(pair_means) / 2, rel=1e-5)
        assert ood["mean"][name] == pytest.approx(sum(pair_means) / 2, rel=1e-5)
        assert metrics["in_domain"]["retrieval_mean"][name] == metrics["retrieval_accuracy"]["mean"][name]

    report = (tmp_path / "eval.md").read_text()
    # the headline comes first, after the warnings a run that looks broken gets (this random-init one does)
    sections = [line for line in report.splitlines() if line.startswith("## ") and line != "## Warnings"]
    assert sections[0].startswith("## Headline: bitext retrieval out of domain vs in domain")
    assert sections[1] == "## Out-of-domain retrieval per pair"
    headline = report.split("## Out-of-domain")[0]
    assert f"**{ood['mean']['trained']:.3f}**" in headline and "in-domain (test split)" in headline
    assert "| django | en-ru |" in report
    assert "suite django:en-de: a language outside params.yaml languages" in report


def test_evaluate_without_a_suite_file_says_so(bible_run, tmp_path):
    root, params_path = bible_run
    for case, suites in (("missing", tmp_path / "absent.parquet"), ("empty", tmp_path / "empty.parquet")):
        if case == "empty":
            write_suites(suites, [])
        out = tmp_path / case
        metrics = run_evaluate(root, params_path, suites, out)
        assert set(metrics["out_of_domain"]) == {"note"}
        note = metrics["out_of_domain"]["note"]
        assert note.startswith("no out-of-domain suite")
        assert ("does not exist" if case == "missing" else "no rows") in note
        assert metrics["retrieval_accuracy"]["mean"]["trained"] >= 0         # the rest is all there
        assert note in (out / "eval.md").read_text()
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(PipelineError) as info:
        run_evaluate(root, params_path, tmp_path / "bad.parquet", tmp_path / "bad")
    assert "bad.parquet: not a readable suite file" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------- the probes
def test_genre_probe_halves_share_no_verse_are_balanced_and_match_a_direct_fit(bible_run, tmp_path):
    root, params_path = bible_run
    params = load_params("evaluate", params_path)
    folder, models = _models(root, params_path)
    plan, _notes = make_plan(params, folder, root / "shards")
    probes = plan.probes
    genre = probes.genre
    assert genre is not None and genre.classes == list(GENRES) and list(genre.train) == ["en"]
    train_ids = {probes.ids["en"][i] for i, _y in genre.train["en"]}
    test_ids = {probes.ids[lang][i] for lang, rows in genre.test.items() for i, _y in rows}
    assert train_ids and test_ids and not train_ids & test_ids             # no verse in both halves, any language
    for rows in [genre.train["en"], *genre.test.values()]:
        per_class = Counter(y for _i, y in rows)
        assert set(per_class) == set(range(6)) and len(set(per_class.values())) == 1   # balanced: chance is 1/6
    for lang, rows in genre.test.items():                                  # the labels are the ids' genres
        assert all(GENRES[y] == genre_of(probes.ids[lang][i]) for i, y in rows)
    # the same verse is in the same half in every language
    half = {}
    for lang in LANGS:
        for seg_id, in_a in zip(probes.ids[lang], probes.half_a[lang]):
            assert half.setdefault(seg_id, in_a) == in_a

    metrics = run_evaluate(root, params_path, None, tmp_path)
    figures = metrics["genre"]
    assert figures["chance"] == pytest.approx(1 / 6, abs=1e-6) and figures["train_lang"] == "en"
    assert figures["n_train"] == len(genre.train["en"])
    assert figures["n_test"] == {lang: len(rows) for lang, rows in genre.test.items()}
    assert set(figures["accuracy"]) == set(LANGS) and set(figures["gap_to_en"]) == set(LANGS) - {"en"}
    # the probe by hand: English half-A pooled vectors at evaluate.layer, not centred; every language's half B
    probe_settings = params.evaluate.probe
    for name, model in models.items():
        feats = {lang: pooled_embeddings(model, probes.tokens[lang], 0, plan.layer, 64, 16, CPU) for lang in LANGS}
        x = feats["en"][[i for i, _y in genre.train["en"]]]
        y = torch.tensor([y for _i, y in genre.train["en"]])
        probe = train_linear_probe(x, y, GENRES, probe_settings.l2, probe_settings.steps, params.evaluate.seed,
                                   probe_settings.lr)
        accuracy = {lang: probe.accuracy(feats[lang][[i for i, _y in rows]], torch.tensor([y for _i, y in rows]))
                    for lang, rows in genre.test.items()}
        for lang in LANGS:
            assert figures["accuracy"][lang][name] == pytest.approx(accuracy[lang], rel=1e-5)
        for lang in set(LANGS) - {"en"}:
            assert figures["gap_to_en"][lang][name] == pytest.approx(accuracy["en"] - accuracy[lang], abs=1e-6)
        mean = sum(accuracy[k] for k in LANGS if k != "en") / 3
        assert figures["mean_non_en"][name] == pytest.approx(mean, rel=1e-5)
    assert "Zero-shot genre classification" in (tmp_path / "eval.md").read_text()

    # another seed, another split: still disjoint
    set_section(params_path, "evaluate", seed=99)
    try:
        other = make_plan(load_params("evaluate", params_path), folder, root / "shards")[0].probes
    finally:
        set_section(params_path, "evaluate", seed=params.evaluate.seed)
    assert other.half_a != probes.half_a
    a = {other.ids["en"][i] for i, _y in other.genre.train["en"]}
    assert not a & {other.ids[k][i] for k, rows in other.genre.test.items() for i, _y in rows}


def test_a_language_whose_half_b_lacks_a_genre_is_named_in_a_note():
    # one verse per (genre, half) in en and ar; fr's half B has no letters_revelation verse, ru's none of law/history
    books = dict(zip(GENRES, (1, 6, 18, 23, 40, 45)))
    plan = ProbePlan({}, {}, {}, 1, None, None, None)
    for lang, absent in (("en", ()), ("fr", ("letters_revelation",)), ("ru", ("law", "history")), ("ar", ())):
        rows = [(f"bible:{books[g]:03d}.001.{v:03d}", v == 1) for g in GENRES for v in (1, 2)
                if v == 1 or g not in absent]
        plan.ids[lang], plan.half_a[lang] = [r[0] for r in rows], [r[1] for r in rows]
        plan.tokens[lang] = [np.array([5, 6]) for _ in rows]
    task, note = _genre_task(plan, LANGS)
    assert note is None and sorted(task.test) == ["ar", "en"]
    assert task.notes == ["fr: not in the genre figures, its half B has no verse of letters_revelation",
                          "ru: not in the genre figures, its half B has no verse of law, history"]
    plan.genre = task
    settings = SimpleNamespace(seed=0, probe=SimpleNamespace(l2=1e-3, steps=5, lr=0.05))
    figures, counts = score_probes(lambda tokens, lang, layer: torch.randn(len(tokens), 8), plan, settings)
    assert counts[("genre", "notes")] == "; ".join(task.notes)          # in eval.json's genre section
    assert {key[2] for key in figures if key[:2] == ("genre", "accuracy")} == {"en", "ar"}


def test_language_id_probe_for_both_models_at_both_layers(bible_run, tmp_path):
    root, params_path = bible_run
    set_section(params_path, "evaluate", layer=0)          # the discriminator reads layer 1: both are probed
    try:
        params = load_params("evaluate", params_path)
        folder, models = _models(root, params_path)
        plan = make_plan(params, folder, root / "shards")[0]
        metrics = run_evaluate(root, params_path, None, tmp_path)
    finally:
        set_section(params_path, "evaluate", layer=None)
    lid = metrics["language_id_probe"]
    task = plan.probes.language_id
    assert task.classes == LANGS and lid["chance"] == 0.25 and lid["layer"] == 0
    per_language = {len(rows) for rows in task.train.values()} | {len(rows) for rows in task.test.values()}
    assert len({len(rows) for rows in task.train.values()}) == 1 and len({len(r) for r in task.test.values()}) == 1
    assert lid["n_train"] == 4 * len(task.train["en"]) and lid["n_test"] == 4 * len(task.test["en"])
    assert min(per_language) > 5
    assert lid["at_discriminator_layer"]["layer"] == 1
    for name, model in models.items():
        for layer, figure in ((0, lid["accuracy"]), (1, lid["at_discriminator_layer"]["accuracy"])):
            feats = {lang: pooled_embeddings(model, plan.probes.tokens[lang], 0, layer, 64, 16, CPU)
                     for lang in LANGS}   # uncentred: centring would remove the language identity measured

            def stack(rows, feats=feats):
                return (torch.cat([feats[lang][[i for i, _y in r]] for lang, r in rows.items()]),
                        torch.tensor([y for r in rows.values() for _i, y in r]))
            probe = train_linear_probe(*stack(task.train), LANGS, params.evaluate.probe.l2,
                                       params.evaluate.probe.steps, params.evaluate.seed, params.evaluate.probe.lr)
            assert figure[name] == pytest.approx(probe.accuracy(*stack(task.test)), rel=1e-5)
    assert metrics["discriminator_accuracy"]["trained"] >= 0            # the old key stays
    report = (tmp_path / "eval.md").read_text()
    assert report.index("freshly fitted language-ID probe") < report.index("Co-trained language discriminator")
    assert "layer 1 (the discriminator's)" in report


def test_genre_is_skipped_with_a_note_when_ids_are_not_verses(tmp_path):
    params_path = build_run(tmp_path, adversarial=False)
    metrics = run_evaluate(tmp_path, params_path, None, tmp_path / "out")
    assert metrics["genre"] == {"note": "the test split's ids are not Bible verse ids (BBB.CCC.VVV): no genre labels"}
    assert set(metrics["language_id_probe"]["accuracy"]) == {"trained", "baseline"}
    assert "at_discriminator_layer" not in metrics["language_id_probe"]       # no discriminator
    assert "genre: not measured" in (tmp_path / "out" / "eval.md").read_text()
    json.dumps(metrics)                                                       # eval.json stays plain JSON
