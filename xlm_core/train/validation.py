"""Validation during training: MLM (or CLM) loss and accuracy per language and TLM per pair, with fixed-seed masks."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Mapping, Sequence

import torch

from xlm_core.data import DataError, iter_eval_batches


def validation_jobs(objectives: Mapping[str, float], languages: Sequence[str],
                    pairs: Sequence[str]) -> list[tuple[str, str]]:
    """(objective, language or "src-tgt" pair) to validate, for the objectives trained on."""
    jobs = []
    if objectives.get("mlm", 0) > 0 or objectives.get("clm", 0) > 0:
        objective = "mlm" if objectives.get("mlm", 0) > 0 else "clm"
        jobs += [(objective, lang) for lang in languages]
    if objectives.get("tlm", 0) > 0:
        jobs += [("tlm", pair) for pair in pairs]
    return jobs


@torch.inference_mode()
def validate(task: torch.nn.Module, jobs: Sequence[tuple[str, str]], valid_dir: Path, languages: list[str], *,
             seq_len: int, batch_size: int, max_batches: int, seed: int, tokenizer, device: torch.device,
             autocast_dtype: torch.dtype | None) -> dict[str, float]:
    """``{"<objective>_loss/<key>": ..., "<objective>_accuracy/<key>": ...}``, token-weighted over the batches."""
    was_training = task.training
    task.eval()
    out: dict[str, float] = {}
    cast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    for objective, key in jobs:
        losses, accs, weights = 0.0, 0.0, 0
        try:
            batches = iter_eval_batches(valid_dir, languages, objective, key, seq_len, batch_size,
                                        max_batches=max_batches, seed=seed, tokenizer=tokenizer)
            for batch in batches:
                batch = batch.to(device)
                with cast:
                    _, logs = task(batch.model_inputs(), objective, batch.chunk_seed, 0)
                n = logs.get(f"{objective}_targets", batch.n_tokens)
                losses += logs[f"{objective}_loss"] * n
                accs += logs[f"{objective}_accuracy"] * n
                weights += n
        except DataError:
            continue  # nothing of this language/pair in the valid split (tiny corpora): no figure
        if weights:
            out[f"{objective}_loss/{key}"] = losses / weights
            out[f"{objective}_accuracy/{key}"] = accs / weights
    task.train(was_training)
    return out
