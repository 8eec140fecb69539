"""From the validated `pretrain` section to the library's configs, and the fingerprint that decides a resume."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from pipeline.params import StageParams
from xlm_core.model_config import ModelConfig
from xlm_core.settings import OBJECTIVES, ObjectivesConfig

# Keys of the pretrain section that change what is computed; the others (logging, checkpoint cadence, threads,
# process count, compile) can change between a kill and a resume without invalidating the checkpoint. dvc.yaml's
# pretrain `params:` lists the complement, so editing one of these reruns nothing.
RUNTIME_KEYS = ("eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "log_every", "nproc",
                "threads", "compile", "device", "max_bad_steps")
# What the objectives' settings mean, in the fingerprint: raised when a value keeps its name but changes what it
# computes, so a checkpoint from before is not resumed under the new meaning. 2: the encoder receives the adversary's
# gradient reversed at -lambda (pretrain.adversarial.lambda_max), no longer -weight * lambda.
OBJECTIVES_VERSION = 2


def model_config(params: StageParams, vocab_size: int) -> ModelConfig:
    return params.pretrain.model.config(vocab_size=vocab_size, n_languages=len(params.languages))


def objectives_config(params: StageParams, n_layers: int) -> ObjectivesConfig:
    p = params.pretrain
    # The step's objective is drawn with probability ∝ its weight (as XLM alternates objectives), so each active
    # objective enters the loss with weight 1; the weights set the mix. The adversary's layer is resolved here
    # (null = the middle one) so that the run records the block it actually read. A layer is resolved only for an
    # objective that is on (the params check it only then): an unused one stays None, whatever params.yaml holds.
    active = {name: 1.0 if p.objectives.get(name, 0) > 0 else 0.0 for name in OBJECTIVES}
    adversarial_layer = p.adversarial.layer_of(n_layers) if p.adversarial.enabled else None
    tr_layer = p.translation_ranking.layer_of(n_layers) if active["tr"] > 0 else None
    return ObjectivesConfig(
        mlm_weight=active["mlm"], tlm_weight=active["tlm"], clm_weight=active["clm"], tr_weight=active["tr"],
        adversarial=dataclasses.replace(p.adversarial, layer=adversarial_layer), masking=p.masking,
        translation_ranking=dataclasses.replace(p.translation_ranking, layer=tr_layer))


def training_fingerprint(params: StageParams, tokenizer_sha: str, shards_fingerprint: str) -> tuple[str, dict]:
    settings = params.pretrain.model_dump(mode="json", exclude=set(RUNTIME_KEYS))
    identity = {"pretrain": settings, "languages": params.languages, "pairs": ["-".join(p) for p in params.pairs],
                "tokenizer": tokenizer_sha, "shards": shards_fingerprint, "objectives_version": OBJECTIVES_VERSION}
    blob = json.dumps(identity, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest(), identity


def changed_settings(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two settings trees (what made a checkpoint stale)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += changed_settings(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if old == new else [prefix]
