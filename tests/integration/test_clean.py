"""The clean stage on small raw fixtures written by hand per docs/data-layout.md; real Parquet, sqlite and DVC."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.corpora import EN, RU, bible, verse_id, write_clean_stage_params, write_source
from tests.helpers.project import dvc, project_env, python_module, run, write_params
from pipeline.clean import clean
from pipeline.errors import PipelineError
from pipeline.params import load_params
from xlm_core import text as text_mod
from xlm_core.cleaning.split import SPLITS, salt_key, split_of
from xlm_core.text import normalize_text, ratio_length, script_fraction, script_fractions, strip_html, text_key

SALT = "xlm-pipeline"


# ---------------------------------------------------------------------------------------------------- fixtures
def params_for(tmp_path: Path, languages, pairs=(), **clean_overrides):
    path = write_clean_stage_params(tmp_path / "params.yaml", languages, pairs, **clean_overrides)
    return load_params("clean", path)


def run_clean(tmp_path: Path, params, raw: Path, name: str = "clean") -> tuple[dict, Path]:
    out = tmp_path / name
    metrics = clean(params, raw, out, tmp_path / f"{name}-metrics.json")
    return metrics, out


def mono(out: Path) -> dict[str, list[dict]]:
    return {split: pq.read_table(out / "mono" / f"{split}.parquet").to_pylist() for split in SPLITS}


def para(out: Path) -> dict[str, list[dict]]:
    return {split: pq.read_table(out / "para" / f"{split}.parquet").to_pylist() for split in SPLITS}


def kept_texts(out: Path, lang: str) -> dict[str, str]:
    """id -> text of every mono row of ``lang``, all splits."""
    return {r["id"]: r["text"] for rows in mono(out).values() for r in rows if r["lang"] == lang}


def split_named(seg_id: str, valid=0.2, test=0.2, salt=SALT) -> str:
    return SPLITS[split_of(seg_id, salt_key(salt), valid, test)]


def ids_in(split: str, source: str, n: int, count: int) -> list[str]:
    """The first ``count`` line ids ``<source>:<line>`` (line <= n) that the split function puts in ``split``."""
    found = [f"{source}:{i:09d}" for i in range(1, n + 1) if split_named(f"{source}:{i:09d}") == split][:count]
    assert len(found) == count
    return found


# ------------------------------------------------------------------------------------------ normalisation (unit)
def test_normalize_nfc_and_nfkc():
    decomposed = "Cafe\u0301 ﬁne ｆｕｌｌ ①"
    assert normalize_text(decomposed, "NFC") == "Café ﬁne ｆｕｌｌ ①"  # composed; compatibility forms kept
    assert normalize_text(decomposed, "NFKC") == "Café fine full 1"


def test_normalize_strips_controls_and_zero_width_but_keeps_meaningful_joiners():
    assert normalize_text("a\x00b\x07c\x1bd") == "abcd"  # C0 controls out
    assert normalize_text("tab\there\x0bnext\x85line\u2028end") == "tab here next line end"  # space-like -> space
    assert normalize_text("\ufeffzero\u200bwidth\u200e mark\u202b \u2060x\u00ad") == "zerowidth mark x"
    persian = "می\u200cخواهم"  # ZWNJ inside a Persian word changes its spelling: kept
    assert normalize_text(persian) == persian
    devanagari = "क्\u200dष"  # ZWJ requests a half form: kept
    assert normalize_text(devanagari) == devanagari
    assert normalize_text("\u200cedge\u200d and \u200c lone") == "edge and lone"  # at an edge or beside a space: out


def test_normalize_collapses_all_unicode_whitespace():
    assert normalize_text("  one\u00a0\u00a0two\u3000three \n\r four  ") == "one two three four"


def test_strip_html():
    assert strip_html("<p>Hello <b>W</b>orld</p><br/>again") == " Hello World  again"
    assert normalize_text("<div>x</div><div>y</div> &amp; &eacute;t&#233; <!-- note --> z") == "x y & été z"
    assert normalize_text("a &lt;b&gt; c") == "a <b> c"  # escaped markup is text, not a tag
    assert normalize_text("3 < 4 and 5 > 2") == "3 < 4 and 5 > 2"  # not a tag
    assert normalize_text("<b>kept</b> &amp;", remove_html=False) == "<b>kept</b> &amp;"


def test_script_fraction():
    cyr, latin, arab, han = ("CYRILLIC",), ("LATIN",), ("ARABIC",), ("CJK",)
    assert script_fraction("Привет, мир!", cyr) == 1.0
    assert script_fraction("Москва is big", cyr) == pytest.approx(6 / 11)
    assert script_fraction("مرحبا بالعالم 123", arab) == 1.0
    assert script_fraction("你好，世界", han) == 1.0
    assert script_fraction("hello 你好", han) == pytest.approx(2 / 7)
    assert script_fraction("Hello", cyr) == 0.0
    assert script_fraction("12345 !!!", latin) == 0.0  # no letters at all
    assert text_mod.expected_scripts("ja") == ("CJK", "HIRAGANA", "KATAKANA")
    assert script_fraction("私はテストです", text_mod.expected_scripts("ja")) == 1.0
    assert text_mod.expected_scripts("ia") is None  # a language without a known script: no check


def test_script_fractions_vectorised_matches_single_texts_across_chunk_boundaries(monkeypatch):
    texts = ["Привет мир", "", "hello", "x" * 50, "Мир hello", "123", "ёжик"] * 7
    expected = [script_fraction(t, ("CYRILLIC",)) for t in texts]
    monkeypatch.setattr(text_mod, "_CHUNK_CHARS", 16)  # many chunks, a text longer than a chunk
    assert script_fractions(texts, ("CYRILLIC",)).tolist() == expected


def test_ratio_length_weighs_cjk():
    assert ratio_length("abc") == 3
    assert ratio_length("起初，神创造天地。") == 9 + 2 * 7  # seven ideographs count 3, punctuation 1
    assert ratio_length("한국어") == 9


def test_text_key_is_stable_and_signed_64_bit():
    assert text_key("hello") == text_key("hello") != text_key("hello ")
    assert -(2 ** 63) <= text_key("hello") < 2 ** 63
    digest = hashlib.blake2b(b"hello", digest_size=8).digest()
    assert text_key("hello") == int.from_bytes(digest, "little", signed=True)


# ---------------------------------------------------------------------------------------------- filters (stage)
def test_normalisation_reaches_the_output_and_nfkc_is_selectable(tmp_path):
    raw = tmp_path / "raw"
    write_source(raw, "web", {"en": [("web:1", "ﬁne  <b>bold</b>\u200b text &amp; more"),
                                     ("web:2", "Cafe\u0301 time")]})
    _, out = run_clean(tmp_path, params_for(tmp_path, ["en"], normalization="NFC"), raw, "nfc")
    assert kept_texts(out, "en") == {"web:1": "ﬁne bold text & more", "web:2": "Café time"}
    _, out = run_clean(tmp_path, params_for(tmp_path, ["en"], normalization="NFKC"), raw, "nfkc")
    assert kept_texts(out, "en")["web:1"] == "fine bold text & more"
    _, out = run_clean(tmp_path, params_for(tmp_path, ["en"], strip_html=False), raw, "html")
    assert kept_texts(out, "en")["web:1"] == "ﬁne <b>bold</b> text &amp; more"


def test_length_filters_count_normalised_characters(tmp_path):
    raw = tmp_path / "raw"
    rows = {"short": "abcd", "min": "abcde", "max": "abcdefghijkl", "long": "abcdefghijklm",
            "spaces": "  ab    cd  ", "tags": "<b>abc</b>", "empty": "  \u200b ", "cyr": "ёжики"}
    write_source(raw, "web", {"en": list(rows.items()), "ru": [("ru:1", "Привет мир")]})
    metrics, out = run_clean(tmp_path, params_for(tmp_path, ["en", "ru"], min_chars=5, max_chars=12,
                                                  script_check=False), raw)
    assert set(kept_texts(out, "en")) == {"min", "max", "spaces", "cyr"}
    assert kept_texts(out, "en")["spaces"] == "ab cd"
    dropped = metrics["languages"]["en"]["dropped"]
    assert (dropped["too_short"], dropped["too_long"], dropped["empty"]) == (2, 1, 1)


def test_script_check(tmp_path):
    raw = tmp_path / "raw"
    write_source(raw, "web", {
        "en": [("en:keep", "Hello world again"), ("en:cyr", "Привет мир снова"), ("en:digits", "12345 67890")],
        "ru": [("ru:keep", "Привет мир снова"), ("ru:latin", "Hello world again"),
               ("ru:mostly_latin", "Москва is a big city"), ("ru:mostly_cyr", "Привет, John!")],
        "ar": [("ar:keep", "مرحبا بالعالم"), ("ar:latin", "Hello world")],
        "zh": [("zh:keep", "你好世界，欢迎"), ("zh:latin", "Hello world"), ("zh:mixed", "你好 hello world")],
        "ia": [("ia:latin", "Bon die a totes"), ("ia:cyr", "Добрый день всем")],  # no known script: no check
    })
    langs = ["en", "ru", "ar", "zh", "ia"]
    metrics, out = run_clean(tmp_path, params_for(tmp_path, langs), raw, "checked")
    kept = {lang: set(kept_texts(out, lang)) for lang in langs}
    assert kept == {"en": {"en:keep"}, "ru": {"ru:keep", "ru:mostly_cyr"}, "ar": {"ar:keep"}, "zh": {"zh:keep"},
                    "ia": {"ia:latin", "ia:cyr"}}
    assert {lang: metrics["languages"][lang]["dropped"]["script"] for lang in langs} == {
        "en": 2, "ru": 2, "ar": 1, "zh": 2, "ia": 0}

    _, out = run_clean(tmp_path, params_for(tmp_path, langs, script_check=False), raw, "unchecked")
    assert set(kept_texts(out, "en")) == {"en:keep", "en:cyr", "en:digits"}
    _, out = run_clean(tmp_path, params_for(tmp_path, langs, min_script_fraction=0.3), raw, "lenient")
    assert "ru:mostly_latin" in kept_texts(out, "ru")  # 6 of 15 letters Cyrillic = 0.4


def test_dedup_keeps_the_first_occurrence_in_source_order(tmp_path):
    raw = tmp_path / "raw"
    # manifest order zeta, alpha: zeta's copy is first even though alpha sorts first
    write_source(raw, "zeta", {"en": [("z:1", "Hello world two"), ("z:2", "Hello world three")]})
    write_source(raw, "alpha", {"en": [("a:1", "Hello world one"), ("a:2", "Hello   world one"),
                                       ("a:3", "<i>Hello</i> world\u00a0one"), ("a:4", "Hello world two"),
                                       ("a:5", "hello world one")]})  # case differs: not a duplicate
    metrics, out = run_clean(tmp_path, params_for(tmp_path, ["en"]), raw, "dedup")
    assert set(kept_texts(out, "en")) == {"z:1", "z:2", "a:1", "a:5"}
    assert metrics["languages"]["en"]["dropped"]["duplicate"] == 3
    assert metrics["sources"]["alpha"]["languages"]["en"]["dropped"]["duplicate"] == 3

    metrics, out = run_clean(tmp_path, params_for(tmp_path, ["en"], dedup=False), raw, "nodedup")
    assert len(kept_texts(out, "en")) == 7 - metrics["languages"]["en"]["dropped"]["leak"]


def test_dedup_is_per_language(tmp_path):
    raw = tmp_path / "raw"
    ids = ids_in("train", "web", 200, 2)
    write_source(raw, "web", {"en": [(ids[0], "Same text here")], "fr": [(ids[1], "Same text here")]})
    metrics, out = run_clean(tmp_path, params_for(tmp_path, ["en", "fr"], script_check=False), raw)
    assert kept_texts(out, "en") and kept_texts(out, "fr")
    assert metrics["totals"]["mono"]["dropped"]["duplicate"] == 0


def test_pair_filters_ratio_identical_and_dropped_sides(tmp_path):
    raw = tmp_path / "raw"
    write_source(raw, "par", parallel=True, files={
        "en": [("p:1", "The cat sleeps on the mat."), ("p:2", "Yes."), ("p:3", "Hello there friend"),
               ("p:4", "ok"), ("p:5", "Only in English here"), ("p:6", "In the beginning God created the heaven "
                                                                       "and the earth.")],
        "fr": [("p:1", "Le chat dort sur le tapis."), ("p:2", "Oui, absolument, je suis tout à fait d'accord."),
               ("p:3", "Hello there friend"), ("p:4", "Très bien alors")],
        "zh": [("p:6", "起初，神创造天地。")],
    })
    params = params_for(tmp_path, ["en", "fr", "zh"], ["en-fr", "en-zh"], split={"valid": 0, "test": 0})
    metrics, out = run_clean(tmp_path, params, raw, "strict")
    rows = para(out)["train"]
    assert [(r["id"], r["src_lang"], r["tgt_lang"]) for r in rows] == [("p:1", "en", "fr"), ("p:6", "en", "zh")]
    assert rows[0]["src"] == "The cat sleeps on the mat." and rows[0]["tgt"] == "Le chat dort sur le tapis."
    en_fr = metrics["pairs"]["en-fr"]
    assert en_fr["rows_in"] == 4  # p:5 has no French side
    assert {k: v for k, v in en_fr["dropped"].items() if v} == {"ratio": 1, "identical": 1, "too_short": 1}
    assert en_fr["rows_out"] == {"train": 1, "valid": 0, "test": 0}
    assert "p:3" in kept_texts(out, "en") and "p:3" in kept_texts(out, "fr")  # an identical pair's mono rows stay
    en_zh = metrics["pairs"]["en-zh"]
    assert en_zh["rows_out"]["train"] == 1  # 6x longer in plain characters; kept thanks to the CJK weighting
    assert len(rows[1]["src"]) > 5 * len(rows[1]["tgt"])

    metrics, out = run_clean(tmp_path, params_for(tmp_path, ["en", "fr", "zh"], ["en-fr", "en-zh"],
                                                  split={"valid": 0, "test": 0}, drop_identical_pairs=False,
                                                  max_length_ratio=20), raw, "lenient")
    assert {r["id"] for r in para(out)["train"] if r["tgt_lang"] == "fr"} == {"p:1", "p:2", "p:3"}


def test_pairs_join_on_id_whatever_the_file_order(tmp_path):
    raw = tmp_path / "raw"
    corpus = bible(60, ("en", "fr"))
    corpus["fr"] = corpus["fr"][::-1]  # same ids, reverse order, one missing
    del corpus["fr"][7]
    write_source(raw, "bible", corpus, parallel=True)
    metrics, out = run_clean(tmp_path, params_for(tmp_path, ["en", "fr"], ["en-fr"]), raw)
    rows = [r for split in para(out).values() for r in split]
    assert len(rows) == 59 == metrics["pairs"]["en-fr"]["rows_in"]
    en, fr = dict(bible(60, ("en", "fr"))["en"]), dict(bible(60, ("en", "fr"))["fr"])
    assert all(r["src"] == en[r["id"]] and r["tgt"] == fr[r["id"]] for r in rows)


# ---------------------------------------------------------------------------------------------- split and leak
def test_split_is_deterministic_and_the_same_for_an_id_in_every_language(tmp_path):
    raw = tmp_path / "raw"
    write_source(raw, "bible", bible(300), parallel=True)
    pairs = ["en-fr", "en-ru", "fr-ru"]
    params = params_for(tmp_path, ["en", "fr", "ru"], pairs)
    _, out1 = run_clean(tmp_path, params, raw, "run1")
    _, out2 = run_clean(tmp_path, params, raw, "run2")

    def split_of_ids(out):
        seen: dict[tuple[str, str], str] = {}
        for split, rows in mono(out).items():
            for r in rows:
                seen[(r["lang"], r["id"])] = split
        for split, rows in para(out).items():
            for r in rows:
                seen[(f"{r['src_lang']}-{r['tgt_lang']}", r["id"])] = split
        return seen

    first, second = split_of_ids(out1), split_of_ids(out2)
    assert first == second
    assert len(first) == 300 * 6
    for i in range(300):
        vid = verse_id(i)
        assert {first[(key, vid)] for key in ["en", "fr", "ru", *pairs]} == {split_named(vid)}
    counts = {s: sum(1 for (k, _), v in first.items() if k == "en" and v == s) for s in SPLITS}
    assert 30 <= counts["valid"] <= 90 and 30 <= counts["test"] <= 90  # 20% each of 300, give or take

    salted = params_for(tmp_path, ["en", "fr", "ru"], pairs, split_salt="another salt")
    _, out3 = run_clean(tmp_path, salted, raw, "run3")
    moved = sum(1 for key, split in split_of_ids(out3).items() if first[key] != split)
    assert moved > 300  # a different salt is a different split


def _train_and_heldout_texts(out: Path) -> tuple[set[str], set[str]]:
    train, heldout = set(), set()
    for split, rows in mono(out).items():
        (train if split == "train" else heldout).update(r["text"] for r in rows)
    for split, rows in para(out).items():
        for r in rows:
            (train if split == "train" else heldout).update((r["src"], r["tgt"]))
    return train, heldout


@pytest.mark.parametrize("dedup", [True, False])
def test_no_valid_or_test_text_in_any_training_text(tmp_path, dedup):
    raw = tmp_path / "raw"
    corpus = bible(200, ("en", "fr"))
    en, fr = dict(corpus["en"]), dict(corpus["fr"])
    test_ids = [vid for vid in en if split_named(vid) == "test"]
    valid_ids = [vid for vid in en if split_named(vid) == "valid"]
    train_ids = [vid for vid in en if split_named(vid) == "train"]
    # 1. an untranslated verse: a training French verse that is the English text of a test verse
    fr[train_ids[0]] = en[test_ids[0]]
    corpus["fr"] = list(fr.items())
    write_source(raw, "bible", corpus, parallel=True)
    web_train = ids_in("train", "web", 400, 3)
    web_test = ids_in("test", "web", 400, 1)
    write_source(raw, "web", {
        # 2. a mono-only source repeats a valid verse in training, in the same language and in another one
        "en": [(web_train[0], en[valid_ids[0]]), (web_train[1], "A sentence only the web has"),
               # 3. a mono-only source holds the test copy of a training verse of the parallel source
               (web_test[0], fr[train_ids[1]])],
        "fr": [(web_train[2], en[valid_ids[1]])],
    })
    metrics, out = run_clean(tmp_path, params_for(tmp_path, ["en", "fr"], ["en-fr"], dedup=dedup), raw)

    train, heldout = _train_and_heldout_texts(out)
    assert train and heldout
    assert not train & heldout
    assert en[test_ids[0]] in heldout and en[valid_ids[0]] in heldout
    assert fr[train_ids[1]] in heldout and fr[train_ids[1]] not in train
    # the two French copies of English held-out verses and the French training verse behind the web test copy
    assert metrics["languages"]["fr"]["dropped"]["leak"] == 3
    if dedup:  # the same-language copy in web/en is a duplicate of the earlier verse (first occurrence wins)
        assert metrics["languages"]["en"]["dropped"]["duplicate"] == 1
        assert metrics["languages"]["en"]["dropped"]["leak"] == 0
    else:
        assert metrics["languages"]["en"]["dropped"]["leak"] == 1
    # the pair rows whose French side leaked are gone from the training pairs too
    assert metrics["pairs"]["en-fr"]["dropped"]["leak"] == 2
    train_pair_ids = {r["id"] for r in para(out)["train"]}
    assert train_ids[0] not in train_pair_ids and train_ids[1] not in train_pair_ids


# -------------------------------------------------------------------------------------------- bad raw lines
def test_invalid_utf8_nul_and_malformed_lines_are_dropped_and_counted(tmp_path):
    raw = tmp_path / "raw"
    lines = [
        b"x:01\tA good first line\n",
        b"x:02\tbad \xff byte\n",
        b"x:03\ttruncated \xe2\x82\n",
        b"\xff\xfe:04\tan id that is not UTF-8\n",
        b"x:05\tnul\x00inside\n",
        b"x:06 no tab at all\n",
        b"\n",
        b"x:08\tA good CRLF line\r\n",
        b"x:09\t  \t \n",
        b"\x00\x00\x00\n",
        b"x:11\tThe last line without newline",
    ]
    write_source(raw, "web", {"en": lines})
    metrics, out = run_clean(tmp_path, params_for(tmp_path, ["en"]), raw)
    assert kept_texts(out, "en") == {"x:01": "A good first line", "x:08": "A good CRLF line",
                                     "x:11": "The last line without newline"}
    en = metrics["languages"]["en"]
    assert en["rows_in"] == 11
    assert {k: v for k, v in en["dropped"].items() if v} == {"invalid_utf8": 3, "nul": 2, "malformed": 1, "empty": 2}


def test_an_overlong_line_is_too_long_and_the_next_line_is_read(tmp_path):
    raw = tmp_path / "raw"
    huge = b"x:1\t" + b"word " * 300_000 + b"\n"  # 1.5 MB: over the 1 MiB read limit
    write_source(raw, "web", {"en": [huge, b"x:2\tA normal line after it\n"]})
    metrics, out = run_clean(tmp_path, params_for(tmp_path, ["en"]), raw)
    assert kept_texts(out, "en") == {"x:2": "A normal line after it"}
    assert metrics["languages"]["en"]["dropped"]["too_long"] == 1


# ---------------------------------------------------------------------------------------- outputs and metrics
def _rich_corpus(raw: Path) -> None:
    corpus = bible(250)
    corpus["en"].append((verse_id(250), "x"))  # too short
    corpus["fr"].append((verse_id(251), "Привет мир"))  # wrong script
    corpus["ru"].append((verse_id(252), f"{RU[3]} 3"))  # the text of verse 3 again
    write_source(raw, "bible", corpus, parallel=True)
    write_source(raw, "web", {"en": [(f"web:{i + 1:09d}", f"{EN[i % 5]} from the web {i % 40}") for i in range(120)]
                              + [b"web:000000999\tbad \xff\n"]})


def test_outputs_follow_the_data_layout(tmp_path):
    raw = tmp_path / "raw"
    _rich_corpus(raw)
    _, out = run_clean(tmp_path, params_for(tmp_path, ["en", "fr", "ru"], ["en-fr", "fr-ru"]), raw)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "eval", "eval/suites.parquet",  # always written, with no rows when no source has role eval
        "mono", "mono/test.parquet", "mono/train.parquet", "mono/valid.parquet",
        "para", "para/test.parquet", "para/train.parquet", "para/valid.parquet"]
    assert pq.read_table(out / "eval" / "suites.parquet").num_rows == 0
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no scratch left behind
    for kind, names in (("mono", ["id", "lang", "text"]), ("para", ["id", "src_lang", "tgt_lang", "src", "tgt"])):
        for split in SPLITS:
            f = pq.ParquetFile(out / kind / f"{split}.parquet")
            assert f.schema_arrow == pa.schema([(n, pa.string()) for n in names])
            meta = f.metadata
            assert meta.num_rows > 0
            assert all(meta.row_group(i).num_rows <= 100 for i in range(meta.num_row_groups))  # batch_rows
            assert meta.row_group(0).column(0).compression == "ZSTD"
    train = pq.read_table(out / "mono" / "train.parquet")
    assert pq.ParquetFile(out / "mono" / "train.parquet").metadata.num_row_groups > 1  # streamed
    assert set(train.column("lang").to_pylist()) == {"en", "fr", "ru"}
    pairs = {(r["src_lang"], r["tgt_lang"]) for r in pq.read_table(out / "para" / "train.parquet").to_pylist()}
    assert pairs == {("en", "fr"), ("fr", "ru")}


def test_scratch_left_by_a_killed_run_is_cleared(tmp_path):
    raw = tmp_path / "raw"
    write_source(raw, "web", {"en": [("web:1", "Some English text")]})
    finished = subprocess.Popen(["true"])  # its pid is no longer running, like a killed clean's
    finished.wait()
    stale = tmp_path / f"clean.tmp-{finished.pid}-work-abc123"
    (stale / "deep").mkdir(parents=True)
    (stale / "deep" / "pairs.bible.sqlite").write_bytes(b"half written")
    run_clean(tmp_path, params_for(tmp_path, ["en"]), raw)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "clean-metrics.json", "params.yaml", "raw"]


def test_two_runs_write_identical_bytes(tmp_path):
    raw = tmp_path / "raw"
    _rich_corpus(raw)
    params = params_for(tmp_path, ["en", "fr", "ru"], ["en-fr", "en-ru"])
    run_clean(tmp_path, params, raw, "a")
    run_clean(tmp_path, params, raw, "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.parquet"))
    assert len(files) == 7  # mono and para splits, eval/suites.parquet
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (tmp_path / "a-metrics.json").read_bytes() == (tmp_path / "b-metrics.json").read_bytes()


def test_metrics_add_up_and_match_the_files(tmp_path):
    raw = tmp_path / "raw"
    _rich_corpus(raw)
    params = params_for(tmp_path, ["en", "fr", "ru"], ["en-fr", "en-ru"])
    metrics, out = run_clean(tmp_path, params, raw)
    assert json.loads((tmp_path / "clean-metrics.json").read_text()) == metrics

    def adds_up(c):
        assert c["rows_in"] == sum(c["dropped"].values()) + sum(c["rows_out"].values()), c

    groups = [*metrics["languages"].values(), *metrics["pairs"].values(), *metrics["totals"].values()]
    groups += [c for s in metrics["sources"].values() for kind in s.values() for c in kind.values()]
    for c in groups:
        adds_up(c)
    assert metrics["languages"]["en"]["rows_in"] == 251 + 121
    assert metrics["languages"]["en"]["dropped"]["invalid_utf8"] == 1
    assert metrics["languages"]["en"]["dropped"]["duplicate"] == 120 - 40  # the web repeats 40 texts
    assert metrics["languages"]["fr"]["dropped"]["script"] == 1
    assert metrics["totals"]["mono"]["rows_in"] == sum(c["rows_in"] for c in metrics["languages"].values())
    for split, rows in mono(out).items():
        for lang in ("en", "fr", "ru"):
            assert sum(r["lang"] == lang for r in rows) == metrics["languages"][lang]["rows_out"][split]
    for split, rows in para(out).items():
        for pair in ("en-fr", "en-ru"):
            n = sum(f"{r['src_lang']}-{r['tgt_lang']}" == pair for r in rows)
            assert n == metrics["pairs"][pair]["rows_out"][split]


# ------------------------------------------------------------------------------------------------------- errors
def test_duplicate_ids_in_a_parallel_source_are_an_error(tmp_path):
    raw = tmp_path / "raw"
    corpus = bible(20, ("en", "fr"))
    corpus["fr"].append(corpus["fr"][3])
    write_source(raw, "bible", corpus, parallel=True)
    with pytest.raises(PipelineError, match=r"appears twice in fr\.tsv"):
        run_clean(tmp_path, params_for(tmp_path, ["en", "fr"], ["en-fr"]), raw)
    assert not (tmp_path / "clean").exists()


def _tree_digest(*paths: Path) -> dict[str, str]:
    out = {}
    for root in paths:
        for p in sorted([root] if root.is_file() else root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def cli_project(tmp_path):
    """A project folder with data/raw, params.yaml and a previous good data/clean + metrics."""
    proj = tmp_path / "proj"
    raw = proj / "data" / "raw"
    write_source(raw, "bible", bible(60, ("en", "fr")), parallel=True)
    write_source(raw, "web", {"en": [(f"web:{i + 1:09d}", f"{EN[i % 5]} on the web {i}") for i in range(30)],
                              "ru": [(f"web:{i + 1:09d}", f"{RU[i % 5]} {i}") for i in range(30)]})
    write_clean_stage_params(proj / "params.yaml", ["en", "fr", "ru"], ["en-fr"])
    clean(load_params("clean", proj / "params.yaml"), raw, proj / "data" / "clean", proj / "metrics" / "clean.json")
    return proj


def test_cli_writes_the_default_paths(cli_project):
    previous = _tree_digest(cli_project / "data" / "clean", cli_project / "metrics" / "clean.json")
    (cli_project / "metrics" / "clean.json").unlink()
    proc = run(python_module("pipeline.clean"), cli_project, env=project_env())
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr
    # the same bytes as the in-process run: data/clean replaced as a whole, metrics written again
    assert _tree_digest(cli_project / "data" / "clean", cli_project / "metrics" / "clean.json") == previous
    metrics = json.loads((cli_project / "metrics" / "clean.json").read_text())
    assert set(metrics) == {"languages", "pairs", "sources", "totals", "eval"}
    assert metrics["eval"] == {}  # no source has role eval
    assert metrics["pairs"]["en-fr"]["rows_in"] == 60
    text = (cli_project / "metrics" / "clean.json").read_text()
    assert text == json.dumps(metrics, indent=2, sort_keys=True, ensure_ascii=False) + "\n"  # sorted, stable


def _break_raw_missing(proj):
    (proj / "data" / "raw").rename(proj / "raw-elsewhere")


def _break_unprovided_language(proj):
    write_clean_stage_params(proj / "params.yaml", ["en", "fr", "ru", "de"], ["en-fr"])


def _break_all_filtered(proj):
    lines = [f"web:{i + 1:09d}\tHello world {i}\n" for i in range(30)]  # Latin text in the Russian file
    (proj / "data" / "raw" / "web" / "ru.tsv").write_text("".join(lines), encoding="utf-8")


def _break_unprovided_pair(proj):
    write_clean_stage_params(proj / "params.yaml", ["en", "fr", "ru"], ["en-fr", "en-ru"])


def _break_empty_file(proj):
    (proj / "data" / "raw" / "bible" / "fr.tsv").write_bytes(b"")


def _break_duplicate_id(proj):
    with open(proj / "data" / "raw" / "bible" / "en.tsv", "ab") as fh:
        fh.write(f"{verse_id(5)}\tThe same verse id once more\n".encode())


BAD_INPUTS = {
    "raw_missing": (_break_raw_missing, ["data/raw", "dvc repro download"]),
    "unprovided_language": (_break_unprovided_language, ["'de' has no raw text", "remove it from languages"]),
    "all_filtered_language": (_break_all_filtered, ["language 'ru'", "all 30 segments were filtered out", "script 30"]),
    "unprovided_pair": (_break_unprovided_pair, ["en-ru", "parallel sources: bible [en, fr]"]),
    "empty_file": (_break_empty_file, ["fr.tsv", "empty file"]),
    "duplicate_id": (_break_duplicate_id, ["appears twice in en.tsv"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cli_bad_input_is_one_error_line_and_leaves_previous_outputs(cli_project, case):
    proj = cli_project
    before = _tree_digest(proj / "data" / "clean", proj / "metrics" / "clean.json")
    breaker, fragments = BAD_INPUTS[case]
    breaker(proj)
    proc = run(python_module("pipeline.clean"), proj, check=False, env=project_env())
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: [clean] "), proc.stderr
    for fragment in fragments:
        assert fragment in errors[0]
    assert _tree_digest(proj / "data" / "clean", proj / "metrics" / "clean.json") == before
    assert not [p for p in (proj / "data").iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_dvc_repro_runs_the_clean_stage(dvc_project):
    proj = dvc_project
    write_source(proj / "data" / "raw", "bible", bible(60, ("en", "fr")), parallel=True)

    def two_languages(p):
        p.update(languages=["en", "fr"], pairs=["en-fr"])
        p["clean"].update(split={"valid": 0.2, "test": 0.2})
        # data/raw is written above, not downloaded; the source only has to be valid for the params check
        p["download"]["sources"] = [{"name": "bible", "kind": "local", "format": "text", "parallel": True,
                                     "languages": ["en", "fr"], "paths": {"en": "en.txt", "fr": "fr.txt"}}]

    write_params(proj, two_languages)
    dvc(proj, "repro", "--single-item", "params")   # the stamp every stage depends on
    dvc(proj, "repro", "--single-item", "clean")
    assert (proj / "data" / "clean" / "para" / "valid.parquet").exists()
    metrics = json.loads((proj / "metrics" / "clean.json").read_text())
    assert metrics["pairs"]["en-fr"]["rows_in"] == 60
    assert "clean.json" in dvc(proj, "metrics", "show", "metrics/clean.json").stdout
    write_params(proj, lambda p: p["clean"].update(min_chars=4))
    assert "clean" in json.loads(dvc(proj, "status", "--json", "clean").stdout or "{}")


def test_memory_benchmark_runs_on_a_small_corpus(tmp_path):
    proc = run([sys.executable, "bench/clean_memory.py", "--size-mb", "2", "--workdir", str(tmp_path)],
               Path(__file__).resolve().parents[2])
    assert "peak RSS" in proc.stdout and "under the 500 MB budget" in proc.stdout, proc.stdout
    assert list(tmp_path.iterdir()) == []  # the corpus is removed unless --keep
