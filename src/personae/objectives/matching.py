"""Image-text matching (ITM) with hard negatives sampled from the in-batch ITC similarities."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sample_hard_negatives(
    similarity: torch.Tensor, groups: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For each row i pick a column j != i with probability softmax(similarity[i])_j.

    Columns sharing row i's group (the same image or scene) are excluded too, so a negative is never
    a positive in disguise. A row whose every other column is excluded falls back to a uniform draw
    over j != i. Returns (B,) column indices.
    """
    B = similarity.shape[0]
    if B < 2:
        raise ValueError("image-text matching needs a batch of at least 2 pairs to draw negatives")
    allowed = ~torch.eye(B, dtype=torch.bool, device=similarity.device)
    if groups is not None:
        allowed &= groups[:, None] != groups[None, :]
    empty = ~allowed.any(dim=1)
    if empty.any():
        allowed[empty] = ~torch.eye(B, dtype=torch.bool, device=similarity.device)[empty]
    weights = similarity.float().masked_fill(~allowed, float("-inf")).softmax(dim=1)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


class ImageTextMatching(nn.Module):
    """Binary match / no-match on the fused cls for B positives and 2B hard negatives.

    Each image is paired with a hard-negative text and each text with a hard-negative image; the
    three sets are fused in one batched call.
    """

    def forward(
        self,
        model: nn.Module,
        regions: torch.Tensor,
        words: torch.Tensor,
        attention_mask: torch.Tensor | None,
        sim_i2t: torch.Tensor,
        sim_t2i: torch.Tensor,
        groups: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        B = regions.shape[0]
        neg_text = sample_hard_negatives(sim_i2t, groups, generator)  # a text for each image
        neg_image = sample_hard_negatives(sim_t2i, groups, generator)  # an image for each text
        all_regions = torch.cat([regions, regions, regions[neg_image]], dim=0)  # (3B, N, D)
        all_words = torch.cat([words, words[neg_text], words], dim=0)  # (3B, T, D)
        mask = None
        if attention_mask is not None:
            mask = torch.cat([attention_mask, attention_mask[neg_text], attention_mask], dim=0)
        logits = model.itm_logits(model.fuse(all_regions, all_words, mask))  # (3B, 2)
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
        return {
            "loss_itm": F.cross_entropy(logits, labels),
            "itm_acc": (logits.argmax(-1) == labels).float().mean().detach(),
        }
