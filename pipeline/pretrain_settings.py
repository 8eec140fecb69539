"""From the validated `pretrain` section to the library's configs, and the fingerprint that decides a resume."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.errors import PipelineError
from pipeline.params import StageParams
from xlm_core.model import ModelConfig
from xlm_core.objectives import MaskingConfig, ObjectivesConfig

# Keys of the pretrain section that change what is computed; the others (logging, checkpoint cadence, threads,
# process count, compile) can change between a kill and a resume without invalidating the checkpoint.
RUNTIME_KEYS = ("eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "log_every", "nproc",
                "threads", "compile", "device", "max_bad_steps")



def model_config(params: StageParams, vocab_size: int) -> ModelConfig:
    p = params.pretrain.model
    overrides = {k: getattr(p, k) for k in ("n_layers", "d_model", "n_heads", "d_ff", "init_std")
                 if getattr(p, k) is not None}
    try:
        return ModelConfig.preset(
            p.preset, vocab_size=vocab_size, n_languages=len(params.languages), use_lang_emb=p.use_lang_emb,
            dropout=p.dropout, attention_dropout=p.attention_dropout, positions=p.positions, pre_ln=p.pre_ln,
            causal=p.causal, **overrides)
    except ValueError as exc:
        raise PipelineError(f"params.yaml: pretrain.model: {exc}") from None


def objectives_config(params: StageParams, n_layers: int) -> ObjectivesConfig:
    p = params.pretrain
    adv = p.adversarial
    # The step's objective is drawn with probability ∝ its weight (as XLM alternates objectives), so each active
    # objective enters the loss with weight 1; the weights set the mix.
    active = {name: 1.0 if p.objectives.get(name, 0) > 0 else 0.0 for name in ("mlm", "tlm", "clm")}
    return ObjectivesConfig(
        mlm_weight=active["mlm"], tlm_weight=active["tlm"], clm_weight=active["clm"],
        adversarial_weight=adv.weight, adversarial_lambda=adv.lambda_max,
        adversarial_warmup_steps=adv.warmup_steps,
        adversarial_layer=adv.layer if adv.layer is not None else max(1, n_layers // 2),
        masking=MaskingConfig(mask_rate=p.masking.rate, mask_prob=p.masking.mask, random_prob=p.masking.random,
                              frequency_smoothing=p.masking.smoothing))


def training_fingerprint(params: StageParams, tokenizer_sha: str, shards_fingerprint: str) -> tuple[str, dict]:
    settings = params.pretrain.model_dump(mode="json", exclude=set(RUNTIME_KEYS))
    identity = {"pretrain": settings, "languages": params.languages, "pairs": ["-".join(p) for p in params.pairs],
                "tokenizer": tokenizer_sha, "shards": shards_fingerprint}
    blob = json.dumps(identity, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest(), identity


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if old == new else [prefix]


