"""The Hugging Face tokenizer files of an export, built from our sentencepiece model without transformers.

    read_spm_model(bytes)            the parts of a sentencepiece ModelProto the tokenizer needs (no protobuf)
    tokenizer_json(spm, vocab_size)  a `tokenizers` serialization that encodes exactly as sentencepiece, XLM-R's ids
    tokenizer_config(...), special_tokens_map()

Why tokenizer.json is written by hand: transformers 5 builds a tokenizer from a sentencepiece file only when protobuf
is installed, and its XLMRobertaTokenizer class re-creates the pipeline with whitespace splitting, which differs from
how our sentencepiece model was trained (identity normalisation, spaces kept as they are). A `tokenizers` JSON that
mirrors the sentencepiece model's own settings (its normalizer spec, dummy prefix, model type, byte fallback), loaded
as PreTrainedTokenizerFast, gives exactly our ids. The JSON is plain data, so neither transformers nor the tokenizers
library is needed at run time (the tests check it with both).
"""
from __future__ import annotations

import base64
import re
import struct
from dataclasses import dataclass
from typing import Any, Iterator

from xlm_core.special_tokens import BOS, EOS, PAD, UNK, mask_id

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
