"""The `export` stage: data/model/ -> data/export/hf/, a Hugging Face XLM-R folder that loads offline.

    config.json                 XLMRobertaConfig (xlm_core.hf.hf_config), plus lang2id/id2lang with language embeddings
    model.safetensors           XLMRobertaForMaskedLM weights (xlm_core.hf.XLMRobertaStateDictAdapter), in export.dtype
    sentencepiece.bpe.model     our spm.model (XLM-R's file name)
    tokenizer.json              the fast tokenizer, built from the sentencepiece model (xlm_core.hf_tokenizer)
    tokenizer_config.json, special_tokens_map.json
    README.md                   the model card (pipeline.model_card), with the embedding recipe
    modules.json, 1_Pooling/, sentence_bert_config.json or 0_Transformer/, config_sentence_transformers.json,
    embedding_recipe.json       the sentence-transformers layout (xlm_core.sentence_transformers_layout): the vectors
                                the evaluate stage retrieves with (evaluate.layer, evaluate.seq_len; the centering and
                                scoring it applies after, evaluate.center and evaluate.scoring, in the recipe file)

Everything is read from the model folder (xlm_core.model_dir.load_model_dir, which refuses a damaged or mixed-up
folder) and computed in memory before the output folder is written, whole, under a temporary name.
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import PipelineError, disk_full_is_an_error, run_cli
from pipeline.model_card import model_card
from pipeline.params import StageParams, load_params
from xlm_core.atomic import atomic_dir
from xlm_core.hf import XLMRobertaStateDictAdapter, hf_config
from xlm_core.hf_tokenizer import read_spm_model, special_tokens_map, tokenizer_config, tokenizer_json
from xlm_core.model_config import ModelConfig, default_layer
from xlm_core.model_dir import load_model_dir
from xlm_core.sentence_transformers_layout import EmbeddingRecipe, layout_files
from xlm_core.tokenizer import SPM_MODEL

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class Exported:
    files: dict[str, bytes]                  # relative path -> content, everything but the weights
    weights: dict[str, dict[str, torch.Tensor]]   # relative path of a .safetensors file -> its tensors


def embedding_recipe(evaluate: StageParams, config: ModelConfig) -> EmbeddingRecipe:
    """The evaluate stage's sentence embedding and retrieval scoring, from params.yaml's evaluate section."""
    ev = evaluate.evaluate
    layer = default_layer(config.n_layers) if ev.layer is None else ev.layer
    if layer > config.n_layers:
        raise PipelineError(f"params.yaml: evaluate.layer = {ev.layer}: this model has layers 0..{config.n_layers} "
                            f"(0 = embeddings); use null for the middle one")
    if ev.seq_len > config.max_positions:
        raise PipelineError(f"params.yaml: evaluate.seq_len = {ev.seq_len} exceeds the model's max_positions = "
                            f"{config.max_positions}; lower it")
    return EmbeddingRecipe(layer=layer, n_layers=config.n_layers, max_seq_length=ev.seq_len, center=ev.center,
                           scoring=ev.scoring, margin_k=ev.margin_k, language_embeddings=config.use_lang_emb)


def prepare_export(params: StageParams, evaluate: StageParams, model_dir: Path) -> Exported:
    """Everything the folder will hold, computed (and validated) in memory before anything is written."""
    xp = params.export
    model = load_model_dir(model_dir, with_discriminator=False)
    config, tokenizer = model.config, model.tokenizer
    if config.pre_ln:
        raise PipelineError("data/model was trained with pretrain.model.pre_ln = true, which XLM-R (post-LayerNorm) "
                            "cannot represent; retrain with pre_ln: false to export a Hugging Face model")
    recipe = embedding_recipe(evaluate, config)
    try:
        weights = {k: v.to(DTYPES[xp.dtype]).contiguous()
                   for k, v in XLMRobertaStateDictAdapter(config).to_hf(model.state).items()}
    except ValueError as exc:  # a state dict that does not fit the config
        raise PipelineError(f"{model_dir / 'model.safetensors'}: cannot convert to XLM-R ({str(exc)[:200]}); "
                            f"run `dvc repro pretrain`") from None
    spm_bytes = (model_dir / SPM_MODEL).read_bytes()
    try:
        fast = tokenizer_json(read_spm_model(spm_bytes), tokenizer.vocab_size)
    except (ValueError, UnicodeDecodeError, IndexError, struct.error) as exc:
        raise PipelineError(f"{model_dir / SPM_MODEL}: cannot build tokenizer.json ({exc}); "
                            f"run `dvc repro tokenizer pretrain`") from None

    config_json = hf_config(config)
    config_json["dtype"] = DTYPE_NAMES[xp.dtype]
    if config.use_lang_emb:
        config_json["lang2id"] = {lang: i for i, lang in enumerate(model.languages)}
        config_json["id2lang"] = {str(i): lang for i, lang in enumerate(model.languages)}
    n_params = sum(v.numel() for v in model.state.values())
    card = model_card(xp.name, xp.license, config, model.languages, model.pairs, n_params, model.training, recipe)

    def dump(obj: dict) -> bytes:
        return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    files = {
        "config.json": dump(config_json),
        "sentencepiece.bpe.model": spm_bytes,
        "tokenizer.json": dump(fast),
        "tokenizer_config.json": dump(tokenizer_config(tokenizer.vocab_size, config.max_positions)),
        "special_tokens_map.json": dump(special_tokens_map()),
        "README.md": card.encode("utf-8"),
    }
    st_files, st_weights = layout_files(recipe, config, config_json, weights, files)
    return Exported(files={**files, **st_files}, weights={"model.safetensors": weights, **st_weights})


def export(params: StageParams, model_dir: Path, out_dir: Path, evaluate: StageParams) -> Path:
    """Write the folder; ``evaluate`` is params.yaml's evaluate section (load_params("evaluate")), the recipe's source."""
    from safetensors.torch import save_file

    exported = prepare_export(params, evaluate, model_dir)
    with disk_full_is_an_error("export", out_dir), atomic_dir(out_dir) as tmp:
        for name, tensors in exported.weights.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        for name, data in exported.files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        for path in tmp.rglob("*"):   # a folder meant to be shared: world-readable, whatever the writer's umask
            path.chmod(0o755 if path.is_dir() else 0o644)
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    print(f"export: wrote {out_dir} ({size / 1e6:.1f} MB)", file=sys.stderr)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xlm export", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="data/model", type=Path)
    parser.add_argument("--out", default="data/export/hf", type=Path)
    args = parser.parse_args(argv)
    return run_cli("export", lambda: export(load_params("export", args.params), args.model, args.out,
                                            load_params("evaluate", args.params)))


if __name__ == "__main__":
    sys.exit(main())
