"""CLIP-style contrastive loss (ITC), distributed-aware: features are gathered inside the loss."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_features(features: torch.Tensor, rank: int, world_size: int, with_grad: bool = True) -> torch.Tensor:
    """All ranks' features stacked in rank order; the local slice keeps its gradient either way."""
    if world_size == 1:
        return features
    if with_grad:
        import torch.distributed.nn.functional as dist_fn

        return torch.cat(dist_fn.all_gather(features), dim=0)
    gathered = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(gathered, features.detach())
    gathered[rank] = features  # gradient flows through the local part only
    return torch.cat(gathered, dim=0)


class ContrastiveLoss(nn.Module):
    """L = -1/(2N) sum_i [log softmax_j(v_i.w_j/tau)_i + log softmax_j(w_i.v_j/tau)_i].

    `logit_scale` passed to forward is 1/tau (learnable in the model). With world_size > 1 each
    rank scores its local rows against the gathered columns (open_clip's local_loss with
    gather_with_grad); averaging the ranks' gradients (DDP) then gives the global loss's gradient.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.rank, self.world_size, self.gather_with_grad = rank, world_size, gather_with_grad

    def forward(
        self, image_embed: torch.Tensor, text_embed: torch.Tensor, logit_scale: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        B = image_embed.shape[0]
        all_images = gather_features(image_embed, self.rank, self.world_size, self.gather_with_grad)
        all_texts = gather_features(text_embed, self.rank, self.world_size, self.gather_with_grad)
        logits_per_image = logit_scale * image_embed @ all_texts.T  # (B, world*B)
        logits_per_text = logit_scale * text_embed @ all_images.T  # (B, world*B)
        labels = torch.arange(B, device=image_embed.device) + self.rank * B
        loss = 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
        local = slice(self.rank * B, (self.rank + 1) * B)
        return {
            "loss_itc": loss,
            "itc_acc": (logits_per_image.argmax(-1) == labels).float().mean().detach(),
            "temperature": (1.0 / logit_scale).detach(),
            # local similarities, for hard-negative mining in ITM
            "sim_i2t": logits_per_image[:, local].detach(),
            "sim_t2i": logits_per_text[:, local].detach(),
        }
