"""The sentence-transformers layout of an export: the evaluate stage's sentence embedding, loadable with
``SentenceTransformer(folder)``, beside the masked-LM files. Plain data (JSON and tensors): sentence-transformers is
not needed to write it, only to read it.

    modules.json                        Transformer -> Pooling, in sentence-transformers' classic layout (read by every
                                        version since 2.x, also by 6.x)
    sentence_bert_config.json           max_seq_length = evaluate.seq_len; next to the Transformer module's weights
    0_Transformer/                      only when the pooled layer is not the last one: an XLMRobertaModel whose
                                        num_hidden_layers = layer (the embeddings and the blocks below the layer), with
                                        the tokenizer files; layer 0 is a model of 0 blocks (its output = the embedding
                                        LayerNorm's). For the last layer the Transformer module is the folder itself.
    1_Pooling/config.json               the mean over the real tokens (attention_mask)
    config_sentence_transformers.json   the similarity (cosine), no prompts
    embedding_recipe.json               the whole recipe, machine-readable: layer, pooling, max_seq_length, centering,
                                        scoring (what sentence-transformers cannot hold: centering each side of a pair
                                        of collections and the ratio margin are steps on the encoded vectors)

Why it reproduces ``xlm_core.metrics.pooled_embeddings`` exactly: that function encodes ``<s> pieces[:seq_len - 2]
</s>``, runs the embeddings and the first ``layer`` blocks, and averages over the real tokens; the tokenizer's
truncation to max_seq_length keeps the same pieces and both special tokens, XLM-R's ``hidden_states[k]`` is the output
of block k (0 = the embeddings), and a post-LN model (the only kind that exports) has no final LayerNorm after the
last block. Positions differ only at padding, which attention and the mean both ignore.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from xlm_core.model_config import ModelConfig

RECIPE_FILE = "embedding_recipe.json"
TRANSFORMER_DIR = "0_Transformer"
POOLING_DIR = "1_Pooling"
TOKENIZER_FILES = ("sentencepiece.bpe.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SCORINGS = ("cosine", "margin")


@dataclass(frozen=True)
class EmbeddingRecipe:
    """How the evaluate stage embeds a sentence and scores retrieval (evaluate.layer resolved to a number)."""

    layer: int            # hidden layer mean-pooled: 0 = embeddings output, n_layers = the last block's
    n_layers: int
    max_seq_length: int   # tokens per sentence, <s> and </s> included (evaluate.seq_len)
    center: bool          # for a pair of collections, subtract each side's mean vector
    scoring: str          # cosine | margin (ratio margin over margin_k neighbours)
    margin_k: int
    language_embeddings: bool   # the model adds a language embedding: token_type_ids = the language's id

    def __post_init__(self) -> None:
        if not 0 <= self.layer <= self.n_layers:
            raise ValueError(f"layer {self.layer}: this model has layers 0..{self.n_layers}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring {self.scoring!r}: allowed: {', '.join(SCORINGS)}")
        if self.max_seq_length < 3:
            raise ValueError(f"max_seq_length {self.max_seq_length}: need room for <s>, one piece and </s>")

    @property
    def transformer_path(self) -> str:
        """The Transformer module's folder inside the export ("" = the export itself)."""
        return "" if self.layer == self.n_layers else TRANSFORMER_DIR

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "num_hidden_layers": self.n_layers,
            "layer_meaning": "hidden_states[layer] of XLMRobertaModel with output_hidden_states=True "
                             "(0 = the embeddings' output, num_hidden_layers = last_hidden_state)",
            "pooling": "mean over the real tokens (attention_mask), <s> and </s> included",
            "max_seq_length": self.max_seq_length,
            "truncation": "<s>, the first max_seq_length - 2 pieces, </s> (the tokenizer's truncation=True)",
            "centering": "per_language_mean" if self.center else "none",
            "centering_meaning": ("after encoding, for a pair of collections, subtract each side's mean vector from "
                                  "that side's vectors (the queries and the candidates, one language each)"
                                  if self.center else "none"),
            "scoring": self.scoring,
            "scoring_meaning": ("cosine similarity, top-1 nearest neighbour" if self.scoring == "cosine" else
                                f"ratio margin of cosine similarities over {self.margin_k} neighbours each way "
                                f"(Artetxe & Schwenk, 2019), top-1"),
            "margin_k": self.margin_k,
            "language_embeddings": self.language_embeddings,
            "sentence_transformers_module": self.transformer_path or ".",
        }


def transformer_weights(hf_weights: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """XLMRobertaModel's weights of the embeddings and blocks 0..layer-1, from XLMRobertaForMaskedLM's."""
    blocks = tuple(f"roberta.encoder.layer.{i}." for i in range(layer))
    return {name[len("roberta."):]: tensor for name, tensor in hf_weights.items()
            if name.startswith("roberta.embeddings.") or name.startswith(blocks)}


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def layout_files(recipe: EmbeddingRecipe, config: ModelConfig, hf_config_json: dict[str, Any],
                 hf_weights: dict[str, torch.Tensor], root_files: dict[str, bytes]
                 ) -> tuple[dict[str, bytes], dict[str, dict[str, torch.Tensor]]]:
    """(files by relative path, safetensors by relative path) of the layout; ``root_files`` are the export's own
    files (the tokenizer files are copied from them into 0_Transformer/)."""
    if config.pre_ln:
        raise ValueError("pre_ln = True: a final LayerNorm follows the last block, which XLM-R cannot represent")
    # ST 2.x-6.x all read model_args; add_pooling_layer=False: XLMRobertaModel without the (untrained) pooler
    st_config = _dump({"max_seq_length": recipe.max_seq_length, "do_lower_case": False,
                       "model_args": {"add_pooling_layer": False}})
    files: dict[str, bytes] = {
        "modules.json": _dump([
            {"idx": 0, "name": "0", "path": recipe.transformer_path, "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"}]),
        f"{POOLING_DIR}/config.json": _dump({
            "word_embedding_dimension": config.d_model, "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False}),
        "config_sentence_transformers.json": _dump({"model_type": "SentenceTransformer", "prompts": {},
                                                    "default_prompt_name": None, "similarity_fn_name": "cosine"}),
        RECIPE_FILE: _dump(recipe.to_json()),
    }
    weights: dict[str, dict[str, torch.Tensor]] = {}
    if recipe.transformer_path:
        sub = recipe.transformer_path
        truncated = {**hf_config_json, "architectures": ["XLMRobertaModel"], "num_hidden_layers": recipe.layer}
        files[f"{sub}/config.json"] = _dump(truncated)
        files[f"{sub}/sentence_bert_config.json"] = st_config
        for name in TOKENIZER_FILES:
            files[f"{sub}/{name}"] = root_files[name]
        weights[f"{sub}/model.safetensors"] = transformer_weights(hf_weights, recipe.layer)
    else:
        files["sentence_bert_config.json"] = st_config
    return files, weights
