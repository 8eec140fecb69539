"""Convert between our state dict and Hugging Face's XLMRobertaForMaskedLM, without importing transformers.

``XLMRobertaStateDictAdapter(config)`` has ``to_hf(state_dict)`` and ``from_hf(hf_state_dict)`` (torchtitan's
StateDictAdapter shape); ``to_hf(state_dict, config)`` and ``from_hf(hf_state_dict, hf_config_dict)`` are the same
conversions as functions, the latter reading the ModelConfig from an XLM-R config.json dict (``config_from_hf``).

The mapping, ours -> HF (L = layer index):
    tok_emb.weight              roberta.embeddings.word_embeddings.weight  and  lm_head.decoder.weight (tied)
    pos_emb.weight [P, d]       roberta.embeddings.position_embeddings.weight [P + pad_id + 1, d]: HF numbers real
                                tokens from padding_idx + 1 = 2, so 2 leading rows are unused (exported as zeros)
    lang_emb.weight             roberta.embeddings.token_type_embeddings.weight (type_vocab_size = n_languages;
                                without language embeddings: one zero row, so token_type_ids = 0 adds nothing)
    emb_ln                      roberta.embeddings.LayerNorm
    blocks.L.attn.qkv [3d, d]   roberta.encoder.layer.L.attention.self.{query,key,value} (split in thirds)
    blocks.L.attn.proj          roberta.encoder.layer.L.attention.output.dense
    blocks.L.attn_ln            roberta.encoder.layer.L.attention.output.LayerNorm
    blocks.L.ffn.fc_in / fc_out roberta.encoder.layer.L.intermediate.dense / output.dense
    blocks.L.ffn_ln             roberta.encoder.layer.L.output.LayerNorm
    mlm_head.dense / ln         lm_head.dense / lm_head.layer_norm
    mlm_head.bias               lm_head.bias  and  lm_head.decoder.bias (tied)

A model trained with language embeddings is used in HF by passing token_type_ids = language ids. Sinusoidal
positions export as their (fixed) table. Pre-LN blocks have no XLM-R equivalent and are refused.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from xlm_core.model import fixed_position_table
from xlm_core.model_config import ModelConfig
from xlm_core.special_tokens import BOS, EOS

Tensor = torch.Tensor

_LAYER = "roberta.encoder.layer.{i}."
# (our suffix, HF suffix) inside one block, for everything but the fused QKV.
_BLOCK_NAMES = [
    ("attn.proj.weight", "attention.output.dense.weight"),
    ("attn.proj.bias", "attention.output.dense.bias"),
    ("attn_ln.weight", "attention.output.LayerNorm.weight"),
    ("attn_ln.bias", "attention.output.LayerNorm.bias"),
    ("ffn.fc_in.weight", "intermediate.dense.weight"),
    ("ffn.fc_in.bias", "intermediate.dense.bias"),
    ("ffn.fc_out.weight", "output.dense.weight"),
    ("ffn.fc_out.bias", "output.dense.bias"),
    ("ffn_ln.weight", "output.LayerNorm.weight"),
    ("ffn_ln.bias", "output.LayerNorm.bias"),
]
_TOP_NAMES = [
    ("emb_ln.weight", "roberta.embeddings.LayerNorm.weight"),
    ("emb_ln.bias", "roberta.embeddings.LayerNorm.bias"),
    ("mlm_head.dense.weight", "lm_head.dense.weight"),
    ("mlm_head.dense.bias", "lm_head.dense.bias"),
    ("mlm_head.ln.weight", "lm_head.layer_norm.weight"),
    ("mlm_head.ln.bias", "lm_head.layer_norm.bias"),
    ("mlm_head.bias", "lm_head.bias"),
]
_QKV = ("query", "key", "value")
# Keys of HF checkpoints that carry nothing we need (the pooler of XLMRobertaModel, non-persistent buffers).
_IGNORED_PREFIXES = ("roberta.pooler.", "roberta.embeddings.position_ids", "roberta.embeddings.token_type_ids")


def _position_offset(config: ModelConfig) -> int:
    return config.pad_id + 1


def _check_exportable(config: ModelConfig) -> None:
    if config.pre_ln:
        raise ValueError("pre_ln = True cannot be exported to XLM-R, which is post-LayerNorm only; "
                         "train with pre_ln: false to get a Hugging Face model")


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """The config.json dict of the exported model (transformers.XLMRobertaConfig(**hf_config(cfg)) builds it)."""
    _check_exportable(config)
    return {
        "model_type": "xlm-roberta",
        "architectures": ["XLMRobertaForCausalLM" if config.causal else "XLMRobertaForMaskedLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "intermediate_size": config.d_ff,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "max_position_embeddings": config.max_positions + _position_offset(config),
        "type_vocab_size": config.n_languages if config.use_lang_emb else 1,
        "initializer_range": config.init_std,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": config.pad_id,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
        "is_decoder": config.causal,  # HF's switch for causal self-attention
    }


def config_from_hf(hf_config_dict: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig for an XLM-R config.json dict; refuses what our architecture cannot represent."""
    def need(key: str) -> Any:
        if key not in hf_config_dict:
            raise ValueError(f"from_hf: config has no '{key}'")
        return hf_config_dict[key]

    model_type = hf_config_dict.get("model_type", "xlm-roberta")
    if model_type not in ("xlm-roberta", "roberta"):
        raise ValueError(f"from_hf: model_type = {model_type!r}; only xlm-roberta (or roberta) checkpoints map here")
    if need("hidden_act") != "gelu":
        raise ValueError(f"from_hf: hidden_act = {hf_config_dict['hidden_act']!r}; only exact 'gelu' is supported")
    if hf_config_dict.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"from_hf: position_embedding_type = {hf_config_dict['position_embedding_type']!r}; "
                         f"only 'absolute' is supported")
    pad_id = int(hf_config_dict.get("pad_token_id", 1))
    type_vocab_size = int(hf_config_dict.get("type_vocab_size", 1))
    return ModelConfig(
        vocab_size=int(need("vocab_size")),
        n_layers=int(need("num_hidden_layers")),
        d_model=int(need("hidden_size")),
        n_heads=int(need("num_attention_heads")),
        d_ff=int(need("intermediate_size")),
        max_positions=int(need("max_position_embeddings")) - (pad_id + 1),
        dropout=float(hf_config_dict.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(hf_config_dict.get("attention_probs_dropout_prob", 0.1)),
        # One token type (XLM-R's own checkpoints): no language embedding; its row is folded into the positions.
        n_languages=type_vocab_size,
        use_lang_emb=type_vocab_size > 1,
        causal=bool(hf_config_dict.get("is_decoder", False)),
        layer_norm_eps=float(hf_config_dict.get("layer_norm_eps", 1e-5)),
        pad_id=pad_id,
        init_std=float(hf_config_dict.get("initializer_range", 0.02)),
    )


class XLMRobertaStateDictAdapter:
    """Our ``XLMModel`` state dict <-> Hugging Face's XLMRobertaForMaskedLM, for one ``ModelConfig`` (the mapping in the
    module docstring). ``for_hf_config`` builds it from an XLM-R config.json dict."""

    def __init__(self, config: ModelConfig):
        self.config = config

    @classmethod
    def for_hf_config(cls, hf_config_dict: Mapping[str, Any]) -> "XLMRobertaStateDictAdapter":
        return cls(config_from_hf(hf_config_dict))

    def to_hf(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Our state dict -> XLMRobertaForMaskedLM's, loadable with strict=True.

        Every tensor is its own contiguous copy (tied weights are duplicated), so safetensors.save_file accepts it.
        """
        config = self.config
        _check_exportable(config)
        sd = dict(state_dict)
        d = config.d_model
        out: dict[str, Tensor] = {}

        def take(key: str) -> Tensor:
            if key not in sd:
                raise ValueError(f"to_hf: state dict has no '{key}' (a wrapped model's keys? pass model.state_dict() "
                                 f"of the XLMModel itself, without 'module.' or '_orig_mod.' prefixes)")
            return sd.pop(key)

        word = take("tok_emb.weight")
        out["roberta.embeddings.word_embeddings.weight"] = word
        out["lm_head.decoder.weight"] = word
        if config.positions == "learned":
            positions = take("pos_emb.weight")
        else:
            positions = fixed_position_table(config).to(word.dtype)
        unused_rows = positions.new_zeros(_position_offset(config), d)
        out["roberta.embeddings.position_embeddings.weight"] = torch.cat([unused_rows, positions])
        if config.use_lang_emb:
            out["roberta.embeddings.token_type_embeddings.weight"] = take("lang_emb.weight")
        else:
            out["roberta.embeddings.token_type_embeddings.weight"] = word.new_zeros(1, d)
        for ours, theirs in _TOP_NAMES:
            out[theirs] = take(ours)
        out["lm_head.decoder.bias"] = out["lm_head.bias"]

        for i in range(config.n_layers):
            prefix, hf = f"blocks.{i}.", _LAYER.format(i=i)
            for kind in ("weight", "bias"):
                for name, part in zip(_QKV, take(f"{prefix}attn.qkv.{kind}").split(d, dim=0)):
                    out[f"{hf}attention.self.{name}.{kind}"] = part
            for ours, theirs in _BLOCK_NAMES:
                out[hf + theirs] = take(prefix + ours)

        if sd:
            raise ValueError(f"to_hf: state dict has entries this config does not explain: {sorted(sd)[:5]}")
        return {name: tensor.detach().clone().contiguous() for name, tensor in out.items()}

    def from_hf(self, hf_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """XLMRobertaForMaskedLM (or ForCausalLM) state dict -> ours, for ``XLMModel(self.config)``."""
        config = self.config
        sd = {k: v for k, v in hf_state_dict.items() if not k.startswith(_IGNORED_PREFIXES)}
        d = config.d_model

        def take(key: str) -> Tensor:
            if key not in sd:
                raise ValueError(f"from_hf: checkpoint has no '{key}' (is it an XLMRobertaForMaskedLM state dict?)")
            return sd.pop(key)

        out: dict[str, Tensor] = {}
        word = take("roberta.embeddings.word_embeddings.weight")
        out["tok_emb.weight"] = word
        decoder = sd.pop("lm_head.decoder.weight", None)
        if decoder is not None and not torch.equal(decoder, word):
            raise ValueError("from_hf: lm_head.decoder.weight differs from the word embeddings; "
                             "only tied decoders (XLM-R's) are supported")
        decoder_bias = sd.pop("lm_head.decoder.bias", None)
        positions = take("roberta.embeddings.position_embeddings.weight")[config.pad_id + 1:]
        token_types = take("roberta.embeddings.token_type_embeddings.weight")
        if config.use_lang_emb:
            out["lang_emb.weight"] = token_types
            out["pos_emb.weight"] = positions
        else:  # HF always adds token type 0; adding it to every position row is exactly equivalent
            out["pos_emb.weight"] = positions + token_types[0]
        for ours, theirs in _TOP_NAMES:
            out[ours] = take(theirs)
        if decoder_bias is not None and not torch.equal(decoder_bias, out["mlm_head.bias"]):
            raise ValueError("from_hf: lm_head.decoder.bias differs from lm_head.bias; the checkpoint is inconsistent")

        for i in range(config.n_layers):
            prefix, hf = f"blocks.{i}.", _LAYER.format(i=i)
            for kind in ("weight", "bias"):
                out[f"{prefix}attn.qkv.{kind}"] = torch.cat([take(f"{hf}attention.self.{n}.{kind}") for n in _QKV])
            for ours, theirs in _BLOCK_NAMES:
                out[prefix + ours] = take(hf + theirs)

        if sd:
            raise ValueError(f"from_hf: checkpoint has entries XLM-R's masked LM does not: {sorted(sd)[:5]}")
        if out["pos_emb.weight"].shape[0] != config.max_positions or word.shape != (config.vocab_size, d):
            raise ValueError("from_hf: tensor shapes do not match the config (vocab_size / max_position_embeddings)")
        return {name: tensor.detach().clone().contiguous() for name, tensor in out.items()}


def to_hf(state_dict: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Our state dict -> XLMRobertaForMaskedLM's (``XLMRobertaStateDictAdapter(config).to_hf``)."""
    return XLMRobertaStateDictAdapter(config).to_hf(state_dict)


def from_hf(hf_state_dict: Mapping[str, Tensor], hf_config_dict: Mapping[str, Any]
            ) -> tuple[dict[str, Tensor], ModelConfig]:
    """XLMRobertaForMaskedLM (or ForCausalLM) state dict + config.json dict -> (our state dict, ModelConfig)."""
    adapter = XLMRobertaStateDictAdapter.for_hf_config(hf_config_dict)
    return adapter.from_hf(hf_state_dict), adapter.config
