"""Copy attention: an induction head built in, so the decoder can repeat words it has just read.

A character's voice lives in a few marker phrases ("Survey says", ", and the crowd goes wild") that
its card spells out right before the reply. A new character's markers are made of sub-word pieces
the model has rarely or never produced; a small decoder does not learn, from role-play data alone,
to copy them from its context (docs/meta-learning.md, "Learning new voices"). This layer makes
copying one step of attention:

* each position j offers a key built from its state and from the embedding of the token *before*
  it, and its own token embedding as the value;
* the query at position t is built from its state and its own token's embedding.

So a query for token x matches the positions that *follow* an earlier x, and reads out what came
next there: "Survey" finds "says" in "Introduce what you see with \"Survey says\"". The output goes
through a projection into the residual stream, which the tied LM head turns into logits. It is
initialised like every other layer (N(0, 0.02)) and learns to copy within a few hundred steps
(tests/unit/test_copy_attention.py: 98% of a repeated word right after 150 steps, 31% without it).

The values in the KV cache are the normalised input embeddings themselves, so the embedding before
a newly decoded token is read from the cache at that row's previous real slot: batching, padding
gaps and prefix caching need nothing from callers. Off by default (`model.decoder.copy`); what it
does and does not change in adaptation is measured in docs/meta-learning-experiments.md ("Beyond 0.7").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from personae.models.decoder import KVCache


def previous_slots(start: int, length: int, real: torch.Tensor | None, batch: int,
                   device: torch.device) -> torch.Tensor:
    """(B, length) index of each new position's previous real slot (-1 where there is none).

    New positions are start .. start+length-1; real (B, S >= start+length) marks real slots, or
    None when every slot is real (then the previous slot is simply the one before).
    """
    if real is None:
        return (torch.arange(start, start + length, device=device) - 1).expand(batch, length)
    slots = torch.arange(start + length, device=device)
    last_real = torch.where(real[:, : start + length].bool(), slots, -1).cummax(dim=1).values  # (B, S)
    before = torch.cat([last_real.new_full((batch, 1), -1), last_real[:, :-1]], dim=1)
    return before[:, start:]


class CopyAttention(nn.Module):
    """Pre-norm induction attention over the decoder's positions; see the module docstring."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(dim)  # the residual stream
        self.ln_embed = nn.LayerNorm(dim)  # the input embeddings (token or image region)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.query_embed = nn.Linear(dim, dim, bias=False)
        self.key_embed = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, embeddings: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                cache: KVCache | None = None, layer: int = 0, real: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) residual stream, embeddings (B, T, D) the inputs of the same positions;
        mask / is_causal as for the decoder's self-attention; real (B, S) marks real cache slots."""
        B, T, D = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, S, D) -> (B, H, S, d)
            return t.reshape(B, -1, self.heads, D // self.heads).transpose(1, 2)

        def merge(t: torch.Tensor) -> torch.Tensor:  # (B, H, S, d) -> (B, S, D)
            return t.transpose(1, 2).reshape(B, -1, D)

        embedded = self.ln_embed(embeddings)  # (B, T, D)
        values = split(embedded)  # (B, H, T, d)
        start = 0
        if cache is not None:
            start = cache.length
            cache.values[layer, :, :, start : start + T] = values
            values = cache.values[layer, :, :, : start + T]
        before = previous_slots(start, T, real, B, x.device)  # (B, T)
        index = before.clamp(min=0)[:, None, :, None].expand(B, self.heads, T, D // self.heads)
        previous = merge(values.gather(2, index)) * (before >= 0)[..., None]  # (B, T, D); only T slots read
        h = self.ln(x)
        q = split(self.query(h) + self.query_embed(embedded))
        k = split(self.key(h) + self.key_embed(previous))
        if cache is not None:
            cache.keys[layer, :, :, start : start + T] = k
            k = cache.keys[layer, :, :, : start + T]
        y = F.scaled_dot_product_attention(q, k, values, attn_mask=mask, is_causal=mask is None and is_causal)
        return self.proj(merge(y))
