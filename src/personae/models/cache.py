"""The decoder's cache: keys and values of every block, and what the token shift reads back.

The parts have names and each is read:

* ``keys`` / ``values`` (blocks, B, H, slots, d): attention keys and values, filled up to ``length``.
* ``shared`` (optional): cached prompt heads that rows attend to before their own slots, stored
  once rather than copied into every row (the server's rows for one character share its card).
* ``recent_qkv`` (blocks, B, shift, 3D), only with ``decoder.shift``: the fused q/k/v projections of
  each row's last ``shift`` real tokens, oldest first (zeros where a row has fewer). A decode
  step mixes them into the new token's projections, so it runs one QKV projection per block,
  and the state is per row: it needs no slot index, whatever gaps batching leaves in the slots.

:class:`PrefixCache` keeps the one-row caches of prompt heads that many requests share.

Row operations (views of the first rows, writing rows in at an offset, moving rows into holes,
squeezing out the masked gaps) live here, so the generation engine never reaches inside the tensors.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SharedHeads:
    """Prompt heads that several rows attend to without holding a copy: (one-row head cache, its rows)."""

    groups: list[tuple[KVCache, torch.Tensor]]  # each: the head's cache and the (n,) rows it precedes


@dataclass
class KVCache:
    """Keys, values and token-shift projections of a batch of rows; see the module docstring."""

    keys: torch.Tensor  # (blocks, B, H, slots, d)
    values: torch.Tensor  # (blocks, B, H, slots, d)
    recent_qkv: torch.Tensor | None = None  # (blocks, B, shift, 3D): each row's last real projections
    length: int = 0  # slots written so far; the next write goes to slot `length`
    shared: SharedHeads | None = None  # heads before some rows' own slots, attended once for all (decoding)

    @classmethod
    def empty(cls, blocks: int, batch: int, heads: int, slots: int, head_dim: int, shift: int = 0, *,
              device: torch.device, dtype: torch.dtype) -> KVCache:
        """A cache for `batch` rows of up to `slots` positions; unwritten slots are zeros (never read unmasked)."""
        shape = (blocks, batch, heads, slots, head_dim)
        recent = None
        if shift:
            recent = torch.zeros(blocks, batch, shift, 3 * heads * head_dim, device=device, dtype=dtype)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   recent)

    @property
    def rows(self) -> int:
        return int(self.keys.shape[1])

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[3])

    @property
    def nbytes(self) -> int:
        parts = [self.keys, self.values] + ([self.recent_qkv] if self.recent_qkv is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def repeat(self, rows: int, extra_slots: int) -> KVCache:
        """This one-row cache copied to `rows` rows, with `extra_slots` free slots after `length`."""
        keys = F.pad(self.keys[:, :, :, : self.length], (0, 0, 0, extra_slots)).expand(-1, rows, -1, -1, -1)
        values = F.pad(self.values[:, :, :, : self.length], (0, 0, 0, extra_slots)).expand(-1, rows, -1, -1, -1)
        recent = self.recent_qkv.expand(-1, rows, -1, -1).clone() if self.recent_qkv is not None else None
        return KVCache(keys.clone(), values.clone(), recent, self.length)

    def grow(self, capacity: int) -> KVCache:
        """The same rows with room for `capacity` slots (new slots are zeros)."""
        pad = (0, 0, 0, capacity - self.capacity)
        return KVCache(F.pad(self.keys, pad), F.pad(self.values, pad), self.recent_qkv, self.length)

    def first_rows(self, rows: int, length: int) -> KVCache:
        """A view of the first `rows` rows (writes through it land here), filled up to `length`."""
        recent = self.recent_qkv[:, :rows] if self.recent_qkv is not None else None
        return KVCache(self.keys[:, :rows], self.values[:, :rows], recent, length)

    def zeros_like(self, rows: int, capacity: int) -> KVCache:
        """An empty (zero) cache of the same blocks and heads for `rows` rows of `capacity` slots."""
        blocks, _, heads, _, head_dim = self.keys.shape
        shape = (blocks, rows, heads, capacity, head_dim)
        recent = None
        if self.recent_qkv is not None:
            recent = self.recent_qkv.new_zeros(blocks, rows, *self.recent_qkv.shape[2:])
        return KVCache(self.keys.new_zeros(shape), self.values.new_zeros(shape), recent)

    def write_rows(self, first: int, source: KVCache, offset: int) -> None:
        """Copy `source`'s rows to rows first.. of this cache, its filled slots moved right by `offset`.

        The slots left of `offset` keep what they held (zeros or a departed row's finite values):
        the caller masks them out, and attention gives them weight 0.
        """
        rows, length = source.rows, source.length
        self.keys[:, first : first + rows, :, offset : offset + length] = source.keys[:, :, :, :length]
        self.values[:, first : first + rows, :, offset : offset + length] = source.values[:, :, :, :length]
        if self.recent_qkv is not None and source.recent_qkv is not None:
            self.recent_qkv[:, first : first + rows] = source.recent_qkv

    def move_rows(self, targets: torch.Tensor, sources: torch.Tensor) -> None:
        """Copy rows `sources` onto rows `targets` (filling the holes rows that left made)."""
        self.keys[:, targets] = self.keys[:, sources]
        self.values[:, targets] = self.values[:, sources]
        if self.recent_qkv is not None:
            self.recent_qkv[:, targets] = self.recent_qkv[:, sources]

    def compact(self, real: torch.Tensor) -> tuple[KVCache, torch.Tensor]:
        """Gather each row's real slots ((B, >= length) bool) to the right end of [0, new length).

        Returns the compacted cache (same capacity) and its real-slot mask (B, capacity).
        """
        real = real[:, : self.length]
        counts = real.sum(1)  # (B,)
        new_len = int(counts.max())
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # real slots first, in order
        target = torch.arange(new_len, device=real.device)[None] - (new_len - counts)[:, None]  # (B, new_len)
        valid = target >= 0
        index = torch.where(valid, order.gather(1, target.clamp(min=0)), torch.zeros_like(target))
        blocks, _, heads, _, head_dim = self.keys.shape
        gather = index[None, :, None, :, None].expand(blocks, -1, heads, -1, head_dim)
        keep = valid[None, :, None, :, None].to(self.keys.dtype)
        keys, values = torch.zeros_like(self.keys), torch.zeros_like(self.values)
        keys[:, :, :, :new_len] = self.keys.gather(3, gather) * keep
        values[:, :, :, :new_len] = self.values.gather(3, gather) * keep
        mask = torch.zeros(real.shape[0], self.capacity, dtype=torch.bool, device=real.device)
        mask[:, :new_len] = valid
        return KVCache(keys, values, self.recent_qkv, new_len), mask


# (image digest, head token ids, (adapter id, version) or None: a head computed with an adapter is its own)
PrefixKey = tuple[str, tuple[int, ...], tuple[str, int] | None]


def image_digest(pixel_values: torch.Tensor | None) -> str:
    """A digest of an image's pixels ('' without an image): equal images share cache entries."""
    if pixel_values is None:
        return ""
    data = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class PrefixCache:
    """LRU map (image digest, head token ids, adapter) -> one-row KVCache of [image; head], within `max_bytes`.

    Every request to a character starts with the same tokens (system text and card definition)
    and often the same image (the avatar). Their cache does not depend on what follows (the
    decoder is causal), so it is computed once and each prompt prefills only its rest. To keep
    replies independent of what the cache holds, a row with a head always takes that path: the
    head alone (on a miss), then the rest on top of it.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[PrefixKey, KVCache] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def get(self, key: PrefixKey, compute: Callable[[], KVCache]) -> KVCache:
        """The entry of `key`, computing (and storing) it with `compute` on a miss."""
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return entry
        self.misses += 1
        entry = self._entries[key] = compute()
        while self._entries and self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)
        return entry


__all__ = ["KVCache", "PrefixCache", "PrefixKey", "SharedHeads", "image_digest"]
