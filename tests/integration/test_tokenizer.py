"""tokenizer stage and xlm_core.tokenizer: real sentencepiece trained on small clean Parquet fixtures."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from tests.helpers.corpora import write_clean, write_tokenizer_shard_params
from tests.helpers.project import ROOT, python_module, run
from pipeline.params import load_params
from pipeline.tokenizer import choose_ordinals, sample_sizes, train_tokenizer
from xlm_core import special_tokens as st
from xlm_core.tokenizer import Tokenizer, TokenizerError

LANGS = ["en", "fr", "es", "ru", "ar", "zh"]
ROWS = {"en": 900, "fr": 300, "es": 300, "ru": 300, "ar": 300, "zh": 300}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tokenizer trained on the six-language fixture (shared by the read-only tests)."""
    root = tmp_path_factory.mktemp("tok")
    write_clean(root / "clean", ROWS)
    params = load_params("tokenizer", write_tokenizer_shard_params(root / "params.yaml", LANGS))
    metrics = train_tokenizer(params, root / "clean", root / "tokenizer", root / "metrics.json")
    return root, Tokenizer.load(root / "tokenizer"), metrics


# ------------------------------------------------------------------------------------------------------ id layout
def test_id_layout_matches_xlmr(trained):
    root, tok, _ = trained
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizer" / "spm.model"))
    n = sp.get_piece_size()
    assert n == 200
    assert tok.vocab_size == n + 2
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, n + 1)
    assert (st.BOS, st.PAD, st.EOS, st.UNK) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in (0, 1, 2, 3, n + 1)] == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    # every ordinary piece: project id = sentencepiece id + 1
    for spm_id in range(3, n):
        assert tok.piece_to_id(sp.id_to_piece(spm_id)) == spm_id + 1
    text = "Свет день вода. The light of day."
    assert tok.encode(text) == [i + 1 if i >= 3 else {0: 3, 1: 0, 2: 2}[i] for i in sp.encode(text)]
    info = json.loads((root / "tokenizer" / "tokenizer.json").read_text())
    assert info["vocab_size"] == n + 2
    assert info["layout"]["special_tokens"] == {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": n + 1}
    assert info["spm_sha256"] == tok.sha256
    assert tok.ids_dtype == np.uint16


def test_unknown_text_maps_to_project_unk(trained):
    _, tok, _ = trained
    ids = tok.encode("Ωψ")  # Greek never occurs in the fixture
    assert st.UNK in ids and all(0 <= i < tok.vocab_size for i in ids)


# ---------------------------------------------------------------------------------------------------- round trip
def test_round_trip_every_language(trained):
    root, tok, _ = trained
    valid = pq.read_table(root / "clean" / "mono" / "valid.parquet").to_pylist()
    seen = set()
    for row in valid:
        ids = tok.encode(row["text"])
        assert st.UNK not in ids
        assert tok.decode(ids) == row["text"], row["lang"]
        seen.add(row["lang"])
    assert seen == set(LANGS)
    # specials around a sentence are dropped on decode, spaces are kept as written
    for text in ["été  où   très", " Свет день", "光日水王 民地"]:
        assert tok.decode([tok.bos_id, *tok.encode(text), tok.eos_id, tok.pad_id]) == text


def test_encode_batch_equals_encode(trained):
    root, tok, _ = trained
    texts = pq.read_table(root / "clean" / "mono" / "test.parquet").column("text").to_pylist()
    batch = tok.encode_batch(texts, threads=2)
    assert [b.tolist() for b in batch] == [tok.encode(t) for t in texts]
    assert all(b.dtype == np.uint16 for b in batch)
    flat, offsets = tok.encode_flat(texts + [""], threads=2)
    assert offsets[-1] == flat.size and offsets[-1] - offsets[-2] == 0


# ------------------------------------------------------------------------------------------------ sampling rules
def test_sample_sizes_follow_alpha():
    counts = {"en": 9000, "fr": 1000}
    sizes = sample_sizes(counts, alpha=0.5, max_sentences=1000)
    assert sum(sizes.values()) == 1000
    # q ∝ p^0.5: en 0.9^0.5 = 0.949, fr 0.1^0.5 = 0.316 -> 750 / 250
    assert sizes == {"en": 750, "fr": 250}
    assert sample_sizes(counts, alpha=1.0, max_sentences=1000) == {"en": 900, "fr": 100}
    # a corpus smaller than max_sentences is sampled at its own size, small languages repeated
    sizes = sample_sizes({"en": 900, "sw": 10}, alpha=0.0001, max_sentences=10_000)
    assert sum(sizes.values()) == 910 and sizes["sw"] == 455


def test_choose_ordinals_with_and_without_repeats():
    rng = np.random.default_rng(0)
    ordinals, repeats = choose_ordinals(100, 30, rng)
    assert len(set(ordinals.tolist())) == 30 and ordinals.max() < 100 and (repeats == 1).all()
    assert (np.diff(ordinals) > 0).all()
    ordinals, repeats = choose_ordinals(10, 25, rng)
    assert ordinals.tolist() == list(range(10)) and repeats.sum() == 25 and set(repeats.tolist()) == {2, 3}


def test_training_reads_only_the_train_split(tmp_path):
    """A character and a word present only in valid/test text never enter the vocabulary."""
    write_clean(tmp_path / "clean", {"en": 400, "fr": 200})
    for split in ("valid", "test"):
        path = tmp_path / "clean" / "mono" / f"{split}.parquet"
        table = pq.read_table(path)
        extra = pa.table({"id": [f"x:{split}.{i}" for i in range(300)], "lang": ["en"] * 300,
                          "text": ["Ωmega zyxwvq zyxwvq"] * 300}, schema=table.schema)
        pq.write_table(pa.concat_tables([table, extra]), path)
    params = load_params("tokenizer", write_tokenizer_shard_params(tmp_path / "params.yaml", ["en", "fr"],
                                                                    tokenizer={"vocab_size": 90}))
    metrics = train_tokenizer(params, tmp_path / "clean", tmp_path / "tok", tmp_path / "m.json")
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.encode("Ω")[-1] == st.UNK
    assert tok.piece_to_id("▁zyxwvq") == st.UNK
    # ... and the metrics, measured on valid, see that text as unknown
    assert metrics["languages"]["en"]["unk_rate"] > 0
    info = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert info["training"]["train_sentences"] == {"en": 400, "fr": 200}


# --------------------------------------------------------------------------------------------------- determinism
def test_two_runs_give_identical_files(tmp_path, trained):
    root, _, metrics = trained
    params = load_params("tokenizer", root / "params.yaml")
    again = train_tokenizer(params, root / "clean", tmp_path / "tokenizer", tmp_path / "metrics.json")
    for name in ("spm.model", "spm.vocab", "tokenizer.json"):
        assert (tmp_path / "tokenizer" / name).read_bytes() == (root / "tokenizer" / name).read_bytes(), name
    assert again == metrics
    assert (tmp_path / "metrics.json").read_bytes() == (root / "metrics.json").read_bytes()


def test_seed_changes_the_sample(tmp_path, trained):
    root, tok, _ = trained
    params = load_params("tokenizer", write_tokenizer_shard_params(tmp_path / "params.yaml", LANGS,
                                                                    tokenizer={"seed": 99, "max_sentences": 500}))
    train_tokenizer(params, root / "clean", tmp_path / "tokenizer", tmp_path / "metrics.json")
    assert Tokenizer.load(tmp_path / "tokenizer").sha256 != tok.sha256


def test_bpe_model_type(tmp_path, trained):
    root, _, _ = trained
    params = load_params("tokenizer", write_tokenizer_shard_params(tmp_path / "params.yaml", LANGS,
                                                                    tokenizer={"model_type": "bpe", "vocab_size": 150}))
    train_tokenizer(params, root / "clean", tmp_path / "tokenizer", tmp_path / "metrics.json")
    tok = Tokenizer.load(tmp_path / "tokenizer")
    assert tok.vocab_size == 152
    text = "Été forêt château. Свет день."
    assert tok.decode(tok.encode(text)) == text


# ------------------------------------------------------------------------------------------------------- metrics
def test_metrics_per_language(trained):
    root, tok, metrics = trained
    on_disk = json.loads((root / "metrics.json").read_text())
    assert on_disk == metrics
    assert set(metrics["languages"]) == set(LANGS)
    for lang, m in metrics["languages"].items():
        assert m["rows"] == max(5, int(ROWS[lang] * 0.1))
        assert m["fertility"] > 0.5, lang
        assert m["unk_rate"] == 0.0
        assert 0 < m["vocab_used"] <= 1
        assert m["fertility_unit"] == ("char" if lang == "zh" else "word")
    assert metrics["vocab_used"] >= max(m["vocab_used"] for m in metrics["languages"].values())
    assert sum(metrics["sample_sentences"].values()) == 2000
    # alpha = 0.3 flattens 3:1 between en and the others
    assert 1 < metrics["sample_sentences"]["en"] / metrics["sample_sentences"]["fr"] < 3 ** 0.3 + 0.05


# -------------------------------------------------------------------------------------------------------- errors
def _cli(tmp_path: Path, *extra: str):
    return run(python_module("pipeline.tokenizer", "--params", str(tmp_path / "params.yaml"),
                             "--clean-dir", str(tmp_path / "clean"), "--out-dir", str(tmp_path / "tokenizer"),
                             "--metrics", str(tmp_path / "metrics.json"), *extra), cwd=ROOT, check=False)


def _assert_one_line_error(proc, *fragments: str):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_cli_empty_language_is_one_clear_error(tmp_path):
    write_clean(tmp_path / "clean", {"en": 200, "fr": 200})
    write_tokenizer_shard_params(tmp_path / "params.yaml", ["en", "fr", "ru"])
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "spm.model").write_bytes(b"previous output")
    proc = _cli(tmp_path)
    _assert_one_line_error(proc, "[tokenizer]", "train.parquet", "['ru']", "languages")
    # the previous output is untouched and no metrics were written
    assert (tmp_path / "tokenizer" / "spm.model").read_bytes() == b"previous output"
    assert not (tmp_path / "metrics.json").exists()


def test_cli_vocab_too_large_names_the_max_and_the_key(tmp_path):
    write_clean(tmp_path / "clean", {"en": 60, "fr": 60})
    write_tokenizer_shard_params(tmp_path / "params.yaml", ["en", "fr"], tokenizer={"vocab_size": 5000})
    line = _assert_one_line_error(_cli(tmp_path), "tokenizer.vocab_size = 5000", "lower tokenizer.vocab_size to")
    allowed = int(line.split("lower tokenizer.vocab_size to ")[1].split()[0])
    assert 16 < allowed < 5000
    # the number given really is the limit: training at it works
    write_tokenizer_shard_params(tmp_path / "params.yaml", ["en", "fr"], tokenizer={"vocab_size": allowed})
    proc = _cli(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert Tokenizer.load(tmp_path / "tokenizer").vocab_size == allowed + 2


def test_cli_vocab_too_small_is_explained(tmp_path):
    write_clean(tmp_path / "clean", {"en": 60, "ru": 60, "zh": 60})
    write_tokenizer_shard_params(tmp_path / "params.yaml", ["en", "ru", "zh"], tokenizer={"vocab_size": 20})
    _assert_one_line_error(_cli(tmp_path), "tokenizer.vocab_size = 20 is too small", "character_coverage")


def test_cli_missing_clean_split(tmp_path):
    write_clean(tmp_path / "clean", {"en": 60}, splits=("train",))
    write_tokenizer_shard_params(tmp_path / "params.yaml", ["en"])
    _assert_one_line_error(_cli(tmp_path), "valid.parquet", "not found", "dvc repro clean")


def test_load_refuses_a_hand_edited_folder(tmp_path, trained):
    root, _, _ = trained
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("spm.model", "spm.vocab", "tokenizer.json"):
        (folder / name).write_bytes((root / "tokenizer" / name).read_bytes())
    info = json.loads((folder / "tokenizer.json").read_text())
    info["spm_sha256"] = "0" * 64
    (folder / "tokenizer.json").write_text(json.dumps(info))
    with pytest.raises(TokenizerError, match="differs from"):
        Tokenizer.load(folder)
    with pytest.raises(TokenizerError, match="dvc repro tokenizer"):
        Tokenizer.load(tmp_path / "nowhere")
