"""The role-play task: the decoder's reply-only language-modelling loss (plus region-word alignment)."""

from __future__ import annotations

import torch
from torch import nn

from personae.config import FinetuneCfg
from personae.models.model import PersonaeModel
from personae.objectives import LanguageModelling, RegionWordAlignment


class RolePlayTask(nn.Module):
    """Reply-only causal LM loss of the decoder over [image prefix; prompt; replies].

    With `finetune.align_weight` > 0 and batches that carry `align_ids` (the first word piece of
    each thing the image holds), the region-word alignment loss of the image prefix is added with
    that weight (personae.objectives.alignment).
    """

    def __init__(self, model: PersonaeModel, cfg: FinetuneCfg) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.lm = LanguageModelling()
        self.align = RegionWordAlignment()

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        pixel_values = batch.get("pixel_values")
        hidden, prefix = self.model.lm_states(pixel_values, batch["input_ids"])  # (B, T, D), (B, R, D)
        metrics = self.lm(hidden, batch["labels"], self.model.lm_head, batch.get("label_weights"))
        loss = metrics["loss_lm"]
        if self.cfg.align_weight > 0 and pixel_values is not None and "align_ids" in batch:
            aligned = self.align(prefix, batch["align_ids"], self.model.lm_head)
            metrics.update(aligned)
            loss = loss + self.cfg.align_weight * aligned["loss_align"]
        return {"loss": loss, **metrics}


def dense_roleplay_task(model: PersonaeModel, cfg: FinetuneCfg) -> RolePlayTask:
    """RolePlayTask with the dense reply loss: the same mean, and no data-dependent shapes (vmap needs that)."""
    task = RolePlayTask(model, cfg)
    task.lm = LanguageModelling(dense=True)
    return task
