"""What is trained: the encoder plus the optional language discriminator, with the loss as the module's forward."""
from __future__ import annotations

from typing import Callable

import torch

from xlm_core.model import XLMModel
from xlm_core.adversary import LanguageDiscriminator
from xlm_core.objectives import total_loss
from xlm_core.settings import ObjectivesConfig


class PretrainTask(torch.nn.Module):
    """The encoder plus the optional language discriminator, with the loss as its forward.

    DDP/FSDP wrap this one module, so the loss is computed inside the wrapper's forward (as DDP requires).
    """

    def __init__(self, model: XLMModel, objectives: ObjectivesConfig, languages: list[str], adversarial_hidden: int):
        super().__init__()
        self.model = model
        self.objectives = objectives
        self.languages = languages
        self.discriminator = (LanguageDiscriminator(model.config.d_model, len(languages), adversarial_hidden)
                              if objectives.adversarial_enabled else None)

    def forward(self, batch: dict[str, torch.Tensor], objective: str, seed: int, step: int):
        generator = torch.Generator(device=batch["input_ids"].device)
        generator.manual_seed(seed)
        return total_loss(self.model, {objective: batch}, self.objectives, generator, step=step,
                          discriminator=self.discriminator, language_names=self.languages)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The encoder's groups (decay / no decay), then the discriminator's (no decay)."""
        groups = self.model.optimizer_param_groups(weight_decay)
        if self.discriminator is not None:
            groups.append({"params": list(self.discriminator.parameters()), "weight_decay": 0.0})
        return groups


def micro_batch_loss(row_length: Callable[[int], int]) -> Callable:
    """The Trainer's ``loss_fn`` for loader micro-batches: ``(module, micro_batch) -> (loss, logs)``.

    Every micro-batch carries a stateless seed from which its MLM mask and its dropout draws derive, so no RNG state
    has to be saved and the split of a global batch into ranks × accumulation steps does not change what is computed.
    """
    def loss_fn(module: torch.nn.Module, batch):
        torch.manual_seed(batch.chunk_seed ^ 0x5EED)  # dropout draws: per chunk, stateless
        if batch.objective in ("mlm", "clm"):  # stream-mode rows; a pair (TLM, TR) is one unit and keeps its length
            batch = batch.cut_rows(row_length(batch.step))
        return module(batch.model_inputs(), batch.objective, batch.chunk_seed, batch.step)

    return loss_fn
