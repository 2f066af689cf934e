"""Small Transformer building blocks: self-attention on SDPA with fused QKV, MLP, pre-norm block."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def key_padding_to_sdpa(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) bool mask of valid keys -> (B, 1, 1, T) SDPA mask, or None when nothing is padded."""
    if attention_mask is None or bool(attention_mask.all()):
        return None  # no mask lets SDPA pick its fastest kernel
    return attention_mask[:, None, None, :]


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
    is_causal: bool = False, dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, H, T, d) tensors; attn_mask (bool) marks allowed keys.

    F.scaled_dot_product_attention everywhere except on CPU in bf16/fp16 (autocast), where its
    flash kernel's backward is several times slower than plain matmuls (torch 2.13): there the
    same maths runs as two bmm and an fp32 softmax, which oneDNN turns into fast bf16 GEMMs.
    """
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, H, T, S)
    if is_causal:
        T, S = scores.shape[-2:]
        causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        attn_mask = causal if attn_mask is None else attn_mask & causal
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


@dataclass
class Packing:
    """Where the valid tokens of a right-padded (B, T) batch sit.

    Position-wise layers (LayerNorm, QKV, output projection, MLP) run on the (N, D) valid tokens
    only; attention scatters them back to (B, T, .) around one attention call. So the linear
    layers, nearly all of a training step's time, never compute on padding.
    """

    index: torch.Tensor  # (N,) flat positions of the valid tokens in B*T
    batch: int
    length: int
    attn_mask: torch.Tensor  # (B, 1, 1, T) bool, for SDPA

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> "Packing":
        B, T = attention_mask.shape
        index = attention_mask.reshape(-1).nonzero().squeeze(1)
        return cls(index, B, T, attention_mask[:, None, None, :])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (N, D) valid tokens."""
        return x.reshape(self.batch * self.length, x.shape[-1]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (B, T, D) with zeros at the padded positions."""
        out = x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy(0, self.index, x)
        return out.view(self.batch, self.length, x.shape[-1])


class SelfAttention(nn.Module):
    """Multi-head self-attention: one fused QKV projection, F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """x (B, T, D), or (N, D) valid tokens with `packing` (which then supplies the mask)."""
        qkv = self.qkv(x)
        if packing is not None:
            qkv, attn_mask = packing.unpack(qkv), packing.attn_mask
        B, T, D3 = qkv.shape
        D = D3 // 3
        q, k, v = qkv.view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, d)
        y = attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, T, d)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.proj(packing.pack(y) if packing is not None else y)


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear -> GELU -> Linear."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm Transformer block: x + SA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), attn_mask, is_causal, packing))
        return x + self.mlp(self.ln_2(x))


def init_weights(module: nn.Module) -> None:
    """GPT/BERT-style init: N(0, 0.02) for linear and embedding weights, zero biases, unit norms."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
