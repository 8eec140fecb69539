"""xlm_core.model_dir: what save_model_dir writes, load_model_dir reads back whole, and refuses once damaged."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from xlm_core.atomic import sha256_file, write_json
from xlm_core.model import XLMModel
from xlm_core.model_config import ModelConfig
from xlm_core.model_dir import DISCRIMINATOR, ModelDirError, load_model_dir, save_model_dir
from xlm_core.adversary import LanguageDiscriminator
from xlm_core.tokenizer import Tokenizer, id_layout

LANGS = ["en", "fr"]


def train_tokenizer(folder: Path, vocab: int, seed_text: str) -> Tokenizer:
    """A real sentencepiece model and the tokenizer.json Tokenizer.load checks it against (as pipeline.tokenizer)."""
    folder.mkdir(parents=True)
    corpus = folder.parent / f"{folder.name}.txt"
    corpus.write_text("".join(f"{seed_text} number {i} and the sea {i % 7}\n" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "spm"), vocab_size=vocab,
                                   model_type="unigram", minloglevel=2)
    layout = id_layout(spm.SentencePieceProcessor(model_file=str(folder / "spm.model")).get_piece_size())
    write_json(folder / "tokenizer.json", {"layout": layout, "vocab_size": layout["vocab_size"],
                                           "spm_model": "spm.model", "spm_sha256": sha256_file(folder / "spm.model")})
    return Tokenizer.load(folder)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_dir")
    tok = train_tokenizer(root / "tokenizer", 40, "the light of day")
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, n_languages=len(LANGS))
    torch.manual_seed(0)
    state = XLMModel(cfg).state_dict()
    disc = LanguageDiscriminator(cfg.d_model, len(LANGS), hidden=16).state_dict()
    training = {"pretrain": {"objectives": {"mlm": 1.0}}, "discriminator_layer": 1, "valid": {"mlm_loss/en": 3.5}}
    save_model_dir(root / "model", config=cfg, state=state, tokenizer_dir=root / "tokenizer", languages=LANGS,
                   pairs=["en-fr"], discriminator=disc, training=training)
    return root, cfg, state, disc, training


def test_round_trip(saved):
    root, cfg, state, disc, training = saved
    model = load_model_dir(root / "model")
    assert model.config == cfg and model.languages == LANGS and model.pairs == ["en-fr"]
    assert model.training == training and model.tokenizer.vocab_size == cfg.vocab_size
    assert model.state.keys() == state.keys() and all(torch.equal(model.state[k], v) for k, v in state.items())
    assert model.discriminator.keys() == disc.keys()
    assert load_model_dir(root / "model", with_discriminator=False).discriminator is None
    assert not list(root.glob("*.tmp-*"))


def copy(root: Path, name: str) -> Path:
    target = root / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(root / "model", target)
    return target


@pytest.mark.parametrize("damage", ["weights", "discriminator", "tokenizer", "missing", "format"])
def test_a_damaged_folder_is_refused_in_one_line(saved, damage):
    root = saved[0]
    folder = copy(root, f"damaged-{damage}")
    if damage in ("weights", "discriminator"):
        file = folder / ("model.safetensors" if damage == "weights" else DISCRIMINATOR)
        data = bytearray(file.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 100] = bytes(100)
        file.write_bytes(bytes(data))
        fragment = f"{file}: its bytes differ"
    elif damage == "tokenizer":     # another run's tokenizer (same vocabulary size) copied in
        other = train_tokenizer(root / "other-tokenizer", 40, "a king of the city").model_path.parent
        for name in ("spm.model", "tokenizer.json"):
            shutil.copy(other / name, folder / name)
        fragment = "replaced by another run's file"
    elif damage == "missing":
        (folder / "spm.vocab").unlink()
        fragment = f"{folder / 'spm.vocab'}: not found"
    else:
        meta = json.loads((folder / "config.json").read_text())
        meta["format"] = 1
        (folder / "config.json").write_text(json.dumps(meta))
        fragment = "format 1, this code reads format 2"
    with pytest.raises(ModelDirError) as info:
        load_model_dir(folder)
    assert fragment in str(info.value) and "\n" not in str(info.value) and "dvc repro pretrain" in str(info.value)
