"""Causal decoder for replies, conditioned LLaVA-style on projected image regions as a prefix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from personae.config import DecoderCfg
from personae.models.cache import KVCache, SharedHeads
from personae.models.layers import MLP


def _add_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """total + a * b: in place when no gradient is recorded (generation: no new tensor per term),
    else out of place (training, and torch.func.vmap, which has no batching rule for addcmul_)."""
    return total.addcmul_(a, b) if not torch.is_grad_enabled() else torch.addcmul(total, a, b)


def token_shift(qkv: torch.Tensor, mix: torch.Tensor, recent: torch.Tensor | None, real: torch.Tensor | None,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each position's q/k/v projections with those of its `shift` previous real tokens.

    qkv (B, T, C) projections of the new positions; mix (shift+1, C) = [own, previous, one before,
    ...]; recent (B, shift, C) the projections of the real tokens before these positions, oldest
    first (None: there are none, zeros); real (B, T) marks real new positions (None: all are).
    Returns the mixed (B, T, C) and the projections of the last `shift` real tokens (B, shift, C).
    A zero projection contributes nothing, so "no previous token" needs no special case.
    """
    B, T, C = qkv.shape
    shift = mix.shape[0] - 1
    if real is None and T == 1 and recent is not None:  # a cached decode step: few ops, it runs every token
        window = torch.cat([recent, qkv], dim=1)  # (B, shift+1, C), oldest first
        return (window * mix.flip(0)).sum(1, keepdim=True), window[:, 1:]
    recent = qkv.new_zeros(B, shift, C) if recent is None else recent
    seq = torch.cat([recent, qkv], dim=1)  # (B, shift+T, C)
    mixed = qkv * mix[0]
    if real is None or lengths is not None:  # real positions are contiguous: t's s-th previous is t - s
        for s in range(1, shift + 1):
            mixed = _add_product(mixed, seq[:, shift - s : shift - s + T], mix[s])
        if lengths is None:
            return mixed, seq[:, T:]
        tail = lengths[:, None] + torch.arange(shift, device=qkv.device)  # seq slots of the last `shift` real
        return mixed, seq.gather(1, tail[..., None].expand(B, shift, C))
    # padding among the new positions: follow each position's chain of previous real slots
    slots = torch.arange(shift + T, device=qkv.device)
    real_seq = torch.cat([real.new_ones(B, shift), real.bool()], dim=1)  # the recent slots count as real
    last_real = torch.where(real_seq, slots, -1).cummax(dim=1).values  # (B, shift+T)
    before = torch.cat([last_real.new_zeros(B, 1), last_real[:, :-1]], dim=1)  # previous real slot
    index = before[:, shift:]  # (B, T); never below 0 within `shift` steps (recent slots are real)
    for s in range(1, shift + 1):
        mixed = _add_product(mixed, seq.gather(1, index[..., None].expand(B, T, C)), mix[s])
        index = before.gather(1, index)
    tail = [last_real[:, -1]]  # the last real slot, then the ones before it
    for _ in range(shift - 1):
        tail.append(before.gather(1, tail[-1][:, None])[:, 0])
    order = torch.stack(tail[::-1], dim=1)  # (B, shift), oldest first
    return mixed, seq.gather(1, order[..., None].expand(B, shift, C))


def shared_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                          shared: SharedHeads, layer: int) -> torch.Tensor:
    """One new token per row (q (B, H, 1, d)) attending, in one softmax, to its own slots (k, v
    (B, H, S, d), mask (B, 1, 1, S) or None) and, for rows with a shared head, to the head's slots.

    A head's keys and values are read once for all its rows (one matrix product), not once per row.
    """
    scale = q.shape[-1] ** -0.5
    own = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, 1, S); each row's own new slot is real
    if mask is not None:
        own = own.masked_fill(~mask, float("-inf"))
    top = own.amax(-1, keepdim=True)  # (B, H, 1, 1)
    heads = []
    for head, rows in shared.groups:
        keys = head.keys[layer, :, :, : head.length]  # (1, H, P, d)
        scores = torch.matmul(q[rows].permute(2, 1, 0, 3), keys.transpose(-1, -2)) * scale  # (1, H, n, P)
        heads.append(scores)
        top[rows] = torch.maximum(top[rows], scores.amax(-1, keepdim=True).permute(2, 1, 0, 3))
    weights = (own - top).exp()
    total, out = weights.sum(-1, keepdim=True), torch.matmul(weights, v)  # (B, H, 1, 1), (B, H, 1, d)
    for (head, rows), scores in zip(shared.groups, heads):
        weights = (scores - top[rows].permute(2, 1, 0, 3)).exp()  # (1, H, n, P)
        total[rows] += weights.sum(-1, keepdim=True).permute(2, 1, 0, 3)
        out[rows] += torch.matmul(weights, head.values[layer, :, :, : head.length]).permute(2, 1, 0, 3)
    return out / total


class CausalSelfAttention(nn.Module):
    """Fused-QKV causal attention on SDPA that reads and extends a KV cache when given one.

    With `shift` > 0 each position's queries, keys and values are a learned per-channel mix of its
    own and those of the `shift` previous tokens (a causal depthwise convolution over the sequence,
    as in Primer's multi-dconv-head attention). A key then says which *pieces* led up to its token,
    not only which token it follows, so copying a phrase keys on more than one sub-word piece. The
    mix starts as the identity (the token's own projections only). The cache keeps the previous
    tokens' projections (``KVCache.recent_qkv``), so a cached step projects only its new token.
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
                layer: int = 0, is_causal: bool = True, real: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D); mask (B, 1, T, S) bool (True = may attend), or None with is_causal saying
        whether plain causal attention (from position 0) or full attention (one new token) applies;
        real (B, T) marks the real new positions for the token shift (None: all are real), and
        lengths (B,) says they are right padding (see token_shift)."""
        B, T, D = x.shape
        qkv = self.qkv(x)  # (B, T, 3D)
        if self.shift:
            recent = cache.recent_qkv[layer] if cache is not None and cache.recent_qkv is not None else None
            qkv, last = token_shift(qkv, self.shift_mix, recent, real, lengths)
            if cache is not None and cache.recent_qkv is not None:
                cache.recent_qkv[layer] = last
        q, k, v = qkv.view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, d)
        if cache is not None:
            start = cache.length
            cache.keys[layer, :, :, start : start + T] = k
            cache.values[layer, :, :, start : start + T] = v
            k, v = cache.keys[layer, :, :, : start + T], cache.values[layer, :, :, : start + T]  # (B, H, S, d)
        if cache is not None and cache.shared is not None and T == 1:
            y = shared_head_attention(q, k, v, mask, cache.shared, layer)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and is_causal,
                dropout_p=self.dropout if self.training else 0.0,
            )
        return self.proj(y.transpose(1, 2).reshape(B, T, D))

    def causal_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, T) attention weights of a causal pass from position 0 over x (B, T, D), no cache:
        softmax(q k^T / sqrt(d)) of the token-shifted q and k that forward uses (read-only diagnosis)."""
        B, T, D = x.shape
        qkv = self.qkv(x)
        if self.shift:
            qkv, _ = token_shift(qkv, self.shift_mix, None, None)
        q, k, _ = qkv.view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, d)
        scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)


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
                is_causal: bool = True, real: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        attended = self.attn(self.ln_1(x), mask, cache, layer, is_causal, real, lengths)
        x = x + (self.drop(attended) if self.training else attended)  # no dropout call per decoded token
        return x + self.mlp(self.ln_2(x))


class Decoder(nn.Module):
    """Token embeddings, learned positions, causal blocks and an LM head tied to the embeddings.

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
        self.ln_f = nn.LayerNorm(cfg.width)

    @property
    def head_dim(self) -> int:
        return self.cfg.width // self.cfg.heads

    @property
    def max_len(self) -> int:
        return self.cfg.max_len

    def new_cache(self, batch: int, max_len: int | None = None, *, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> KVCache:
        """An empty cache for `batch` sequences of up to max_len (default cfg.max_len) positions."""
        return KVCache.empty(len(self.blocks), batch, self.cfg.heads, max_len or self.cfg.max_len, self.head_dim,
                             self.cfg.shift, device=device, dtype=dtype)

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
        real = lengths = None  # which new positions are real, for the token shift (None: all of them)
        if attention_mask is not None and T > 1:
            real = attention_mask[:, start : start + T].bool()
            counts = real.sum(1)
            if (bool((torch.arange(T, device=real.device) < counts[:, None]).eq(real).all())
                    and bool(attention_mask[:, :start].all())):
                # right padding after real slots (the engine's prefill): a real query never reaches a pad
                # under the causal mask, so attention needs no padding mask, and the shift no slot chain
                lengths, attention_mask = counts, None
        mask, is_causal = self._mask(B, T, start, attention_mask, embeddings.device)
        if not self.cfg.shift:
            real = lengths = None
        for layer, block in enumerate(self.blocks):
            x = block(x, mask, cache, layer, is_causal, real, lengths)
        if cache is not None:
            cache.length = start + T
        return self.ln_f(x)

    @torch.no_grad()
    def forward_with_attention(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A teacher-forced causal pass (no cache, no padding mask: right padding never reaches a real
        query) -> its (B, T, D) hidden states and, per layer, the (B, H, T, T) attention weights it used."""
        inputs: list[torch.Tensor] = []  # each block's attention input (after ln_1), caught on the way

        def catch(module: nn.Module, args: tuple) -> None:
            inputs.append(args[0])

        hooks = [block.attn.register_forward_pre_hook(catch) for block in self.blocks]
        try:
            hidden = self(embeddings)
        finally:
            for hook in hooks:
                hook.remove()
        return hidden, [block.attn.causal_weights(x) for block, x in zip(self.blocks, inputs)]

    @staticmethod
    def _mask(B: int, T: int, start: int, attention_mask: torch.Tensor | None,
              device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """(causal + padding mask (B, 1, T, start+T), is_causal); no tensor when SDPA's flags suffice."""
        if attention_mask is None and start == 0:
            return None, True  # plain causal from position 0
        if T == 1:  # one new (real) token sees every cached position, or the real ones
            return (None if attention_mask is None else attention_mask[:, None, None, : start + 1]), False
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
