"""ViT-style image encoder: the patch features are the image regions v_i."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from personae.config import VisionCfg
from personae.models.layers import Block


class VisionEncoder(nn.Module):
    """Patchify with a strided convolution, prepend a cls token, run pre-norm blocks."""

    def __init__(self, cfg: VisionCfg, dropout: float = 0.0) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(
                f"model.vision.image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}"
            )
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size  # patches a side
        self.num_patches = self.grid ** 2
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, cfg.width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, dropout) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, 1 + N, D) regions; index 0 is the cls region."""
        if pixel_values.shape[-1] != self.cfg.image_size or pixel_values.shape[-2] != self.cfg.image_size:
            raise ValueError(
                f"images are {tuple(pixel_values.shape[-2:])} but the model expects "
                f"{self.cfg.image_size}x{self.cfg.image_size}"
            )
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1+N, D)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


def pool_regions(regions: torch.Tensor, pool: int) -> torch.Tensor:
    """(B, 1+g*g, D) cls + patch grid -> (B, 1+(g/pool)^2, D): the grid average-pooled, cls kept."""
    if pool == 1:
        return regions
    B, n, D = regions.shape
    side = int(round((n - 1) ** 0.5))
    if side * side != n - 1 or side % pool:
        raise ValueError(f"cannot pool a {side}x{side} patch grid by {pool}")
    grid = regions[:, 1:].transpose(1, 2).reshape(B, D, side, side)  # (B, D, g, g)
    pooled = F.avg_pool2d(grid, pool).flatten(2).transpose(1, 2)  # (B, (g/p)^2, D)
    return torch.cat([regions[:, :1], pooled], dim=1)
