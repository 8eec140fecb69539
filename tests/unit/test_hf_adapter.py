"""xlm_core.hf: our weights in transformers' XLMRobertaForMaskedLM give the same logits, and back again."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import XLMRobertaConfig, XLMRobertaForCausalLM, XLMRobertaForMaskedLM

from tests.helpers.project import ROOT, project_env
from xlm_core.hf import from_hf, hf_config, to_hf
from xlm_core.model import XLMModel
from xlm_core.model_config import ModelConfig
from xlm_core.special_tokens import PAD

VOCAB = 120


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.preset("tiny", **{"vocab_size": VOCAB, "dropout": 0.0, "attention_dropout": 0.0, **overrides})


def random_model(cfg: ModelConfig, seed: int = 0) -> XLMModel:
    """Random weights everywhere (not only init's zeros and ones), so every tensor's mapping is exercised."""
    torch.manual_seed(seed)
    model = XLMModel(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, VOCAB - 1, (4, 13), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 0
    for row, length in enumerate([13, 9, 4, 11]):
        ids[row, length - 1] = 2
        ids[row, length:] = PAD
    return ids, ids != PAD


def hf_model(cfg: ModelConfig, state_dict: dict, cls=XLMRobertaForMaskedLM):
    model = cls(XLMRobertaConfig(**hf_config(cfg))).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


@pytest.mark.parametrize("use_lang_emb", [False, True])
def test_exported_model_gives_the_same_logits_in_transformers(use_lang_emb):
    cfg = tiny(n_languages=3, use_lang_emb=use_lang_emb)
    ours = random_model(cfg)
    theirs = hf_model(cfg, to_hf(ours.state_dict(), cfg))
    ids, real = padded_batch()
    langs = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        our_logits = ours.mlm_logits(ours(ids, lang_ids=langs if use_lang_emb else None).hidden)
        token_type_ids = langs[:, None].expand_as(ids) if use_lang_emb else None
        hf_logits = theirs(input_ids=ids, attention_mask=real.long(), token_type_ids=token_type_ids).logits
    assert our_logits.shape == hf_logits.shape == (4, 13, VOCAB)
    assert (our_logits - hf_logits)[real].abs().max().item() <= 1e-4


@pytest.mark.parametrize("type_vocab_size", [1, 3])
def test_from_hf_reproduces_hf_logits(type_vocab_size):
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=40, type_vocab_size=type_vocab_size,
                              layer_norm_eps=1e-5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    theirs = XLMRobertaForMaskedLM(config).eval()
    with torch.no_grad():  # HF's init leaves the bias and LayerNorms trivial: make them matter
        for param in theirs.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    state_dict, cfg = from_hf(theirs.state_dict(), config.to_dict())
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, cfg.max_positions) == (32, 2, 4, 64, 38)
    assert cfg.use_lang_emb == (type_vocab_size > 1) and cfg.n_languages == type_vocab_size
    ours = XLMModel(cfg).eval()
    ours.load_state_dict(state_dict, strict=True)
    ids, real = padded_batch()
    langs = torch.tensor([2, 0, 1, 1]) % type_vocab_size
    with torch.no_grad():
        # an XLM-R checkpoint's single token type is folded into the positions: no lang_ids needed then
        our_logits = ours.mlm_logits(ours(ids, lang_ids=langs if cfg.use_lang_emb else None).hidden)
        hf_logits = theirs(input_ids=ids, attention_mask=real.long(), token_type_ids=langs[:, None].expand_as(ids)).logits
    assert (our_logits - hf_logits)[real].abs().max().item() <= 1e-4


def test_round_trip_is_exact():
    cfg = tiny(n_languages=4, use_lang_emb=True)
    original = random_model(cfg).state_dict()
    state_dict, config = from_hf(to_hf(original, cfg), hf_config(cfg))
    assert config == cfg
    assert state_dict.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(state_dict[name], tensor), name


def test_hf_config_fields():
    cfg = ModelConfig.preset("base", vocab_size=8002, n_languages=5, use_lang_emb=True, layer_norm_eps=1e-5)
    config = hf_config(cfg)
    assert config["model_type"] == "xlm-roberta" and config["architectures"] == ["XLMRobertaForMaskedLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["intermediate_size"]) == (768, 12, 12, 3072)
    assert config["max_position_embeddings"] == 514 and config["type_vocab_size"] == 5
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (1, 0, 2)
    assert config["hidden_act"] == "gelu" and config["position_embedding_type"] == "absolute"
    assert config["vocab_size"] == 8002 and config["layer_norm_eps"] == 1e-5
    assert hf_config(tiny())["type_vocab_size"] == 1
    exported = to_hf(XLMModel(tiny()).state_dict(), tiny())
    assert torch.count_nonzero(exported["roberta.embeddings.token_type_embeddings.weight"]) == 0
    assert torch.count_nonzero(exported["roberta.embeddings.position_embeddings.weight"][:2]) == 0


def test_sinusoidal_and_causal_models_export():
    ids, real = padded_batch()
    for cfg, cls in [(tiny(positions="sinusoidal"), XLMRobertaForMaskedLM), (tiny(causal=True), XLMRobertaForCausalLM)]:
        ours = random_model(cfg)
        config = hf_config(cfg)
        assert config["architectures"] == [cls.__name__] and config["is_decoder"] == cfg.causal
        theirs = hf_model(cfg, to_hf(ours.state_dict(), cfg), cls)
        with torch.no_grad():
            diff = ours.mlm_logits(ours(ids).hidden) - theirs(input_ids=ids, attention_mask=real.long()).logits
        assert diff[real].abs().max().item() <= 1e-4, cfg


def test_export_refusals_and_import_errors():
    with pytest.raises(ValueError, match="pre_ln"):
        hf_config(tiny(pre_ln=True))
    with pytest.raises(ValueError, match="pre_ln"):
        to_hf(XLMModel(tiny(pre_ln=True)).state_dict(), tiny(pre_ln=True))
    cfg = tiny()
    model = random_model(cfg)
    with pytest.raises(ValueError, match="_orig_mod"):
        to_hf({f"module.{k}": v for k, v in model.state_dict().items()}, cfg)
    with pytest.raises(ValueError, match="does not explain"):
        to_hf(model.state_dict(), tiny(n_layers=1))
    exported = to_hf(model.state_dict(), cfg)
    untied = {**exported, "lm_head.decoder.weight": exported["lm_head.decoder.weight"] + 1}
    with pytest.raises(ValueError, match="tied"):
        from_hf(untied, hf_config(cfg))
    missing = {k: v for k, v in exported.items() if "layer.1.output.dense" not in k}
    with pytest.raises(ValueError, match="layer.1.output.dense"):
        from_hf(missing, hf_config(cfg))
    with pytest.raises(ValueError, match="hidden_act"):
        from_hf(exported, {**hf_config(cfg), "hidden_act": "gelu_new"})
    extra = {**exported, "roberta.pooler.dense.weight": torch.zeros(2), "classifier.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match="classifier.weight"):
        from_hf(extra, hf_config(cfg))


def test_export_saves_with_safetensors(tmp_path):
    cfg = tiny()
    exported = to_hf(random_model(cfg).state_dict(), cfg)
    save_file(exported, tmp_path / "model.safetensors")  # refuses shared tensors; ours are separate copies
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == exported.keys()
    assert torch.equal(loaded["lm_head.decoder.weight"], loaded["roberta.embeddings.word_embeddings.weight"])


def test_xlm_core_does_not_import_transformers():
    code = ("import sys, xlm_core.model, xlm_core.objectives, xlm_core.hf; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=project_env(), check=True)
