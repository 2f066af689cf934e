"""Causal language modelling on the reply tokens only (role-play fine-tuning)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from personae.data.labels import IGNORE_INDEX


class LanguageModelling(nn.Module):
    """Next-token cross-entropy where labels are set; the head runs on those positions alone.

    hidden[:, t] predicts labels[:, t + 1]: the state after token t scores the next token.
    With `dense=True` the head runs on every position and ignored labels are skipped inside the
    cross-entropy: the same mean, with no data-dependent shapes (what torch.func.vmap needs).
    """

    def __init__(self, dense: bool = False) -> None:
        super().__init__()
        self.dense = dense

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """hidden (B, T, D), labels (B, T) with IGNORE_INDEX where no loss, head (M, D) -> (M, V);
        weights (B, T), aligned with labels, scale each token's loss (the mean still divides by tokens)."""
        targets = labels[:, 1:]  # (B, T-1)
        if self.dense:
            if weights is not None:
                raise ValueError("the dense reply loss (meta-learning) takes no token weights")
            logits = head(hidden[:, :-1])  # (B, T-1, V)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
            return {"loss_lm": loss}
        selected = targets != IGNORE_INDEX
        if not selected.any():
            zero = hidden.sum() * 0.0
            return {"loss_lm": zero, "lm_acc": zero.detach()}
        logits = head(hidden[:, :-1][selected])  # (M, V)
        wanted = targets[selected]
        if weights is None:
            loss = F.cross_entropy(logits, wanted)
        else:
            loss = (F.cross_entropy(logits, wanted, reduction="none") * weights[:, 1:][selected]).mean()
        return {"loss_lm": loss, "lm_acc": (logits.argmax(-1) == wanted).float().mean().detach(),
                "lm_tokens": selected.sum().float().detach()}
