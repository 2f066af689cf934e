"""Masked language modelling conditioned on the image (MLM): BERT masking and the loss."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from personae.data.labels import IGNORE_INDEX


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    special_ids: Iterable[int],
    mask_id: int,
    vocab_size: int,
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose mask_prob of the maskable tokens; of those 80% <mask>, 10% random, 10% kept.

    Padding and special tokens are never chosen; random replacements are never special tokens.
    Returns (masked_ids, labels) with labels = IGNORE_INDEX where nothing is predicted.
    """
    special = torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype, device=input_ids.device)
    maskable = attention_mask.bool() & ~torch.isin(input_ids, special)
    draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    chosen = maskable & (draw < mask_prob)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    action = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    # random replacement among ordinary tokens: draw from the non-special ids
    ordinary = torch.ones(vocab_size, dtype=torch.bool, device=input_ids.device)
    ordinary[special[special < vocab_size]] = False
    ordinary_ids = ordinary.nonzero().squeeze(1)
    pick = torch.randint(len(ordinary_ids), input_ids.shape, generator=generator, device=input_ids.device)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, ordinary_ids[pick].to(input_ids.dtype), masked)
    return masked, labels


class MaskedLanguageModelling(nn.Module):
    """Cross-entropy on the masked positions only; the head runs on those positions alone."""

    def forward(self, fused_words: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> dict[str, torch.Tensor]:
        """fused_words (B, T, D), labels (B, T), head: (M, D) -> (M, V) logits."""
        selected = labels != IGNORE_INDEX
        targets = labels[selected]  # (M,)
        if targets.numel() == 0:  # nothing masked in this batch: a zero that keeps the graph
            zero = fused_words.sum() * 0.0
            return {"loss_mlm": zero, "mlm_acc": zero.detach()}
        logits = head(fused_words[selected])  # (M, V)
        return {
            "loss_mlm": F.cross_entropy(logits, targets),
            "mlm_acc": (logits.argmax(-1) == targets).float().mean().detach(),
        }
