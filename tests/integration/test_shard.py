"""shard stage and the xlm_core.shards reader: real tokenizer, real Parquet, real DVC."""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dvc.repo import Repo

from tests.helpers.project import ROOT, dvc, python_module, run, write_params
from pipeline.params import load_params
from pipeline.shard import make_shards
from pipeline.tokenizer import train_tokenizer
from tests.helpers.corpora import write_clean, write_tokenizer_shard_params
from xlm_core.shards import ShardError, ShardSet, iter_row_range
from xlm_core.tokenizer import Tokenizer

LANGS = ["en", "fr", "ru", "ar", "zh"]
PAIRS = ["en-fr", "en-ru", "en-zh", "fr-ar"]
ROWS = {"en": 400, "fr": 200, "ru": 200, "ar": 150, "zh": 150}
TRAIN_MONO_ROWS = sum(ROWS.values())  # 1100 -> 5 shards of 250


def _all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _build(root: Path, executor=None, **shard) -> tuple[dict, Path]:
    """clean fixture -> tokenizer -> shards under ``root``."""
    params_path = write_tokenizer_shard_params(root / "params.yaml", LANGS, PAIRS, tokenizer={"vocab_size": 150},
                                               shard=shard)
    if not (root / "clean").exists():
        write_clean(root / "clean", ROWS, PAIRS)
    train_tokenizer(load_params("tokenizer", params_path), root / "clean", root / "tokenizer", root / "tok.json")
    manifests = make_shards(load_params("shard", params_path), root / "clean", root / "tokenizer", root / "shards",
                            root / "shard.json", executor=executor)
    return manifests, root / "shards"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    manifests, shards = _build(root)
    return root, manifests, shards, Tokenizer.load(root / "tokenizer")


# --------------------------------------------------------------------------------------------------------- layout
def test_shard_layout_and_content(built):
    root, manifests, shards, tok = built
    train = sorted(p.name for p in (shards / "train").iterdir())
    assert train == ["manifest.json", *[f"mono-{i:05d}.parquet" for i in range(5)],
                     *[f"para-{i:05d}.parquet" for i in range(len(train) - 6)]]
    mono = pq.read_table(shards / "train" / "mono-00000.parquet")
    assert mono.schema.names == ["id", "lang", "ids", "length"]
    assert mono.schema.field("lang").type == pa.dictionary(pa.int32(), pa.string())
    assert mono.schema.field("ids").type == pa.list_(pa.uint16())
    assert mono.schema.field("length").type == pa.int32()
    assert pq.ParquetFile(shards / "train" / "mono-00000.parquet").metadata.row_group(0).column(0).compression == "ZSTD"
    # rows in input order, ids = the tokenizer's encoding of the text, no special tokens
    clean = pq.read_table(root / "clean" / "mono" / "train.parquet")
    got = pa.concat_tables(pq.read_table(shards / "train" / f"mono-{i:05d}.parquet") for i in range(5))
    assert got.column("id").to_pylist() == clean.column("id").to_pylist()
    assert got.column("lang").cast(pa.string()).to_pylist() == clean.column("lang").to_pylist()
    for row_ids, text, length in zip(got.column("ids").to_pylist(), clean.column("text").to_pylist(),
                                     got.column("length").to_pylist()):
        assert row_ids == tok.encode(text) and length == len(row_ids)
        assert min(row_ids) >= 4 and max(row_ids) < tok.mask_id
    para = pq.read_table(shards / "valid" / "para-00000.parquet")
    assert para.schema.names == ["id", "src_lang", "tgt_lang", "src_ids", "tgt_ids", "src_length", "tgt_length"]
    clean_para = pq.read_table(root / "clean" / "para" / "valid.parquet").to_pylist()
    for out, src in zip(para.to_pylist(), clean_para):
        assert (out["src_lang"], out["tgt_lang"]) == (src["src_lang"], src["tgt_lang"])
        assert out["src_ids"] == tok.encode(src["src"]) and out["tgt_ids"] == tok.encode(src["tgt"])
        assert (out["src_length"], out["tgt_length"]) == (len(out["src_ids"]), len(out["tgt_ids"]))


def test_manifest_counts_equal_what_the_reader_yields(built):
    root, manifests, shards, tok = built
    for split in ("train", "valid", "test"):
        reader = ShardSet(shards / split, tokenizer=tok)
        manifest = json.loads((shards / split / "manifest.json").read_text())
        assert reader.manifest == manifest == manifests[split]
        assert manifest["tokenizer_sha256"] == tok.sha256 and manifest["vocab_size"] == tok.vocab_size
        # mono: rows and tokens per language
        per_lang: dict[str, list[int]] = {}
        for table in reader.iter_tables("mono", columns=["lang", "length"]):
            for lang, length in zip(table.column("lang").to_pylist(), table.column("length").to_pylist()):
                per_lang.setdefault(lang, [0, 0])
                per_lang[lang][0] += 1
                per_lang[lang][1] += length
        assert {k: {"rows": r, "tokens": t} for k, (r, t) in per_lang.items()} == manifest["languages"]
        assert sum(r for r, _ in per_lang.values()) == reader.rows("mono") == manifest["mono"]["rows"]
        # para: rows and tokens per pair
        per_pair: dict[str, list[int]] = {}
        for batch in reader.iter_batches("para", batch_rows=64):
            assert batch.num_rows <= 64
            for s, t, a, b in zip(*(batch.column(c).to_pylist() for c in
                                    ("src_lang", "tgt_lang", "src_length", "tgt_length"))):
                slot = per_pair.setdefault(f"{s}-{t}", [0, 0, 0])
                slot[0] += 1
                slot[1] += a
                slot[2] += b
        assert {k: {"rows": r, "tokens": a + b, "src_tokens": a, "tgt_tokens": b} for k, (r, a, b) in
                per_pair.items()} == manifest["pairs"]
        assert set(manifest["pairs"]) == set(PAIRS)
        # per-file counts
        for f in reader.files("mono") + reader.files("para"):
            assert pq.ParquetFile(f.path).metadata.num_rows == f.rows
    train = ShardSet(shards / "train")
    assert train.rows("mono") == 1100 and len(train.files("mono")) == 5
    assert [f.rows for f in train.files("mono")] == [250, 250, 250, 250, 100]
    assert all("zh" in f.keys for f in train.files("mono", key="zh"))
    metrics = json.loads((root / "shard.json").read_text())
    assert metrics["train"]["languages"] == manifests["train"]["languages"]
    assert metrics["valid"]["pairs"] == manifests["valid"]["pairs"]


def test_iter_row_range_stitches_row_groups(built):
    root = built[0]
    pf = pq.ParquetFile(root / "clean" / "mono" / "train.parquet")
    assert pf.metadata.num_row_groups > 5  # the fixture writes 97-row groups
    everything = pf.read(columns=["id"]).column("id").to_pylist()
    for start, stop, batch in [(0, 1100, 100), (250, 500, 100), (96, 98, 1), (1000, 1100, 1000), (5, 5, 10)]:
        tables = list(iter_row_range(pf, start, stop, ["id"], batch))
        assert [t.num_rows for t in tables[:-1]] == [batch] * (len(tables) - 1)
        assert [x for t in tables for x in t.column("id").to_pylist()] == everything[start:stop]


# ---------------------------------------------------------------------------------------------------- determinism
def test_two_runs_are_byte_identical(tmp_path, built):
    """tokenizer + shard run twice on the same input, once with a thread pool running the units: same bytes."""
    root, _, shards, _ = built
    first = _all_files(shards)
    (tmp_path / "clean").symlink_to(root / "clean")
    with ThreadPoolExecutor(max_workers=3) as pool:
        _, again = _build(tmp_path, executor=pool)
    assert (tmp_path / "tokenizer" / "spm.model").read_bytes() == (root / "tokenizer" / "spm.model").read_bytes()
    assert _all_files(again) == first
    assert (tmp_path / "shard.json").read_bytes() == (root / "shard.json").read_bytes()


# --------------------------------------------------------------------------------------------------- verification
def test_corrupted_shard_is_named(tmp_path, built):
    _, _, shards, tok = built
    copy = tmp_path / "train"
    shutil.copytree(shards / "train", copy)
    victim = copy / "mono-00002.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    reader = ShardSet(copy, tokenizer=tok)
    tables = reader.iter_tables("mono")
    next(tables), next(tables)  # the intact shards before it still read
    with pytest.raises(ShardError, match=r"mono-00002\.parquet: checksum mismatch"):
        next(tables)
    with pytest.raises(ShardError, match="mono-00002.parquet"):
        reader.verify()


def test_tokenizer_mismatch_is_refused(tmp_path, built):
    root, _, shards, tok = built
    params_path = write_tokenizer_shard_params(tmp_path / "params.yaml", LANGS, PAIRS, tokenizer={"vocab_size": 140})
    train_tokenizer(load_params("tokenizer", params_path), root / "clean", tmp_path / "other", tmp_path / "m.json")
    other = Tokenizer.load(tmp_path / "other")
    assert other.sha256 != tok.sha256
    with pytest.raises(ShardError) as err:
        ShardSet(shards / "train", tokenizer=other)
    assert str(err.value) == (f"{shards / 'train'}: shards were made with tokenizer {tok.sha256[:12]}, but "
                              f"{tmp_path / 'other'} is {other.sha256[:12]}; rerun `dvc repro shard`")
    # ... and through the CLI: one line, exit 2, no traceback
    proc = run(python_module("pipeline.shard", "--check", "--tokenizer-dir", str(tmp_path / "other"),
                             "--out-dir", str(shards)), cwd=ROOT, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: [shard] ")
    assert "shards were made with tokenizer" in proc.stderr and "dvc repro shard" in proc.stderr
    ok = run(python_module("pipeline.shard", "--check", "--tokenizer-dir", str(root / "tokenizer"),
                           "--out-dir", str(shards)), cwd=ROOT)
    assert "ok:" in ok.stderr


def test_missing_clean_file_fails_before_touching_output(tmp_path, built):
    root, _, shards, _ = built
    shutil.copytree(root / "clean", tmp_path / "clean")
    (tmp_path / "clean" / "para" / "test.parquet").unlink()
    shutil.copytree(shards, tmp_path / "shards")
    before = _all_files(tmp_path / "shards")
    write_tokenizer_shard_params(tmp_path / "params.yaml", LANGS, PAIRS)
    proc = run(python_module("pipeline.shard", "--params", str(tmp_path / "params.yaml"), "--clean-dir",
                             str(tmp_path / "clean"), "--tokenizer-dir", str(root / "tokenizer"), "--out-dir",
                             str(tmp_path / "shards"), "--metrics", str(tmp_path / "m.json")), cwd=ROOT, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "para/test.parquet: not found; run `dvc repro clean`" in proc.stderr
    assert _all_files(tmp_path / "shards") == before and not (tmp_path / "m.json").exists()


def test_null_text_is_one_clear_error(tmp_path, built):
    root, _, _, _ = built
    shutil.copytree(root / "clean", tmp_path / "clean")
    path = tmp_path / "clean" / "mono" / "valid.parquet"
    table = pq.read_table(path)
    texts = table.column("text").to_pylist()
    texts[3] = None
    pq.write_table(table.set_column(2, "text", pa.array(texts, pa.string())), path)
    params = load_params("shard", write_tokenizer_shard_params(tmp_path / "params.yaml", LANGS, PAIRS))
    with pytest.raises(ShardError, match=r"mono/valid.parquet: column 'text' has 1 null"):
        make_shards(params, tmp_path / "clean", root / "tokenizer", tmp_path / "shards", tmp_path / "m.json")
    assert not (tmp_path / "shards").exists()


def test_wide_vocabulary_uses_int32(tmp_path):
    """vocab > 65,536 ids: the list columns switch to int32 (a real 70k-piece model, trained with byte fallback)."""
    words = [f"w{i:05d}" for i in range(80_000)]
    clean = tmp_path / "clean"
    for kind, cols in (("mono", ["id", "lang", "text"]), ("para", ["id", "src_lang", "tgt_lang", "src", "tgt"])):
        for split in ("train", "valid", "test"):
            (clean / kind).mkdir(parents=True, exist_ok=True)
            if kind == "mono":
                n = 20_000 if split == "train" else 10
                data = {"id": [f"x:{i}" for i in range(n)], "lang": ["en"] * n,
                        "text": [" ".join(words[4 * i:4 * i + 4]) for i in range(n)]}
                if split == "valid":  # never-trained word shapes: single characters, a BPE model's highest ids
                    data["text"][0] = "0w 9w 8w"
            else:
                data = {c: [] for c in cols}
            pq.write_table(pa.table(data, schema=pa.schema([(c, pa.string()) for c in cols])),
                           clean / kind / f"{split}.parquet")
    params_path = write_tokenizer_shard_params(tmp_path / "params.yaml", ["en"], tokenizer={
        "vocab_size": 66_000, "model_type": "bpe", "max_sentences": 20_000}, shard={"rows_per_shard": 50_000})
    train_tokenizer(load_params("tokenizer", params_path), clean, tmp_path / "tok", tmp_path / "t.json")
    manifests = make_shards(load_params("shard", params_path), clean, tmp_path / "tok", tmp_path / "shards",
                            tmp_path / "s.json")
    assert manifests["train"]["ids_type"] == "int32"
    table = pq.read_table(tmp_path / "shards" / "valid" / "mono-00000.parquet")
    assert table.schema.field("ids").type == pa.list_(pa.int32())
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.vocab_size == 66_002 and tok.ids_dtype == np.int32
    ids = table.column("ids").to_pylist()
    assert ids[0] == tok.encode("0w 9w 8w") and ids[1] == tok.encode("w00004 w00005 w00006 w00007")
    assert max(ids[0]) > 65_535  # ids beyond uint16 are really stored
    assert tok.decode(ids[0]) == "0w 9w 8w"


# ----------------------------------------------------------------------------------------------------------- DVC
def test_dvc_wiring(dvc_project, monkeypatch):
    """tokenizer and shard run under DVC; an edit reruns exactly the stage whose params it touches."""
    proj = dvc_project
    write_clean(proj / "data" / "clean", {"en": 150, "fr": 100, "ru": 100}, ["en-fr"])

    def configure(data):
        data["languages"], data["pairs"] = ["en", "fr", "ru"], ["en-fr"]
        data["tokenizer"].update(vocab_size=100, character_coverage=1.0, max_sentences=1000)
        data["shard"].update(rows_per_shard=100, batch_rows=100)
        # data/clean is written above, not downloaded; the source only has to be valid for the params check
        data["download"]["sources"] = [{"name": "fixture", "kind": "local", "format": "text",
                                        "languages": ["en", "fr", "ru"],
                                        "paths": {"en": "en.txt", "fr": "fr.txt", "ru": "ru.txt"}}]
    write_params(proj, configure)
    dvc(proj, "repro", "--single-item", "params")   # the stamp every stage depends on
    dvc(proj, "repro", "--single-item", "tokenizer")
    dvc(proj, "repro", "--single-item", "shard")
    assert (proj / "data" / "shards" / "train" / "manifest.json").is_file()
    assert json.loads((proj / "metrics" / "tokenizer.json").read_text())["vocab_size"] == 102

    def status() -> dict:
        # DVC's own status, in-process (the CLI would add ~2 s of start-up per call); DVC resolves paths from the cwd
        monkeypatch.chdir(proj)
        with Repo(str(proj)) as repo:
            return repo.status(targets=["tokenizer", "shard"])

    assert status() == {}
    write_params(proj, lambda d: d["shard"].update(rows_per_shard=120))
    assert set(status()) == {"shard"}
    write_params(proj, lambda d: d["tokenizer"].update(vocab_size=90))
    assert set(status()) == {"tokenizer", "shard"}
    write_params(proj, lambda d: d["shard"].update(rows_per_shard=100))
    assert set(status()) == {"tokenizer"}  # shard only sees the change once data/tokenizer is rebuilt
    dvc(proj, "repro", "--single-item", "tokenizer")
    assert set(status()) == {"shard"}
    dvc(proj, "repro", "--single-item", "shard")
    assert status() == {}
    shards = ShardSet(proj / "data" / "shards" / "train", tokenizer=Tokenizer.load(proj / "data" / "tokenizer"))
    assert shards.vocab_size == 92
