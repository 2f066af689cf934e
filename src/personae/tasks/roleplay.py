"""The role-play task: the decoder's reply-only language-modelling loss."""

from __future__ import annotations

import torch
from torch import nn

from personae.config import FinetuneCfg
from personae.models.model import PersonaeModel
from personae.objectives import LanguageModelling


class RolePlayTask(nn.Module):
    """Reply-only causal LM loss of the decoder over [image prefix; prompt; replies]."""

    def __init__(self, model: PersonaeModel, cfg: FinetuneCfg) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.lm = LanguageModelling()

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        hidden = self.model.lm_hidden(batch.get("pixel_values"), batch["input_ids"])  # (B, T, D)
        metrics = self.lm(hidden, batch["labels"], self.model.lm_head)
        return {"loss": metrics["loss_lm"], **metrics}


def dense_roleplay_task(model: PersonaeModel, cfg: FinetuneCfg) -> RolePlayTask:
    """RolePlayTask with the dense reply loss: the same mean, and no data-dependent shapes (vmap needs that)."""
    task = RolePlayTask(model, cfg)
    task.lm = LanguageModelling(dense=True)
    return task
