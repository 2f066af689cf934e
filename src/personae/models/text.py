"""Bidirectional Transformer text encoder giving the word features w_j."""

from __future__ import annotations

import torch
from torch import nn

from personae.config import TextCfg
from personae.models.layers import Block, Packing


class TextEncoder(nn.Module):
    """Token + learned position embeddings, pre-norm blocks, final LayerNorm."""

    def __init__(self, cfg: TextCfg, dropout: float = 0.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.max_len, cfg.width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, dropout) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)

    @property
    def word_embeddings(self) -> torch.Tensor:
        """(V, D) token embedding matrix (the MLM head's output weights are tied to it)."""
        return self.tok_embed.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids, (B, T) bool valid mask -> (B, T, D) word features."""
        T = input_ids.shape[1]
        if T > self.cfg.max_len:
            raise ValueError(f"text of {T} tokens is longer than model.text.max_len={self.cfg.max_len}")
        x = self.drop(self.tok_embed(input_ids) + self.pos_embed[:, :T])  # (B, T, D)
        if attention_mask is None or bool(attention_mask.all()):
            for block in self.blocks:
                x = block(x)
            return self.ln_f(x)
        # padded batch: run the position-wise layers on the valid tokens only; padded
        # positions of the result are zeros (every consumer masks them out)
        packing = Packing.from_mask(attention_mask)
        x = packing.pack(x)  # (N, D)
        for block in self.blocks:
            x = block(x, packing=packing)
        return packing.unpack(self.ln_f(x))
