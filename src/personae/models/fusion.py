"""Fusion of image regions and words: bidirectional cross-modal attention or a single stream."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from personae.config import FusionCfg
from personae.models.layers import MLP, Block, SelfAttention, key_padding_to_sdpa


@dataclass
class FusionOutput:
    """Fused features: regions (B, N, D), words (B, T, D) and the fused cls (B, D) for ITM."""

    regions: torch.Tensor
    words: torch.Tensor
    cls: torch.Tensor


class CrossModalAttention(nn.Module):
    """Bidirectional cross-modal attention with one shared attention map.

    With region features v_i and word features w_j (after the learned projections, per head):
    alpha_ij = softmax_j(v_i . w_j * scale), v'_i = sum_j alpha_ij w_j, w'_j = sum_i alpha_ij v_i.
    With identity projections, one head and scale=1 this is exactly the bare formula of DESIGN.md.
    """

    def __init__(self, dim: int, heads: int, scale: float | None = None, update_regions: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"fusion width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.scale = scale if scale is not None else 1.0 / math.sqrt(dim // heads)
        self.region_proj = nn.Linear(dim, 2 * dim)  # regions -> (query, value for w')
        self.word_proj = nn.Linear(dim, 2 * dim)  # words -> (key, value for v')
        # the last fusion layer only updates words: nothing reads its regions
        self.region_out = nn.Linear(dim, dim) if update_regions else None
        self.word_out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, D2 = x.shape
        a, b = x.view(B, L, 2, self.heads, D2 // (2 * self.heads)).permute(2, 0, 3, 1, 4)
        return a, b  # each (B, H, L, d)

    def forward(
        self, regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """regions (B, N, D), words (B, T, D), word_mask (B, T) bool -> (v' (B, N, D) or None, w' (B, T, D))."""
        B, N, D = regions.shape
        T = words.shape[1]
        query, region_value = self._split(self.region_proj(regions))  # (B, H, N, d)
        key, word_value = self._split(self.word_proj(words))  # (B, H, T, d)
        logits = (query @ key.transpose(-1, -2)) * self.scale  # (B, H, N, T)
        if word_mask is not None:
            logits = logits.masked_fill(~word_mask[:, None, None, :], float("-inf"))
        alpha = logits.softmax(dim=-1)  # normalised over words j, as in the formula
        new_words = alpha.transpose(-1, -2) @ region_value  # (B, H, T, d): w'_j = sum_i alpha_ij v_i
        new_words = self.word_out(new_words.transpose(1, 2).reshape(B, T, D))
        if self.region_out is None:
            return None, new_words
        new_regions = alpha @ word_value  # (B, H, N, d): v'_i = sum_j alpha_ij w_j
        return self.region_out(new_regions.transpose(1, 2).reshape(B, N, D)), new_words


class CrossFusionLayer(nn.Module):
    """ALBEF-like layer made bidirectional: word self-attention, cross-modal attention, FFNs."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, update_regions: bool = True) -> None:
        super().__init__()
        self.ln_words = nn.LayerNorm(dim)
        self.word_attn = SelfAttention(dim, heads, dropout)
        self.ln_cross_regions = nn.LayerNorm(dim)
        self.ln_cross_words = nn.LayerNorm(dim)
        self.cross = CrossModalAttention(dim, heads, update_regions=update_regions)
        self.ln_mlp_words = nn.LayerNorm(dim)
        self.mlp_words = MLP(dim, mlp_ratio, dropout)
        self.update_regions = update_regions
        if update_regions:
            self.ln_mlp_regions = nn.LayerNorm(dim)
            self.mlp_regions = MLP(dim, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        words = words + self.drop(self.word_attn(self.ln_words(words), key_padding_to_sdpa(word_mask)))
        d_regions, d_words = self.cross(self.ln_cross_regions(regions), self.ln_cross_words(words), word_mask)
        words = words + self.drop(d_words)
        words = words + self.mlp_words(self.ln_mlp_words(words))
        if d_regions is not None:
            regions = regions + self.drop(d_regions)
            regions = regions + self.mlp_regions(self.ln_mlp_regions(regions))
        return regions, words


class CrossFusion(nn.Module):
    """A stack of bidirectional cross-modal layers; the fused cls is the first word (<cls>).

    The returned regions are the residual stream as the last layer read it (that layer updates
    only words, since no head reads regions after it).
    """

    def __init__(self, cfg: FusionCfg, dim: int, num_regions: int, max_words: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            CrossFusionLayer(dim, cfg.heads, cfg.mlp_ratio, dropout, update_regions=i < cfg.depth - 1)
            for i in range(cfg.depth)
        )
        self.ln_words = nn.LayerNorm(dim)

    def forward(self, regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor | None) -> FusionOutput:
        if word_mask is not None and bool(word_mask.all()):
            word_mask = None
        for layer in self.layers:
            regions, words = layer(regions, words, word_mask)
        words = self.ln_words(words)
        return FusionOutput(regions=regions, words=words, cls=words[:, 0])


class SingleStreamFusion(nn.Module):
    """X = [V; W] with modality and position embeddings, then self-attention blocks over both."""

    def __init__(self, cfg: FusionCfg, dim: int, num_regions: int, max_words: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.modality_embed = nn.Parameter(torch.zeros(2, dim))  # row 0: image, row 1: text
        self.pos_embed = nn.Parameter(torch.zeros(1, num_regions + max_words, dim))
        nn.init.trunc_normal_(self.modality_embed, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, cfg.heads, cfg.mlp_ratio, dropout) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor | None) -> FusionOutput:
        B, N, _ = regions.shape
        T = words.shape[1]
        x = torch.cat([regions + self.modality_embed[0], words + self.modality_embed[1]], dim=1)  # (B, N+T, D)
        x = x + self.pos_embed[:, : N + T]
        mask = None
        if word_mask is not None:
            full = torch.cat([word_mask.new_ones(B, N), word_mask], dim=1)  # regions are never padded
            mask = key_padding_to_sdpa(full)
        for block in self.blocks:
            x = block(x, mask)
        x = self.ln_f(x)
        return FusionOutput(regions=x[:, :N], words=x[:, N:], cls=x[:, N])


FUSIONS: dict[str, type[nn.Module]] = {"cross": CrossFusion, "single": SingleStreamFusion}


def build_fusion(cfg: FusionCfg, dim: int, num_regions: int, max_words: int, dropout: float = 0.0) -> nn.Module:
    """Look up model.fusion.kind in FUSIONS and build it."""
    if cfg.kind not in FUSIONS:
        raise ValueError(f"unknown model.fusion.kind '{cfg.kind}'; choose one of: {', '.join(FUSIONS)}")
    return FUSIONS[cfg.kind](cfg, dim, num_regions, max_words, dropout)
