"""Region-word alignment without boxes: multiple-instance learning over the image prefix.

For each thing a conversation's image is known to hold (a name: "backpack"), the region token of
the decoder's image prefix whose read-out through the tied LM head gives the name's first word
piece the highest probability is trained toward that piece:

    L = - mean over (image b, name k) of  max_j log softmax(E r_bj)[w_bk]

where r_bj is region j's projected prefix embedding and E the decoder's (tied) LM head. The
max picks the region a name belongs to (the bag of regions is the instance set; no box is needed),
so a region comes to carry its object's word in the same space the reply's words live in, and
attending to it is enough to say the name. The cls region (index 0) is not a candidate: it sums
the whole image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from personae.data.labels import IGNORE_INDEX


class RegionWordAlignment(nn.Module):
    """The MIL alignment loss above; names are first-word-piece ids, IGNORE_INDEX where padded."""

    def forward(self, prefix: torch.Tensor, word_ids: torch.Tensor,
                head: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """prefix (B, 1+N, D) projected image regions, word_ids (B, K), head (..., D) -> (..., V) the LM head."""
        wanted = word_ids != IGNORE_INDEX  # (B, K)
        if not wanted.any():
            zero = prefix.sum() * 0.0
            return {"loss_align": zero, "align_acc": zero.detach()}
        log_probs = head(prefix[:, 1:]).log_softmax(-1)  # (B, N, V)
        index = word_ids.clamp(min=0)[:, None, :].expand(-1, log_probs.shape[1], -1)  # (B, N, K)
        best = log_probs.gather(-1, index).amax(1)  # (B, K): the best region for each name
        loss = -best[wanted].mean()
        # a name is "found" when some region's read-out ranks it first
        top = log_probs.argmax(-1)  # (B, N)
        found = (top[:, :, None] == word_ids[:, None, :]).any(1)  # (B, K)
        return {"loss_align": loss, "align_acc": found[wanted].float().mean().detach()}
