"""The one generation engine: a batch of rows that join, leave and share cached prompt heads.

`generate`, `stream_batch` (evaluation, chat, the CLI) and the server's scheduler all decode with
:class:`DecodeBatch`. Its rows live in one :class:`~personae.models.cache.KVCache` with one shared
write slot, so rows are *right-aligned*: a row's real slots end at the shared ``length`` and what
lies before them is masked out (``real`` is False there); positions are per row.

* **join**: newcomers are prefilled as right-padded groups (rows continuing one cached head, rows
  with an image, rows without), then written into the cache's spare rows (or, when they do not
  fit, all rows are copied once into a new cache).
* **leave**: finished or cancelled rows are dropped; rows from the end move into their holes.
* **room**: the cache grows when full, and when it reaches ``max_positions`` each row's real slots
  are gathered to the right, squeezing out the masked gaps.

One next-token pipeline (:mod:`personae.models.next_token`, :mod:`personae.models.samplers`, the
rows' settings in :mod:`personae.models.row_settings`) serves every row, vectorised over rows with
per-row settings: ignore-eos, logit bias, repetition / frequency / presence penalties, DRY, loop
breaking (then the optional logprobs), temperature / top-k / top-p / typical-p / min-p / XTC, and
inverse-CDF sampling with each row's own seeded CPU generator (a prompt and seed give the same
reply alone or batched, on any device). The model side is the small :class:`CausalLM` protocol, so a second decoder family plugs
in without touching the engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from personae.data.tokenizer import Tokenizer
from personae.models.adapter_bank import AdapterBank
from personae.models.cache import KVCache, PrefixCache, SharedHeads, image_digest
from personae.models.next_token import MAX_LOOP_NGRAM, Generation, Row, RowRequest, SamplingParams, choose_tokens
from personae.models.row_settings import RowSettings
from personae.models.samplers import breaker_tokens

DRAW_STEPS = 16  # a sampling row draws its uniform numbers this many steps at a time (one call, not one per step)


class CausalLM(Protocol):
    """What the engine needs of a model; :class:`~personae.models.model.PersonaeModel` implements it."""

    @property
    def max_positions(self) -> int: ...  # positions one sequence may take (image, prompt and reply)

    def image_prefix_length(self) -> int: ...  # positions an image takes before the prompt

    def embed_prompt(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor: ...

    def decode(self, embeddings: torch.Tensor, positions: torch.Tensor | None, attention_mask: torch.Tensor | None,
               cache: KVCache) -> torch.Tensor: ...

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def new_cache(self, batch: int, slots: int, *, device: torch.device, dtype: torch.dtype) -> KVCache: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    # optional: `supports_shared_heads = True` says decode() honours KVCache.shared (a prompt head
    # stored once for the rows it precedes); without it every row holds its own copy of the head


class AdapterRouting(Protocol):
    """Per-row LoRA adapters (the server's): a bank of adapters and the lock held around forwards."""

    lock: contextlib.AbstractContextManager
    bank: AdapterBank | None


@dataclass
class _Part:
    """Rows being joined: their cache, real-slot mask, next positions, logits and adapter slots."""

    cache: KVCache
    real: torch.Tensor  # (b, cache.length)
    positions: torch.Tensor  # (b,)
    logits: torch.Tensor  # (b, V)
    slots: torch.Tensor  # (b,)
    head: KVCache | None = None  # the shared prompt head before these rows' own slots (not copied into them)


class DecodeBatch:
    """The rows decoding together: one cache, one forward per step, one next-token pipeline."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, *, prefix_cache_bytes: int = 0,
                 adapters: AdapterRouting | None = None, max_rows: int = 0) -> None:
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.max_rows = max_rows  # rows the cache keeps room for, so that joins up to it need no copy
        # rows attend to a prefix-cached head stored once, when several rows may share it (a lone row
        # attends faster to its own copy through one fused attention call)
        self._share_heads = bool(getattr(model, "supports_shared_heads", False)) and max_rows > 1
        self.prefixes = PrefixCache(prefix_cache_bytes)
        self.max_len = model.max_positions
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.rows: list[Row] = []
        self.compactions = 0
        self._breaker_masks: dict[tuple[str, ...], torch.Tensor] = {}
        self.clear()

    # ---- membership ------------------------------------------------------------------------------

    def room(self, prompt_len: int, with_image: bool) -> int:
        """How many tokens a row with this prompt may generate before it fills max_positions."""
        return self.max_len - (self.model.image_prefix_length() if with_image else 0) - prompt_len

    @torch.inference_mode()
    def join(self, requests: Sequence[RowRequest]) -> list[Row]:
        """Prefill `requests` and add them to the batch; their rows, in request order."""
        rows = []
        for request in requests:
            room = self.room(len(request.prompt_ids), request.pixel_values is not None)
            if not request.prompt_ids or room < 1:
                raise ValueError(f"a prompt of {len(request.prompt_ids)} tokens leaves no room to reply "
                                 f"(max_positions={self.max_len})")
            rows.append(Row(request, self.tokenizer, min(request.params.max_new_tokens, room)))
        groups: dict[tuple, list[Row]] = {}
        for row in rows:
            groups.setdefault(self._group_key(row.request), []).append(row)
        with self._guard():
            parts = [self._prefill(key, group) for key, group in groups.items()]
        self._merge(parts, [row for group in groups.values() for row in group])
        return rows

    @torch.inference_mode()
    def leave(self, keep: Sequence[bool]) -> None:
        """Drop the rows where `keep` is False: kept rows from the end move into their holes (no full copy)."""
        if all(keep):
            return
        if not any(keep):
            self.clear()
            return
        count = sum(keep)
        holes = [i for i in range(count) if not keep[i]]
        movers = [i for i in range(count, len(keep)) if keep[i]]
        order = list(range(count))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        assert self.store is not None and self.cache is not None
        if holes:
            self.store.move_rows(torch.tensor(holes, device=self.device), torch.tensor(movers, device=self.device))
        self.cache = self.store.first_rows(count, self.cache.length)
        index = torch.tensor(order)
        on_device = index.to(self.device)
        self.rows = [self.rows[i] for i in order]
        self.real, self.positions, self.logits = self.real[on_device], self.positions[on_device], self.logits[on_device]
        self.slots, self.tokens = self.slots[on_device], self.tokens[index]
        self.counts, self.history, self.generated = self.counts[index], self.history[index], self.generated[index]
        self.uniform, self.row_head = self.uniform[index], self.row_head[index]
        self._settings_changed()

    def clear(self) -> None:
        """Forget every row."""
        self.rows, self.cache = [], None
        self.store: KVCache | None = None  # the allocated rows; `cache` is a view of the first len(rows)
        self.real = torch.zeros(0, 0, dtype=torch.bool, device=self.device)  # (B, capacity)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) next position per row
        self.logits = torch.zeros(0, 0, device=self.device)  # (B, V) next-token logits, not yet sampled
        self.slots = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) adapter slot per row
        self.tokens = torch.zeros(0, dtype=torch.long)  # (B,) the tokens sampled last, fed next
        self.counts = torch.zeros(0, 0, dtype=torch.int32)  # (B, V) how often each row generated each token
        self.history = torch.zeros(0, 0, dtype=torch.long)  # (B, W) last W generated ids, newest last, -1 before
        self.generated = torch.zeros(0, dtype=torch.long)  # (B,) tokens each row generated
        self.uniform = torch.zeros(0, DRAW_STEPS)  # (B, DRAW_STEPS) each sampling row's drawn uniforms
        self.heads: list[KVCache] = []  # shared prompt heads (one-row caches) the rows attend to
        self.row_head = torch.zeros(0, dtype=torch.long)  # (B,) each row's index in heads, -1: none
        self._settings_changed()

    # ---- a step ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def sample(self) -> torch.Tensor:
        """Choose each row's next token from the pending logits and push it to the row; (B,) tokens."""
        settings = self.settings
        logits = settings.penalise(self.logits.float().cpu(), self.counts, self.history, self.generated)
        if settings.sampled:
            tokens = choose_tokens(logits, settings.temperature, settings.truncation(), None, settings.sampled_index,
                                   self._uniforms())
        else:  # every row is greedy
            tokens = logits.argmax(-1)
        # rows without a penalty or a repeat limit never read these: they are kept only while one is in the batch
        if settings.counted:
            self.counts[torch.arange(len(tokens)), tokens] += 1
        if settings.loops:
            self.history = torch.cat([self.history[:, 1:], tokens[:, None]], dim=1)
            self.generated += 1
        logprobs = settings.logprobs(logits, tokens)
        for i, (row, token) in enumerate(zip(self.rows, tokens.tolist())):
            row.push(token, logprobs.get(i))
        self.tokens = tokens
        return tokens

    def _breakers(self, breakers: tuple[str, ...], vocab: int) -> torch.Tensor:
        """(V,) bool: DRY's sequence-breaker tokens for these strings (cached: one decode of the vocabulary)."""
        if breakers not in self._breaker_masks:
            texts = [self.tokenizer.decode([i]) for i in range(vocab)]
            special = [i for i in self.tokenizer.special_ids if i < vocab]
            self._breaker_masks[breakers] = breaker_tokens(texts, breakers, special)
        return self._breaker_masks[breakers]

    def _uniforms(self) -> torch.Tensor:
        """(sampled rows,) this step's U(0, 1) draw of each sampling row, from its own generator."""
        sampled = self.settings.sampled
        if not sampled:
            return self.uniform[:0, 0]
        phases = []
        for i in sampled:
            row = self.rows[i]
            phase = row.draws % DRAW_STEPS
            if phase == 0:
                self.uniform[i] = torch.rand(DRAW_STEPS, generator=row.generator)
            row.draws += 1
            phases.append(phase)
        return self.uniform[self.settings.sampled_index, torch.tensor(phases, dtype=torch.long)]

    @torch.inference_mode()
    def forward(self) -> None:
        """Feed each row's last sampled token and keep the next logits; makes room in the cache first."""
        assert self.cache is not None and self.rows, "forward() on an empty batch"
        if self.cache.length + 1 > self.cache.capacity:
            self._make_room()
        slot = self.cache.length
        self.real[:, slot] = True
        mask = None if self._gapless else self.real[:, : slot + 1]
        tokens = self.tokens.to(self.device)
        self.cache.shared = self._shared
        with self._guard(), self._route(self.slots):
            hidden = self.model.decode(self.model.embed_prompt(tokens[:, None]), self.positions[:, None], mask,
                                       self.cache)
            self.logits = self.model.lm_head(hidden[:, 0])
        self.positions = self.positions + 1

    # ---- joining --------------------------------------------------------------------------------

    def _group_key(self, request: RowRequest) -> tuple:
        """('head', prefix key) for a row whose head is prefix-cached, else ('image' | 'text',)."""
        head = min(request.head_len, len(request.prompt_ids) - 1)  # at least one token after the head
        if self.prefixes.enabled and head > 0:
            bank = self._bank
            slot = bank.slot(request.adapter) if bank is not None else 0
            adapter = (request.adapter, bank.version(request.adapter)) if bank is not None and slot else None
            return ("head", (image_digest(request.pixel_values), tuple(request.prompt_ids[:head]), adapter))
        return ("image",) if request.pixel_values is not None else ("text",)

    def _prefill(self, key: tuple, rows: list[Row]) -> _Part:
        """One right-padded forward of rows that share a group key (a cached head, or image-ness)."""
        bank = self._bank
        slots = torch.tensor([bank.slot(r.request.adapter) if bank is not None else 0 for r in rows],
                             device=self.device)
        with self._route(slots):
            if key[0] == "head":
                head_len = len(key[1][1])
                head = self.prefixes.get(key[1], lambda: self._prefill_alone(rows[0].request, head_len))
                suffixes = [r.request.prompt_ids[head_len:] for r in rows]
                part = self._prefill_ids(suffixes, None, head, slots, self._headroom(rows))
                # a lone row in an idle batch keeps its copy: one fused attention call is faster for it
                share = self._share_heads and (len(rows) > 1 or bool(self.rows))
                return self._without_head(part, head) if share else part
            pixels = None
            if key[0] == "image":
                pixels = torch.stack([r.request.pixel_values for r in rows]).to(self.device, self.dtype)
            return self._prefill_ids([r.request.prompt_ids for r in rows], pixels, None, slots, self._headroom(rows))

    def _prefill_alone(self, request: RowRequest, head_len: int) -> KVCache:
        """The one-row cache of [image; the first head_len prompt tokens]."""
        pixels = request.pixel_values[None].to(self.device, self.dtype) if request.pixel_values is not None else None
        return self._prefill_ids([request.prompt_ids[:head_len]], pixels, None, self.slots[:0]).cache

    @staticmethod
    def _without_head(part: _Part, head: KVCache) -> _Part:
        """The part's rows without their copy of the head's slots (they attend to the shared head instead)."""
        cache, start = part.cache, head.length
        recent = cache.recent_qkv
        own = KVCache(cache.keys[:, :, :, start:], cache.values[:, :, :, start:], recent, cache.length - start)
        return _Part(own, part.real[:, start:], part.positions, part.logits, part.slots, head)

    def _headroom(self, rows: Sequence[Row]) -> int:
        """The most tokens any of `rows` (and the running rows) may still generate."""
        return max(r.max_new - len(r.ids) for r in [*self.rows, *rows])

    def _prefill_ids(self, prompts: Sequence[Sequence[int]], pixels: torch.Tensor | None, head: KVCache | None,
                     slots: torch.Tensor, headroom: int = 0) -> _Part:
        """Right-padded prompts (on top of a one-row `head` cache, or from slot 0 with optional images),
        into a cache with `headroom` free slots after them (so a batch that is only these rows needs no copy)."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)  # (b,)
        b, width = len(prompts), int(lengths.max())
        padded = [list(prompt) + [self.tokenizer.pad_id] * (width - len(prompt)) for prompt in prompts]
        ids = torch.tensor(padded, dtype=torch.long, device=self.device)  # (b, width), right-padded
        start = head.length if head is not None else self.model.image_prefix_length() if pixels is not None else 0
        extra = max(0, min(headroom, self.max_len - start - width))
        if head is not None:
            cache = head.repeat(b, width + extra)
        else:
            cache = self.model.new_cache(b, start + width + extra, device=self.device, dtype=self.dtype)
        real = torch.ones(b, start + width, dtype=torch.bool, device=self.device)
        real[:, start:] = torch.arange(width, device=self.device) < lengths[:, None]
        mask = None if bool((lengths == width).all()) else real  # right padding: only the shift needs to know
        hidden = self.model.decode(self.model.embed_prompt(ids, pixels), None, mask, cache)  # (b, R+T, D)
        last = hidden[torch.arange(b), hidden.shape[1] - width + lengths - 1]  # each prompt's last real token
        return _Part(cache, real, start + lengths, self.model.lm_head(last), slots)

    def _merge(self, parts: list[_Part], rows: list[Row]) -> None:
        """Add the prefilled parts to the running rows, all right-aligned on one shared write slot.

        Newcomers that fit (no longer than the running rows, room left) are written into the spare
        rows in place; otherwise one new cache is built, with spare rows up to `max_rows`.
        """
        if self.rows:
            parts = [_Part(self.cache, self.real, self.positions, self.logits, self.slots), *parts]  # type: ignore[arg-type]
        length = max(p.cache.length for p in parts)
        capacity = min(self.max_len, length + self._headroom(rows))
        count = sum(p.cache.rows for p in parts)
        offsets = [length - p.cache.length for p in parts]
        if not self.rows and len(parts) == 1 and parts[0].cache.capacity >= capacity:
            self.store = parts[0].cache  # rows prefilled alone: their cache as it is
        elif (self.rows and self.store is not None and offsets[0] == 0 and self.store.capacity >= capacity
              and self.store.rows >= count):
            first = len(self.rows)
            for part, offset in zip(parts[1:], offsets[1:]):
                self.store.write_rows(first, part.cache, offset)
                first += part.cache.rows
        else:
            store = parts[0].cache.zeros_like(max(count, min(2 * count, self.max_rows)), capacity)
            first = 0
            for part, offset in zip(parts, offsets):
                store.write_rows(first, part.cache, offset)
                first += part.cache.rows
            self.store = store
        self.cache = self.store.first_rows(count, length)
        self.real = self._real_slots(parts, offsets, count)
        self.row_head = torch.cat([self.row_head] + [torch.full((p.cache.rows,), self._head_index(p.head))
                                                      for p in parts[1 if self.rows else 0:]])
        self.positions = torch.cat([p.positions for p in parts])
        self.logits = torch.cat([p.logits for p in parts])
        self.slots = torch.cat([p.slots for p in parts])
        fresh = len(rows)
        vocab = self.logits.shape[1]
        self.counts = torch.cat([self.counts.reshape(-1, vocab), torch.zeros(fresh, vocab, dtype=torch.int32)])
        self.generated = torch.cat([self.generated, torch.zeros(fresh, dtype=torch.long)])
        self.tokens = torch.cat([self.tokens, torch.zeros(fresh, dtype=torch.long)])
        self.uniform = torch.cat([self.uniform, torch.zeros(fresh, DRAW_STEPS)])
        self.rows = self.rows + rows
        width = MAX_LOOP_NGRAM * max(r.params.max_repeats for r in self.rows)
        history = torch.full((len(self.rows), width), -1, dtype=torch.long)
        kept = min(width, self.history.shape[1])
        if kept:
            history[: self.history.shape[0], width - kept :] = self.history[:, self.history.shape[1] - kept :]
        self.history = history
        self._settings_changed()

    def _head_index(self, head: KVCache | None) -> int:
        """Where `head` is in self.heads (added if new); -1 for no head."""
        if head is None:
            return -1
        for index, known in enumerate(self.heads):
            if known is head:
                return index
        self.heads.append(head)
        return len(self.heads) - 1

    def _share(self) -> None:
        """Drop heads no row attends to any more; group the rows by head for the decode steps."""
        used = sorted(set(self.row_head.tolist()) - {-1})
        if used != list(range(len(self.heads))):
            remap = torch.full((len(self.heads) + 1,), -1, dtype=torch.long)
            remap[torch.tensor(used, dtype=torch.long)] = torch.arange(len(used))
            self.row_head = remap[self.row_head]  # -1 indexes the last entry, which stays -1
            self.heads = [self.heads[h] for h in used]
        groups = [(head, (self.row_head == h).nonzero()[:, 0].to(self.device)) for h, head in enumerate(self.heads)]
        self._shared = SharedHeads(groups) if groups else None

    def _real_slots(self, parts: list[_Part], offsets: list[int], count: int) -> torch.Tensor:
        """(count, capacity) real-slot mask of the joined rows: each part's, moved right by its offset."""
        real = torch.zeros(count, self.store.capacity, dtype=torch.bool, device=self.device)  # type: ignore[union-attr]
        first = 0
        for part, offset in zip(parts, offsets):
            filled = part.cache.length
            real[first : first + part.cache.rows, offset : offset + filled] = part.real[:, :filled]
            first += part.cache.rows
        return real

    def _settings_changed(self) -> None:
        """The rows' sampling settings as (B,) tensors, the mask of gaps, and the rows' shared heads."""
        self.settings = RowSettings(self.rows, self.logits.shape[-1], self._breakers, self.tokenizer.eos_id)
        self._gapless = bool(self.real[:, : self.cache.length].all()) if self.cache is not None else True
        self._share()

    # ---- room in the cache ----------------------------------------------------------------------

    def _make_room(self) -> None:
        """Grow the cache by up to its size again (never past max_len), or compact it when at max_len."""
        assert self.cache is not None
        capacity = self.cache.capacity
        if capacity < self.max_len:
            grown = min(self.max_len, 2 * capacity)
            self.store = self.cache.grow(grown)
            self.cache = self.store.first_rows(self.store.rows, self.cache.length)
            self.real = torch.nn.functional.pad(self.real, (0, grown - capacity))
            return
        counts = self.real[:, : self.cache.length].sum(1)
        if int(counts.max()) >= self.max_len:
            raise RuntimeError(f"a row holds {int(counts.max())} real positions: no room left in "
                               f"max_positions={self.max_len}")
        self.store, self.real = self.cache.compact(self.real)
        self.cache = self.store.first_rows(self.store.rows, self.store.length)
        self.compactions += 1
        self._gapless = bool(self.real[:, : self.cache.length].all())

    # ---- adapters -------------------------------------------------------------------------------

    @property
    def _bank(self) -> AdapterBank | None:
        return self.adapters.bank if self.adapters is not None else None

    def _guard(self) -> contextlib.AbstractContextManager:
        """The adapters' lock: the model is not changed (LoRA added) during a forward."""
        return self.adapters.lock if self.adapters is not None else contextlib.nullcontext()

    def _route(self, slots: torch.Tensor) -> contextlib.AbstractContextManager:
        """Each row's adapter for the forwards inside (one slot for all when they agree)."""
        bank = self._bank
        if bank is None or len(slots) == 0:
            return contextlib.nullcontext()
        if bool((slots == slots[0]).all()):
            return bank.route(int(slots[0]))
        return bank.route(slots)


def _decode(model: CausalLM, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
            pixel_values: torch.Tensor | None, params: SamplingParams, stream: bool) -> Iterator[list[Row]]:
    """Decode a batch on one DecodeBatch; yield every row (in prompt order) after each step."""
    if not prompts:
        raise ValueError("every prompt needs at least one token")
    base_seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
    batch = DecodeBatch(model, tokenizer)
    requests = [RowRequest(p, pixel_values[i] if pixel_values is not None else None, params, base_seed + i,
                           stream=stream) for i, p in enumerate(prompts)]
    rows = batch.join(requests)
    while batch.rows:
        batch.sample()
        yield rows
        batch.leave([not row.finish for row in batch.rows])
        if batch.rows:
            batch.forward()


def stream_batch(model: CausalLM, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
                 pixel_values: torch.Tensor | None, params: SamplingParams) -> Iterator[list[str]]:
    """Decode a batch; yield, after every step, the new text piece of each row ('' when none)."""
    live: list[bool] | None = None
    for rows in _decode(model, tokenizer, prompts, pixel_values, params, stream=True):
        live = live or [True] * len(rows)
        yield [row.new_text() if was else "" for row, was in zip(rows, live)]
        live = [not row.finish for row in rows]


def generate(model: CausalLM, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
             pixel_values: torch.Tensor | None, params: SamplingParams) -> list[Generation]:
    """Decode a batch of prompts (token ids) with optional images (B, 3, S, S) to finished replies."""
    rows: list[Row] = []
    for rows in _decode(model, tokenizer, prompts, pixel_values, params, stream=False):
        pass
    return [row.generation() for row in rows]


__all__ = ["AdapterRouting", "CausalLM", "DecodeBatch", "Generation", "Row", "RowRequest", "SamplingParams",
           "generate", "stream_batch"]
