"""The `export` stage: data/model/ -> data/export/hf/, a Hugging Face XLM-R folder that loads offline.

    config.json                 XLMRobertaConfig (xlm_core.hf.hf_config), plus lang2id/id2lang with language embeddings
    model.safetensors           XLMRobertaForMaskedLM weights (xlm_core.hf.to_hf), in export.dtype
    sentencepiece.bpe.model     our spm.model (XLM-R's file name)
    tokenizer.json              the fast tokenizer, built here from the sentencepiece model: no transformers needed
    tokenizer_config.json, special_tokens_map.json
    README.md                   the model card: languages, data, objectives, architecture, usage

Why tokenizer.json is written by hand: transformers 5 builds a tokenizer from a sentencepiece file only when protobuf
is installed, and its XLMRobertaTokenizer class re-creates the pipeline with whitespace splitting, which differs from
how our sentencepiece model was trained (identity normalisation, spaces kept as they are). A `tokenizers` JSON that
mirrors the sentencepiece model's own settings (its normalizer spec, dummy prefix, model type, byte fallback), loaded
as PreTrainedTokenizerFast, gives exactly our ids. The JSON is plain data, so the export needs neither transformers
nor the tokenizers library at run time (the tests check it with both).

The card deliberately does not embed metrics/eval.json: export would then rerun whenever evaluation settings change.
It points to the evaluation report instead and quotes the training run's own validation figures.
"""
from __future__ import annotations

import argparse
import base64
import json
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from pipeline.errors import PipelineError, disk_full_is_an_error, run_cli
from pipeline.params import StageParams, load_params
from xlm_core import checkpoint as ckpt
from xlm_core.atomic import atomic_dir
from xlm_core.hf import hf_config, to_hf
from xlm_core.model import ModelConfig
from xlm_core.special_tokens import BOS, EOS, PAD, UNK, mask_id
from xlm_core.tokenizer import SPM_MODEL, Tokenizer, TokenizerError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>", "pad_token": "<pad>",
           "cls_token": "<s>", "mask_token": "<mask>"}


# --------------------------------------------------------------------------------------- the sentencepiece model file
# ModelProto (sentencepiece_model.proto), the fields we read:
#   1 pieces (repeated SentencePiece: 1 piece, 2 score float, 3 type enum [1 normal, 2 unknown, 3 control,
#     4 user defined, 5 unused, 6 byte])
#   2 trainer_spec (3 model_type [1 unigram, 2 bpe, 3 word, 4 char], 35 byte_fallback)
#   3 normalizer_spec (2 precompiled_charsmap, 3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_whitespaces;
#     the three booleans default to true)
NORMAL, USER_DEFINED = 1, 4
UNIGRAM, BPE = 1, 2


@dataclass
class SpmModel:
    pieces: list[tuple[str, float, int]]   # (piece, score, type), by sentencepiece id
    model_type: int
    byte_fallback: bool
    precompiled_charsmap: bytes
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of a protobuf message: int for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield number, value


def read_spm_model(data: bytes) -> SpmModel:
    """Parse the parts of a sentencepiece ModelProto the tokenizer.json needs (no protobuf dependency)."""
    pieces: list[tuple[str, float, int]] = []
    model_type, byte_fallback = UNIGRAM, False
    charsmap, dummy_prefix, extra_ws, escape_ws = b"", True, True, True
    for number, value in _fields(data):
        if number == 1:
            piece, score, kind = "", 0.0, NORMAL
            for n, v in _fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            pieces.append((piece, score, kind))
        elif number == 2:
            for n, v in _fields(value):
                if n == 3:
                    model_type = v
                elif n == 35:
                    byte_fallback = bool(v)
        elif number == 3:
            for n, v in _fields(value):
                if n == 2:
                    charsmap = bytes(v)
                elif n == 3:
                    dummy_prefix = bool(v)
                elif n == 4:
                    extra_ws = bool(v)
                elif n == 5:
                    escape_ws = bool(v)
    return SpmModel(pieces, model_type, byte_fallback, charsmap, dummy_prefix, extra_ws, escape_ws)


# ------------------------------------------------------------------------------------------------- tokenizer.json
def _added_token(token_id: int, content: str, lstrip: bool = False) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": lstrip, "rstrip": False,
            "normalized": False, "special": True}


def _replace(pattern: dict, content: str) -> dict:
    return {"type": "Replace", "pattern": pattern, "content": content}


def _template(ids: list[str]) -> list[dict]:
    return [{"Sequence": {"id": x[1:], "type_id": 0}} if x.startswith("$") else
            {"SpecialToken": {"id": x, "type_id": 0}} for x in ids]


def _bpe_merges(spm: SpmModel) -> list[list[str]]:
    """Merges implied by a sentencepiece BPE vocabulary: every split of a normal piece into two normal pieces,
    ranked by the merged piece's score (higher first), then its id: how sentencepiece applies them."""
    normal = {piece: (score, i) for i, (piece, score, kind) in enumerate(spm.pieces) if kind == NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    return [[left, right] for _s, _i, left, right in sorted(ranked)]


def tokenizer_json(spm: SpmModel, vocab_size: int) -> dict:
    """A `tokenizers` serialization that encodes exactly as sentencepiece with our id layout (XLM-R's).

    Ids: <s> 0, <pad> 1, </s> 2, <unk> 3, sentencepiece piece k >= 3 -> k + 1, <mask> last. The normalizer and
    pre-tokenizer follow the model's normalizer spec the way transformers' own sentencepiece conversion does.
    """
    if spm.model_type not in (UNIGRAM, BPE):
        raise ValueError(f"sentencepiece model type {spm.model_type} (word/char) has no tokenizer.json export; "
                         f"train the tokenizer with model_type unigram or bpe")
    if len(spm.pieces) + 2 != vocab_size:
        raise ValueError(f"sentencepiece model has {len(spm.pieces)} pieces, expected {vocab_size - 2}")
    mask = mask_id(vocab_size)
    names = {BOS: "<s>", PAD: "<pad>", EOS: "</s>", UNK: "<unk>"}
    vocab: list[tuple[str, float]] = [(names[i], 0.0) for i in range(4)]
    vocab += [(piece, score) for piece, score, _kind in spm.pieces[3:]]
    vocab.append(("<mask>", 0.0))

    normalizers: list[dict] = []
    if spm.precompiled_charsmap:
        normalizers.append({"type": "Precompiled",
                            "precompiled_charsmap": base64.b64encode(spm.precompiled_charsmap).decode("ascii")})
    if spm.remove_extra_whitespaces:  # sentencepiece trims and squeezes spaces only (not other whitespace)
        normalizers += [_replace({"Regex": r"\A +| +\z"}, ""), _replace({"Regex": " {2,}"}, " ")]
    if spm.escape_whitespaces:
        normalizers.append(_replace({"String": " "}, "▁"))
    if spm.add_dummy_prefix:  # Metaspace skips its prefix when the text starts with "▁"; sentencepiece does not
        normalizers.append(_replace({"Regex": r"\A▁"}, "▁▁"))
    pre_tokenizers: list[dict] = []
    if spm.add_dummy_prefix:
        pre_tokenizers.append({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False})
    user_defined = [piece for piece, _s, kind in spm.pieces if kind == USER_DEFINED]
    if user_defined:  # sentencepiece emits user-defined pieces whole
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        pre_tokenizers.append({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
                               "invert": False})
    decoders: list[dict] = [_replace({"String": "▁"}, " ")]
    if spm.byte_fallback:
        decoders.append({"type": "ByteFallback"})
    if spm.add_dummy_prefix:
        decoders += [{"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]
    elif spm.byte_fallback:
        decoders.append({"type": "Fuse"})

    if spm.model_type == UNIGRAM:
        model = {"type": "Unigram", "unk_id": UNK, "vocab": [[p, s] for p, s in vocab],
                 "byte_fallback": spm.byte_fallback}
    else:
        model = {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": spm.byte_fallback,
                 "ignore_merges": bool(user_defined), "vocab": {p: i for i, (p, _s) in enumerate(vocab)},
                 "merges": _bpe_merges(spm)}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(BOS, "<s>"), _added_token(PAD, "<pad>"), _added_token(EOS, "</s>"),
                         _added_token(UNK, "<unk>"), _added_token(mask, "<mask>", lstrip=True)],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers} if pre_tokenizers else None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": _template(["<s>", "$A", "</s>"]),
            "pair": _template(["<s>", "$A", "</s>", "</s>", "$B", "</s>"]),
            "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in (("<s>", BOS), ("</s>", EOS))},
        },
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": model,
    }


def tokenizer_config(vocab_size: int, max_length: int) -> dict:
    """PreTrainedTokenizerFast reads tokenizer.json verbatim (see the module docstring for why not XLMRobertaTokenizer)."""
    mask = mask_id(vocab_size)
    decoder = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in
               [_added_token(BOS, "<s>"), _added_token(PAD, "<pad>"), _added_token(EOS, "</s>"),
                _added_token(UNK, "<unk>"), _added_token(mask, "<mask>", lstrip=True)]}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
            "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"],
            "added_tokens_decoder": decoder, **SPECIAL}


def special_tokens_map() -> dict:
    out: dict[str, Any] = dict(SPECIAL)
    out["mask_token"] = {"content": "<mask>", "lstrip": True, "normalized": False, "rstrip": False,
                         "single_word": False}
    return out


# ------------------------------------------------------------------------------------------------------ model card
@dataclass
class CardFacts:
    """What the card says about the run; each part is optional (missing inputs give a shorter card)."""

    pretrain: Optional[dict] = None           # the checkpoint's pretrain settings
    train_tokens: Optional[dict] = None       # shards manifest: {"languages": {lang: {...}}, "pairs": {...}}
    metrics: Optional[dict] = None            # metrics/pretrain.json


def model_card(name: str, license_: str, config: ModelConfig, languages: list[str], pairs: list[str],
               n_params: int, facts: CardFacts) -> str:
    front = ["---", f"language: [{', '.join(languages)}]", f"license: {license_}", "library_name: transformers",
             "pipeline_tag: fill-mask", "tags: [xlm-roberta, cross-lingual, masked-lm, xlm-pipeline]", "---", ""]
    lines = [*front, f"# {name}", "",
             f"A cross-lingual encoder in the XLM-R architecture, pretrained with xlm-pipeline on "
             f"{len(languages)} languages ({', '.join(languages)}).", "",
             "## Architecture", "",
             "| layers | hidden | heads | feed-forward | vocabulary | max positions | parameters |",
             "|---|---|---|---|---|---|---|",
             f"| {config.n_layers} | {config.d_model} | {config.n_heads} | {config.d_ff} | {config.vocab_size} | "
             f"{config.max_positions} | {n_params / 1e6:.1f} M |", ""]
    lines += ["## Training", ""]
    p = facts.pretrain
    if p:
        objectives = ", ".join(f"{k.upper()} ({v:g})" for k, v in p.get("objectives", {}).items() if v > 0)
        lines.append(f"- Objectives (sampling weights): {objectives or 'unknown'}.")
        adv = p.get("adversarial", {})
        if adv.get("weight", 0) > 0:
            layer = f"layer {adv['layer']}" if adv.get("layer") is not None else "the middle layer"
            lines.append(f"- Language-adversarial training: a language discriminator behind gradient reversal reads "
                         f"the mean-pooled states of {layer} (weight {adv['weight']:g}, λ up to "
                         f"{adv.get('lambda_max', 1):g}).")
        lines.append(f"- {p.get('steps', '?')} steps of {p.get('batch_size', '?')} sequences × {p.get('seq_len', '?')} "
                     f"tokens ({p.get('mode', 'stream')} mode), masking {p.get('masking', {}).get('rate', 0.15):g}, "
                     f"optimizer AdamW lr {p.get('optimizer', {}).get('lr', '?')} "
                     f"({p.get('optimizer', {}).get('schedule', '?')} schedule).")
    else:
        lines.append("- Training settings unavailable (no checkpoint of this run was found at export time).")
    if pairs:
        lines.append(f"- Parallel pairs (translation LM): {', '.join(pairs)}.")
    lines.append("")
    if facts.train_tokens and facts.train_tokens.get("languages"):
        lines += ["## Data", "", "Training tokens per language (after cleaning and de-duplication):", "",
                  "| language | sentences | tokens |", "|---|---|---|"]
        for lang, c in sorted(facts.train_tokens["languages"].items()):
            lines.append(f"| {lang} | {c.get('rows', '?'):,} | {c.get('tokens', '?'):,} |")
        lines.append("")
    valid = (facts.metrics or {}).get("valid") or {}
    if valid:
        lines += ["## Validation at the end of training", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(valid.items())]
        lines.append("")
    lines += ["## Evaluation", "",
              "Test-split perplexity, bitext retrieval and zero-shot probes, each beside a random-init baseline, are in "
              "the run's `reports/eval.md` and `metrics/eval.json` (`dvc metrics show`).", ""]
    lines += ["## Usage", "", "```python", "from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline", "",
              'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
              'model = AutoModelForMaskedLM.from_pretrained("path/to/this/folder")',
              'fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)',
              f'fill("... {SPECIAL["mask_token"]} ...")']
    if config.use_lang_emb:
        table = ", ".join(f"{lang} = {i}" for i, lang in enumerate(languages))
        lines += ["", "# This model was trained with language embeddings: pass the language of the text as",
                  "# token_type_ids (one id for the whole sequence). The ids are config.lang2id:",
                  f"#   {table}",
                  'inputs = tokenizer("Bonjour le monde", return_tensors="pt")',
                  f'inputs["token_type_ids"] = inputs["input_ids"].new_full(inputs["input_ids"].shape, '
                  f'{languages.index("fr") if "fr" in languages else 0})',
                  "outputs = model(**inputs)"]
    lines += ["```", ""]
    if config.use_lang_emb:
        lines += ["**Language embeddings.** Without `token_type_ids` the model reads every text as language 0 "
                  f"({languages[0]}); pass the ids above for the figures it was trained for. The fill-mask pipeline "
                  "does not pass them.", ""]
    lines += ["The tokenizer (`tokenizer.json`, loaded as `PreTrainedTokenizerFast`) reproduces the sentencepiece model "
              "`sentencepiece.bpe.model` with XLM-R's ids: `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3, `<mask>` last.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- the stage
@dataclass
class Exported:
    files: dict[str, bytes]                  # name -> content, everything but the weights
    weights: dict[str, torch.Tensor]


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def card_facts(checkpoints_dir: Path, model_config: ModelConfig, shards_manifest: Path,
               pretrain_metrics: Path) -> CardFacts:
    pretrain = None
    latest = ckpt.latest_checkpoint(checkpoints_dir) if checkpoints_dir.is_dir() else None
    if latest is not None:
        meta = _read_json(latest / "meta.json") or {}
        if meta.get("model_config") == model_config.to_dict():
            pretrain = meta.get("identity", {}).get("pretrain")
    return CardFacts(pretrain=pretrain, train_tokens=_read_json(shards_manifest), metrics=_read_json(pretrain_metrics))


def prepare_export(params: StageParams, model_dir: Path, checkpoints_dir: Path, shards_manifest: Path,
                   pretrain_metrics: Path) -> Exported:
    """Everything the folder will hold, computed (and validated) in memory before anything is written."""
    from safetensors.torch import load_file

    xp = params.export
    fix = "run `dvc repro pretrain`"
    meta = _read_json(model_dir / "config.json")
    if meta is None or "model" not in meta:
        raise PipelineError(f"{model_dir / 'config.json'}: missing or not a model config; {fix}")
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (ValueError, TypeError) as exc:
        raise PipelineError(f"{model_dir / 'config.json'}: {exc}; {fix}") from None
    if config.pre_ln:
        raise PipelineError("data/model was trained with pretrain.model.pre_ln = true, which XLM-R (post-LayerNorm) "
                            "cannot represent; retrain with pre_ln: false to export a Hugging Face model")
    try:
        tokenizer = Tokenizer.load(model_dir)
    except TokenizerError as exc:
        raise PipelineError(f"{model_dir}: {exc}") from None
    weights_path = model_dir / "model.safetensors"
    if not weights_path.is_file():
        raise PipelineError(f"{weights_path}: not found; {fix}")
    try:
        state = load_file(str(weights_path))
        weights = {k: v.to(DTYPES[xp.dtype]).contiguous() for k, v in to_hf(state, config).items()}
    except Exception as exc:  # damaged file or a state dict that does not fit the config
        raise PipelineError(f"{weights_path}: cannot convert to XLM-R ({str(exc)[:200]}); {fix}") from None
    spm_bytes = (model_dir / SPM_MODEL).read_bytes()
    try:
        spm = read_spm_model(spm_bytes)
        fast = tokenizer_json(spm, tokenizer.vocab_size)
    except (ValueError, UnicodeDecodeError, IndexError, struct.error) as exc:
        raise PipelineError(f"{model_dir / SPM_MODEL}: cannot build tokenizer.json ({exc}); "
                            f"run `dvc repro tokenizer pretrain`") from None

    languages, pairs = list(meta.get("languages", [])), list(meta.get("pairs", []))
    config_json = hf_config(config)
    config_json["dtype"] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[xp.dtype]
    if config.use_lang_emb:
        config_json["lang2id"] = {lang: i for i, lang in enumerate(languages)}
        config_json["id2lang"] = {str(i): lang for i, lang in enumerate(languages)}
    n_params = sum(v.numel() for v in state.values())
    facts = card_facts(checkpoints_dir, config, shards_manifest, pretrain_metrics)
    card = model_card(xp.name, xp.license, config, languages, pairs, n_params, facts)

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
    return Exported(files=files, weights=weights)


def export(params: StageParams, model_dir: Path, out_dir: Path, checkpoints_dir: Path, shards_manifest: Path,
           pretrain_metrics: Path) -> Path:
    from safetensors.torch import save_file

    exported = prepare_export(params, model_dir, checkpoints_dir, shards_manifest, pretrain_metrics)
    with disk_full_is_an_error("export", out_dir), atomic_dir(out_dir) as tmp:
        save_file(exported.weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, data in exported.files.items():
            (tmp / name).write_bytes(data)
        for path in tmp.iterdir():   # a folder meant to be shared: world-readable, whatever the writer's umask
            path.chmod(0o644)
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    print(f"export: wrote {out_dir} ({size / 1e6:.1f} MB)", file=sys.stderr)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xlm export", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="data/model", type=Path)
    parser.add_argument("--out", default="data/export/hf", type=Path)
    parser.add_argument("--checkpoints", default="data/checkpoints", type=Path,
                        help="the newest one gives the training settings quoted in the card")
    parser.add_argument("--shards-manifest", default="data/shards/train/manifest.json", type=Path)
    parser.add_argument("--pretrain-metrics", default="metrics/pretrain.json", type=Path)
    args = parser.parse_args(argv)
    return run_cli("export", lambda: export(load_params("export", args.params), args.model, args.out,
                                            args.checkpoints, args.shards_manifest, args.pretrain_metrics))


if __name__ == "__main__":
    sys.exit(main())
