"""Gradient checkpointing: blocks recompute their activations in the backward pass (less memory, more compute).

personae's own blocks (vision and text encoder blocks, fusion layers, decoder blocks) run under
`torch.utils.checkpoint` (non-reentrant) while the model trains with gradients on; Hugging Face
modules inside the model (an HF decoder's LM, CLIP / SigLIP / BERT towers) use their own
`activation_checkpointing_enable`. The state dict's names do not change: a block keeps its class and
only its `forward` is wrapped, so checkpoints load the same with or without.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from personae.models.decoder import DecoderBlock
from personae.models.fusion import CrossFusionLayer
from personae.models.layers import Block

OWN_BLOCKS = (Block, DecoderBlock, CrossFusionLayer)  # the repeated units whose activations dominate memory


def _checkpointed_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The class's forward, recomputed in backward when `module` trains with gradients (plain otherwise: eval, caches)."""
    forward = functools.partial(type(module).forward, module)
    if module.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def _is_checkpointed(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _checkpointed_forward


def enable_checkpointing(model: nn.Module) -> int:
    """Turn gradient checkpointing on in every own block and HF model inside `model`; return how many it switched.

    Idempotent: a block already wrapped, or an HF model already checkpointing (an outer HF model
    switches on its inner ones), is left as it is and not counted.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, OWN_BLOCKS):
            if not _is_checkpointed(module):
                # a partial over the module, not a closure: deepcopy and pickling carry it to the copy
                module.forward = functools.partial(_checkpointed_forward, module)
                count += 1
        elif getattr(module, "supports_gradient_checkpointing", False) and hasattr(module, "is_activation_checkpointing"):
            if not module.is_activation_checkpointing:  # transformers >= 5.24 (the hf extra's floor)
                module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                count += 1
    return count
