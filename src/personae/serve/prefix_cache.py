"""Prefix caching: the keys and values of a prompt's constant head, computed once and reused.

Every request to a character starts with the same tokens (system text and card definition, often
200 positions of a 230-position prompt) and, without an uploaded image, the same image (the
avatar). Their keys and values do not depend on what follows (the decoder is causal), so the
server computes them once per (image, head tokens) and prefills only the rest of each prompt.

To keep replies independent of what the cache happens to hold, a row with a head *always* takes
the same path: the head is prefilled alone (on a miss) and the rest on top of it. Entries are
evicted least-recently-used beyond a byte budget.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from personae.models.decoder import KVCache
from personae.models.model import PersonaeModel

# (image digest, head token ids, (adapter id, version) or None: a head computed with an adapter is its own)
PrefixKey = tuple[str, tuple[int, ...], tuple[str, int] | None]


@dataclass
class PrefixEntry:
    """The cached head of a prompt: keys and values (layers, 1, H, P, d) over image prefix + head tokens."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.keys.shape[3])

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2


def image_digest(pixel_values: torch.Tensor | None) -> str:
    """A digest of an image's pixels ('' without an image): equal images share cache entries."""
    if pixel_values is None:
        return ""
    data = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class PrefixCache:
    """LRU map (image digest, head token ids, adapter) -> PrefixEntry within `max_bytes`; counts hits and misses."""

    def __init__(self, model: PersonaeModel, max_bytes: int) -> None:
        self.model, self.max_bytes = model, max_bytes
        self.decoder = model._require_decoder()
        self._entries: OrderedDict[PrefixKey, PrefixEntry] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def get(self, key: PrefixKey, pixel_values: torch.Tensor | None) -> PrefixEntry:
        """The entry of `key`, computing (and storing) it on a miss."""
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return entry
        self.misses += 1
        entry = self._compute(key[1], pixel_values)
        self._entries[key] = entry
        while self._entries and self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)
        return entry

    @torch.no_grad()
    def _compute(self, head: Sequence[int], pixel_values: torch.Tensor | None) -> PrefixEntry:
        """Prefill [image; head] alone and keep its keys and values."""
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        ids = torch.tensor([list(head)], device=device)  # (1, P)
        pixels = pixel_values[None].to(device, dtype) if pixel_values is not None else None
        image = self.model.image_prefix_length() if pixels is not None else 0
        cache = self.decoder.new_cache(1, image + ids.shape[1], device=device, dtype=dtype)
        self.model.prefill(pixels, ids, torch.tensor([ids.shape[1]], device=device), cache)
        return PrefixEntry(cache.keys.clone(), cache.values.clone())


@torch.no_grad()
def prefill_on_prefix(model: PersonaeModel, entry: PrefixEntry, suffixes: Sequence[Sequence[int]],
                      pad_id: int) -> tuple[KVCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill right-padded `suffixes` that all continue one cached head.

    Returns the group's cache, its real-slot mask (b, P + T), each row's next position and its
    (b, V) logits, in the shapes :class:`~personae.serve.batch.DecodeBatch` merges.
    """
    device, dtype = entry.keys.device, entry.keys.dtype
    lengths = torch.tensor([len(s) for s in suffixes], device=device)  # (b,)
    if int(lengths.min()) == 0:
        raise ValueError("a prompt must go on after its cached head by at least one token")
    b, width, head = len(suffixes), int(lengths.max()), entry.length
    ids = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    for i, suffix in enumerate(suffixes):
        ids[i, : len(suffix)] = torch.tensor(list(suffix), device=device)
    layers, _, heads, _, head_dim = entry.keys.shape
    shape = (layers, b, heads, head + width, head_dim)
    # empty, not zeros: the head is copied in and the prefill writes every other slot (pads included)
    cache = KVCache(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype),
                    head)
    cache.keys[:, :, :, :head] = entry.keys  # broadcast the one cached row to the b rows
    cache.values[:, :, :, :head] = entry.values
    logits = model.prefill(None, ids, lengths, cache)  # positions continue from the head: head + j
    real = torch.ones(b, head + width, dtype=torch.bool, device=device)
    real[:, head:] = torch.arange(width, device=device) < lengths[:, None]
    return cache, real, head + lengths, logits
