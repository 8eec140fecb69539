"""A tiny real model run (clean -> tokenizer -> shards -> data/model) for the evaluate and export stage tests."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import torch
import yaml

from tests.helpers.corpora import write_clean, write_tokenizer_shard_params
from pipeline.params import load_params
from pipeline.shard import make_shards
from pipeline.tokenizer import train_tokenizer
from xlm_core.model import XLMModel
from xlm_core.model_config import ModelConfig
from xlm_core.model_dir import save_model_dir
from xlm_core.adversary import LanguageDiscriminator
from xlm_core.evaluation.bible_genres import GENRE_BOOKS
from xlm_core.tokenizer import Tokenizer

LANGS = ["en", "fr", "ru", "ar"]
PAIRS = ["en-fr", "en-ru", "en-ar"]
ROWS = {"en": 400, "fr": 300, "ru": 300, "ar": 300}   # test split: a tenth of each


def bible_verse_id(split: str, k: int) -> str:
    """Segment k of a fixture split as a verse id: consecutive segments cycle through the six genres (and through
    each genre's books), and chapter = the split, so every (split, k) gets its own id."""
    _genre, first, last = GENRE_BOOKS[k % len(GENRE_BOOKS)]
    book = first + (k // len(GENRE_BOOKS)) % (last - first + 1)
    return f"bible:{book:03d}.{1 + ('train', 'valid', 'test').index(split):03d}.{1 + k:03d}"


def _use_bible_ids(clean_dir: Path) -> None:
    """Rewrite the clean fixture's ids (``fixture:<split>.<k>``) as Bible verse ids, mono and para alike."""
    for path in sorted(clean_dir.glob("*/*.parquet")):
        table = pq.read_table(path)
        ids = []
        for seg_id in table.column("id").to_pylist():
            split, k = seg_id.split(":")[1].split(".")
            ids.append(bible_verse_id(split, int(k)))
        pq.write_table(table.set_column(table.schema.get_field_index("id"), "id", [ids]), path)


def build_run(root: Path, *, use_lang_emb: bool = False, adversarial: bool = True, causal: bool = False,
              objectives: dict | None = None, evaluate_section: dict | None = None,
              export_section: dict | None = None, vocab_size: int = 150, bible_ids: bool = False) -> Path:
    """clean -> tokenizer -> shards -> data/model (xlm_core.model_dir.save_model_dir), all under ``root``.

    ``bible_ids``: segment ids are Bible verse ids (``bible:BBB.CCC.VVV``, all six genres), like the default corpus's.

    The model is a randomly initialised tiny preset: the stage's wiring is what is tested here; the metrics' maths
    is tested on constructed embeddings with known answers.
    """
    params_path = write_tokenizer_shard_params(root / "params.yaml", LANGS, PAIRS, tokenizer={"vocab_size": vocab_size})
    data = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    data["evaluate"] = {"batch_size": 16, "max_batches": 2, "seq_len": 64, "device": "cpu",
                        **(evaluate_section or {})}
    data["export"] = {"name": "tiny-test", **(export_section or {})}
    params_path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    write_clean(root / "clean", ROWS, PAIRS)
    if bible_ids:
        _use_bible_ids(root / "clean")
    train_tokenizer(load_params("tokenizer", params_path), root / "clean", root / "tokenizer", root / "tok.json")
    make_shards(load_params("shard", params_path), root / "clean", root / "tokenizer", root / "shards",
                root / "shard.json")
    tok = Tokenizer.load(root / "tokenizer")
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, n_languages=len(LANGS), use_lang_emb=use_lang_emb,
                             dropout=0.0, attention_dropout=0.0, causal=causal)
    torch.manual_seed(7)
    model = XLMModel(cfg)
    disc = LanguageDiscriminator(cfg.d_model, len(LANGS), hidden=32) if adversarial else None
    pretrain = {"objectives": objectives or {"mlm": 1.0, "tlm": 0.5},
                "adversarial": {"weight": 0.05 if adversarial else 0.0, "layer": None, "lambda_max": 0.1},
                "steps": 10, "batch_size": 8, "seq_len": 64, "mode": "stream", "masking": {"rate": 0.15},
                "optimizer": {"lr": 0.001, "schedule": "linear"}}
    manifest = json.loads((root / "shards" / "train" / "manifest.json").read_text())
    training = {"pretrain": pretrain, "discriminator_layer": 1 if adversarial else None,
                "discriminator_hidden": 32 if adversarial else None,
                "train_tokens": {"languages": manifest["languages"], "pairs": manifest.get("pairs", {})},
                "valid": {"mlm_accuracy/en": 0.25}, "steps": 10}
    save_model_dir(root / "model", config=cfg, state=model.state_dict(), tokenizer_dir=root / "tokenizer",
                   languages=LANGS, pairs=PAIRS, discriminator=disc.state_dict() if disc is not None else None,
                   training=training)
    return params_path


def set_section(params_path: Path, section: str, **values) -> None:
    data = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    data[section].update(values)
    params_path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
