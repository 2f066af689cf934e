"""Causal decoder for replies, conditioned LLaVA-style on projected image regions as a prefix; KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from personae.config import DecoderCfg
from personae.models.copy_attention import CopyAttention, previous_slots
from personae.models.layers import MLP


@dataclass
class KVCache:
    """Pre-allocated keys and values of every layer: (layers, B, H, max_len, d), filled up to `length`.

    With copy attention on, the layer after the blocks' is the copy layer's (its values: the
    normalised input embeddings). With `decoder.shift`, one more layer per block follows, whose keys
    hold that block's normalised attention inputs (what the token shift reads back for the previous
    tokens). Every operation on the cache treats all layers alike.
    """

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, layers: int, batch: int, heads: int, max_len: int, head_dim: int, *,
              device: torch.device, dtype: torch.dtype) -> KVCache:
        shape = (layers, batch, heads, max_len, head_dim)
        return cls(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))

    def select(self, rows: torch.Tensor) -> KVCache:
        """Keep only some batch rows (finished sequences dropped from a batch)."""
        return KVCache(self.keys[:, rows], self.values[:, rows], self.length)


class CausalSelfAttention(nn.Module):
    """Fused-QKV causal attention on SDPA that reads and extends a KV cache when given one.

    With `shift` > 0 each position's queries, keys and values are a learned per-channel mix of its
    own and those of the `shift` previous tokens (a causal depthwise convolution over the sequence,
    as in Primer's multi-dconv-head attention). A key then says which *pieces* led up to its token,
    not only which token it follows, so copying a phrase keys on more than one sub-word piece. The
    mix starts as the identity (the token's own projections only).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, shift: int = 0) -> None:
        super().__init__()
        self.heads, self.dropout, self.shift = heads, dropout, shift
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if shift:
            self.shift_mix = nn.Parameter(torch.zeros(shift + 1, 3 * dim))  # [own, previous, one before, ...]
            with torch.no_grad():
                self.shift_mix[0] = 1.0

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None,
                layer: int = 0, is_causal: bool = True, previous: torch.Tensor | None = None,
                shift_layer: int = 0) -> torch.Tensor:
        """x (B, T, D); mask (B, 1, T, S) bool (True = may attend), or None with is_causal saying
        whether plain causal attention (from position 0) or full attention (one new token) applies.
        For the token shift: previous (B, S) is each slot's previous real slot (-1: none; None when
        the T positions are a whole unpadded sequence), shift_layer the cache layer of the inputs."""
        B, T, D = x.shape
        qkv = self.qkv(x)  # (B, T, 3D)
        if self.shift:
            qkv = self._shifted(x, qkv, cache, previous, shift_layer)
        q, k, v = qkv.view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, d)
        if cache is not None:
            start = cache.length
            cache.keys[layer, :, :, start : start + T] = k
            cache.values[layer, :, :, start : start + T] = v
            k, v = cache.keys[layer, :, :, : start + T], cache.values[layer, :, :, : start + T]  # (B, H, S, d)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, D))

    def _shifted(self, x: torch.Tensor, qkv: torch.Tensor, cache: KVCache | None, previous: torch.Tensor | None,
                 shift_layer: int) -> torch.Tensor:
        """qkv (B, T, 3D) mixed with the projections of each position's `shift` previous real tokens."""
        B, T, D = x.shape
        mixed = qkv * self.shift_mix[0]
        if previous is None:  # a whole sequence: the previous tokens are the previous rows
            for s in range(1, self.shift + 1):
                mixed = mixed + F.pad(qkv, (0, 0, s, 0))[:, :T] * self.shift_mix[s]
            return mixed
        start = 0 if cache is None else cache.length
        inputs = x
        if cache is not None:  # earlier inputs come back from the cache (batching may leave gaps)
            cache.keys[shift_layer, :, :, start : start + T] = x.view(B, T, self.heads, -1).transpose(1, 2)
            inputs = cache.keys[shift_layer, :, :, : start + T].transpose(1, 2).reshape(B, start + T, D)
        before = previous[:, start:]  # (B, T)
        for s in range(1, self.shift + 1):
            found = before >= 0
            earlier = inputs.gather(1, before.clamp(min=0)[..., None].expand(B, T, D))  # (B, T, D)
            mixed = mixed + self.qkv(earlier) * found[..., None] * self.shift_mix[s]
            before = torch.where(found, previous.gather(1, before.clamp(min=0)), -1)
        return mixed


class DecoderBlock(nn.Module):
    """Pre-norm causal block (same parameter layout as layers.Block, so encoder weights can seed it)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, shift: int = 0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout, shift)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int,
                is_causal: bool = True, previous: torch.Tensor | None = None, shift_layer: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), mask, cache, layer, is_causal, previous, shift_layer))
        return x + self.mlp(self.ln_2(x))


class Decoder(nn.Module):
    """Token embeddings, learned positions, causal blocks and an LM head tied to the embeddings.

    With `cfg.copy`, a copy-attention layer (:mod:`personae.models.copy_attention`) follows the
    blocks, so words read in the prompt (a card's marker phrases) can be repeated in the reply.

    The image enters as a prefix: the vision tower's regions pass through a two-layer projector
    into the decoder's embedding space and are placed before the prompt tokens.
    """

    def __init__(self, cfg: DecoderCfg, vocab_size: int, image_width: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.max_len, cfg.width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.image_proj = nn.Sequential(nn.Linear(image_width, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.width))
        self.blocks = nn.ModuleList(DecoderBlock(cfg.width, cfg.heads, cfg.mlp_ratio, dropout, cfg.shift)
                                    for _ in range(cfg.depth))
        self.copy = CopyAttention(cfg.width, cfg.heads) if cfg.copy else None
        self.ln_f = nn.LayerNorm(cfg.width)

    @property
    def head_dim(self) -> int:
        return self.cfg.width // self.cfg.heads

    def new_cache(self, batch: int, max_len: int | None = None, *, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> KVCache:
        """An empty cache for `batch` sequences of up to max_len (default cfg.max_len) positions."""
        layers = len(self.blocks) * (2 if self.cfg.shift else 1) + (self.copy is not None)
        return KVCache.empty(layers, batch, self.cfg.heads, max_len or self.cfg.max_len, self.head_dim,
                             device=device, dtype=dtype)

    def _shift_layer(self, block: int) -> int:
        """The cache layer holding block's inputs for the token shift (past the blocks' and copy's)."""
        return len(self.blocks) + (self.copy is not None) + block

    def embed(self, input_ids: torch.Tensor, image_regions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids and optional (B, R, Dv) regions -> (B, R+T, D) input embeddings."""
        tokens = self.tok_embed(input_ids)  # (B, T, D)
        if image_regions is None:
            return tokens
        return torch.cat([self.image_proj(image_regions), tokens], dim=1)  # (B, R+T, D)

    def forward(self, embeddings: torch.Tensor, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Causal pass over (B, T, D) embeddings -> (B, T, D) hidden states.

        positions (B, T) index the position table (default: cache.length + arange(T));
        attention_mask (B, S) bool marks real (not padding) keys over the cached + new positions.
        """
        B, T, _ = embeddings.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_len:
            raise ValueError(f"sequence of {start + T} positions exceeds model.decoder.max_len={self.cfg.max_len}")
        if positions is None:
            positions = torch.arange(start, start + T, device=embeddings.device).expand(B, T)
        x = embeddings + self.pos_embed[0, positions]  # (B, T, D)
        mask, is_causal = self._mask(B, T, start, attention_mask, embeddings.device)
        previous = None  # the token shift's previous real slots, unless the T positions are all there is
        if self.cfg.shift and (cache is not None or attention_mask is not None):
            previous = previous_slots(0, start + T, attention_mask, B, embeddings.device)  # (B, S)
        for layer, block in enumerate(self.blocks):
            x = block(x, mask, cache, layer, is_causal, previous, self._shift_layer(layer))
        if self.copy is not None:
            x = x + self.copy(x, embeddings, mask, is_causal, cache, len(self.blocks), attention_mask)
        if cache is not None:
            cache.length = start + T
        return self.ln_f(x)

    @staticmethod
    def _mask(B: int, T: int, start: int, attention_mask: torch.Tensor | None,
              device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """(causal + padding mask (B, 1, T, start+T), is_causal); no tensor when SDPA's flags suffice."""
        if attention_mask is None and start == 0:
            return None, True  # plain causal from position 0
        if attention_mask is None and T == 1:
            return None, False  # one new token sees every cached position
        S = start + T
        causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=start)  # (T, S)
        if attention_mask is None:
            return causal[None, None], False
        keys = attention_mask[:, None, None, :S].bool()  # (B, 1, 1, S)
        # a padded query row would attend to nothing; let it see itself so SDPA gives no NaN
        eye = torch.zeros(T, S, dtype=torch.bool, device=device)
        eye[torch.arange(T), start + torch.arange(T)] = True
        return (causal[None, None] & keys) | eye[None, None], False

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V) with the head tied to the token embeddings."""
        return F.linear(hidden, self.tok_embed.weight)
