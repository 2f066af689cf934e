"""The running decode batch of the server: rows join and leave between steps (continuous batching).

Every row keeps its keys and values in one shared :class:`~personae.models.decoder.KVCache`. The
cache has one write slot for the whole batch, so rows are *right-aligned*: a row's real slots end
at the shared ``length`` and whatever lies before them is masked out (``real`` is False there).
Positions are per row, so a row's position embeddings do not depend on where its slots sit.

* **join**: newcomers are prefilled as their own right-padded mini-batch (exactly as
  :func:`personae.models.sampling.generate` prefills; rows whose prompt starts with a cached head
  prefill only the rest, see :mod:`personae.serve.prefix_cache`), then both caches are copied into
  a new one shifted so that they end at the same slot.
* **leave**: finished or cancelled rows are dropped with ``KVCache.select``.
* **compact**: when the shared slot reaches ``decoder.max_len`` each row's real slots are gathered
  to the right, squeezing out the masked gaps (a row never needs more than ``max_len`` slots).

Masked slots are zero-filled, never ``torch.empty``: attention gives them weight 0, and 0 * NaN
garbage would still be NaN.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from personae.models.decoder import KVCache
from personae.models.model import PersonaeModel
from personae.serve.prefix_cache import PrefixCache, image_digest, prefill_on_prefix

if TYPE_CHECKING:
    from personae.models.adapter_bank import AdapterBank
    from personae.serve.adapters import ServerAdapters


@dataclass
class RowInput:
    """What one row needs to start decoding: its prompt ids and its image (or None)."""

    prompt_ids: Sequence[int]
    pixel_values: torch.Tensor | None  # (3, S, S) normalised, or None for a text-only prompt
    head_len: int = 0  # leading prompt tokens that are the same for many requests (prefix-cached)
    adapter: str | None = None  # whose LoRA adapter this row decodes with (None: the model's own)


class DecodeBatch:
    """KV cache, padding mask, next positions and pending logits of the rows decoding together."""

    def __init__(self, model: PersonaeModel, pad_id: int, prefix_cache_bytes: int = 0,
                 adapters: ServerAdapters | None = None) -> None:
        self.model, self.pad_id, self.adapters = model, pad_id, adapters
        self.prefixes = PrefixCache(model, prefix_cache_bytes)
        self.decoder = model._require_decoder()
        self.max_len = self.decoder.cfg.max_len
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache: KVCache | None = None
        self.real = torch.zeros(0, 0, dtype=torch.bool, device=self.device)  # (B, capacity)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) next position per row
        self.logits = torch.zeros(0, 0, device=self.device)  # (B, V) next-token logits, not yet sampled
        self.slots = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) adapter slot per row
        self.compactions = 0

    @property
    def size(self) -> int:
        return int(self.positions.shape[0])

    @property
    def length(self) -> int:
        return self.cache.length if self.cache is not None else 0

    def prompt_room(self, prompt_len: int, with_image: bool) -> int:
        """How many tokens a row with this prompt may generate before it fills decoder.max_len."""
        prefix = self.model.image_prefix_length() if with_image else 0
        return self.max_len - prefix - prompt_len

    def _guard(self) -> contextlib.AbstractContextManager:
        """The adapters' lock: the model is not changed (LoRA added) during a forward."""
        return self.adapters.lock if self.adapters is not None else contextlib.nullcontext()

    @property
    def _bank(self) -> AdapterBank | None:
        return self.adapters.bank if self.adapters is not None else None

    def _route(self, slots: torch.Tensor) -> contextlib.AbstractContextManager:
        """Each row's adapter for the forwards inside (one slot for all when they agree)."""
        bank = self._bank
        if bank is None:
            return contextlib.nullcontext()
        if bool((slots == slots[0]).all()):
            return bank.route(int(slots[0]))
        return bank.route(slots)

    def _slot(self, row: RowInput) -> int:
        bank = self._bank
        return bank.slot(row.adapter) if bank is not None else 0

    @torch.no_grad()
    def join(self, rows: Sequence[RowInput], headroom: int) -> list[int]:
        """Prefill `rows` and append them to the batch; returns their indices in the order appended.

        One forward per group: rows continuing the same cached head, else rows with an image,
        else rows without. `headroom` is the most tokens any row may still generate: the cache
        is sized to hold it.
        """
        order: list[int] = []
        with self._guard():
            groups: dict[tuple, list[int]] = {}
            for i, row in enumerate(rows):
                groups.setdefault(self._group_key(row), []).append(i)
            for key, members in groups.items():
                group = [rows[i] for i in members]
                slots = torch.tensor([self._slot(r) for r in group], device=self.device)
                with self._route(slots):
                    if key[0] == "head":
                        entry = self.prefixes.get(key[1], group[0].pixel_values)
                        suffixes = [r.prompt_ids[len(key[1][1]):] for r in group]
                        self._merge(*prefill_on_prefix(self.model, entry, suffixes, self.pad_id), headroom, slots)
                    else:
                        self._merge(*self._prefill(group), headroom, slots)
                order += members
        return order

    def _group_key(self, row: RowInput) -> tuple:
        """('head', prefix key) for a row whose head is cached, else ('image' | 'text',).

        A cached head was computed with one adapter, so the key names the adapter and its version.
        """
        head = min(row.head_len, len(row.prompt_ids) - 1)  # at least one token is prefilled after the head
        if self.prefixes.enabled and head > 0:
            bank = self._bank
            adapter = (row.adapter, bank.version(row.adapter)) if bank is not None and self._slot(row) else None
            return ("head", (image_digest(row.pixel_values), tuple(row.prompt_ids[:head]), adapter))
        return ("image",) if row.pixel_values is not None else ("text",)

    def _prefill(self, rows: Sequence[RowInput]) -> tuple[KVCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded prefill of rows that all have, or all lack, an image (as `generate` does)."""
        lengths = torch.tensor([len(r.prompt_ids) for r in rows], device=self.device)  # (b,)
        if int(lengths.min()) == 0:
            raise ValueError("every prompt needs at least one token")
        ids = torch.full((len(rows), int(lengths.max())), self.pad_id, dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            ids[i, : len(row.prompt_ids)] = torch.tensor(list(row.prompt_ids), device=self.device)
        has_image = rows[0].pixel_values is not None
        pixels = torch.stack([r.pixel_values for r in rows]).to(self.device, self.dtype) if has_image else None
        prefix = self.model.image_prefix_length() if has_image else 0
        cache = self.decoder.new_cache(len(rows), prefix + ids.shape[1], device=self.device, dtype=self.dtype)
        logits = self.model.prefill(pixels, ids, lengths, cache)  # (b, V)
        real = torch.ones(len(rows), prefix + ids.shape[1], dtype=torch.bool, device=self.device)
        real[:, prefix:] = torch.arange(ids.shape[1], device=self.device) < lengths[:, None]
        return cache, real, prefix + lengths, logits

    def _merge(self, cache: KVCache, real: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor,
               headroom: int, slots: torch.Tensor) -> None:
        """Copy the current rows and the prefilled newcomers into one cache, both ending at one slot."""
        if self.cache is None or self.size == 0:
            old_len, new_len = 0, cache.length
        else:
            old_len, new_len = self.cache.length, max(self.cache.length, cache.length)
        capacity = min(self.max_len, new_len + headroom)
        old_rows, rows = self.size, self.size + len(positions)
        layers, _, heads, _, head_dim = cache.keys.shape
        shape = (layers, rows, heads, capacity, head_dim)
        # slots at and after new_len are written before they are read; only the gaps left of each row's
        # real slots are read (masked), and they must be zeros, not garbage
        merged = KVCache(torch.empty(shape, device=self.device, dtype=self.dtype),
                         torch.empty(shape, device=self.device, dtype=self.dtype), new_len)
        merged_real = torch.zeros(rows, capacity, dtype=torch.bool, device=self.device)
        parts = [(self.cache, self.real, slice(0, old_rows), old_len)] if old_rows else []
        parts.append((cache, real, slice(old_rows, rows), cache.length))
        for source, source_real, where, length in parts:
            start = new_len - length  # right-align: every row's last real slot is new_len - 1
            merged.keys[:, where, :, :start] = 0
            merged.values[:, where, :, :start] = 0
            merged.keys[:, where, :, start:new_len] = source.keys[:, :, :, :length]
            merged.values[:, where, :, start:new_len] = source.values[:, :, :, :length]
            merged_real[where, start:new_len] = source_real[:, :length]
        self.cache, self.real = merged, merged_real
        self.positions = torch.cat([self.positions, positions]) if old_rows else positions
        self.logits = torch.cat([self.logits, logits]) if old_rows else logits
        self.slots = torch.cat([self.slots, slots]) if old_rows else slots

    def keep(self, keep: torch.Tensor) -> None:
        """Drop the rows where `keep` (B,) bool is False."""
        if self.cache is None or bool(keep.all()):
            return
        if not bool(keep.any()):
            self.clear()
            return
        self.cache = self.cache.select(keep)
        self.real, self.positions, self.logits = self.real[keep], self.positions[keep], self.logits[keep]
        self.slots = self.slots[keep]

    def clear(self) -> None:
        """Forget every row (the batch is empty)."""
        self.cache = None
        self.real = self.real[:0]
        self.positions, self.logits, self.slots = self.positions[:0], self.logits[:0], self.slots[:0]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> None:
        """Feed one token per row (B,) and store the next logits; compacts or grows the cache first."""
        assert self.cache is not None, "step() on an empty batch"
        if self.cache.length + 1 > self.cache.keys.shape[3]:
            self._make_room()
        slot = self.cache.length
        self.real[:, slot] = True
        real = self.real[:, : slot + 1]
        mask = None if bool(real.all()) else real  # no gaps (e.g. one row): SDPA needs no mask
        with self._guard(), self._route(self.slots):
            self.logits = self.model.decode_step(tokens, self.positions, mask, self.cache)
        self.positions = self.positions + 1

    def _make_room(self) -> None:
        """Grow the cache by up to its size again (never past max_len), or compact it when at max_len."""
        cache = self.cache
        assert cache is not None
        capacity = cache.keys.shape[3]
        if capacity < self.max_len:
            grown = min(self.max_len, 2 * capacity)
            pad = (0, 0, 0, grown - capacity)  # pad the slot dimension of (L, B, H, S, d)
            self.cache = KVCache(torch.nn.functional.pad(cache.keys, pad),
                                 torch.nn.functional.pad(cache.values, pad), cache.length)
            self.real = torch.nn.functional.pad(self.real, (0, grown - capacity))
        else:
            self._compact()

    def _compact(self) -> None:
        """Gather every row's real slots to the right end, dropping the masked gaps between them."""
        cache = self.cache
        assert cache is not None
        real = self.real[:, : cache.length]  # (B, L)
        counts = real.sum(1)  # (B,)
        new_len = int(counts.max())
        if new_len >= self.max_len:
            raise RuntimeError(f"a row holds {new_len} real positions: no room left in decoder.max_len={self.max_len}")
        # for each row and each target slot j in [0, new_len): the source slot, or 0 where it is padding
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # real slots first, in order
        target = torch.arange(new_len, device=self.device)[None] - (new_len - counts)[:, None]  # (B, new_len)
        valid = target >= 0
        index = torch.where(valid, order.gather(1, target.clamp(min=0)), torch.zeros_like(target))
        gather = index[None, :, None, :, None].expand(cache.keys.shape[0], -1, cache.keys.shape[2], -1,
                                                        cache.keys.shape[4])
        keys = torch.zeros_like(cache.keys)
        values = torch.zeros_like(cache.values)
        keys[:, :, :, :new_len] = cache.keys.gather(3, gather)
        values[:, :, :, :new_len] = cache.values.gather(3, gather)
        self.cache = KVCache(keys, values, new_len)
        self.real = torch.zeros_like(self.real)
        self.real[:, :new_len] = valid
        self.compactions += 1

