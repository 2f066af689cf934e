"""The pretraining task: the model's features and the three objectives combined into one loss."""

from __future__ import annotations

import torch
from torch import nn

from personae.config import PretrainCfg
from personae.data.tokenizer import Tokenizer
from personae.models.model import PersonaeModel
from personae.objectives import ContrastiveLoss, ImageTextMatching, MaskedLanguageModelling, mask_tokens


class PretrainTask(nn.Module):
    """ITC + ITM (hard negatives from the ITC similarities) + image-conditioned MLM on one batch.

    The whole loss is one module so that DDP sees every parameter use inside its forward.
    """

    def __init__(self, model: PersonaeModel, tokenizer: Tokenizer, cfg: PretrainCfg, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.itc = ContrastiveLoss(rank, world_size)
        self.itm = ImageTextMatching()
        self.mlm = MaskedLanguageModelling()
        self.special_ids = sorted(tokenizer.special_ids)
        self.mask_id, self.vocab_size = tokenizer.mask_id, tokenizer.vocab_size

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        out = self.model(batch["pixel_values"], ids, mask)
        metrics = self.itc(out.image_embed, out.text_embed, out.logit_scale)
        loss = self.cfg.itc_weight * metrics["loss_itc"]
        if self.cfg.itm_weight > 0:
            metrics |= self.itm(self.model, out.regions, out.words, mask, metrics["sim_i2t"], metrics["sim_t2i"],
                                batch.get("group"), generator)
            loss = loss + self.cfg.itm_weight * metrics["loss_itm"]
        if self.cfg.mlm_weight > 0:
            masked_ids, labels = mask_tokens(ids, mask, special_ids=self.special_ids, mask_id=self.mask_id,
                                             vocab_size=self.vocab_size, mask_prob=self.cfg.mask_prob,
                                             generator=generator)
            fused = self.model.fuse(out.regions, self.model.encode_text(masked_ids, mask), mask)
            metrics |= self.mlm(fused.words, labels, self.model.mlm_logits)
            loss = loss + self.cfg.mlm_weight * metrics["loss_mlm"]
        metrics.pop("sim_i2t"), metrics.pop("sim_t2i")
        return {"loss": loss, **metrics}
