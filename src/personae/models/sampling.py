"""Generation with a KV cache: greedy / temperature / top-k / top-p, repetition penalty, stop strings, streaming.

Every row of a batch samples with its own seeded generator (Gumbel-max on per-row noise), so a
prompt gives the same reply alone or batched with others.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from personae.data.tokenizer import Tokenizer
from personae.models.model import PersonaeModel


@dataclass
class SamplingParams:
    """How to pick tokens; temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_repeats: int = 0  # > 0: no n-gram (n <= MAX_LOOP_NGRAM) repeats more than this many times in a row
    stop: Sequence[str] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_repeats >= 0, "max_repeats must be >= 0 (0: off)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {self})")


@dataclass
class Generation:
    """One finished reply: text (stop string excluded), token ids, and why it ended."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (end token or stop string) or "length"


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: logits of already generated tokens are divided (if > 0) or multiplied by penalty."""
    if penalty == 1.0 or not seen.any():
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


MAX_LOOP_NGRAM = 8


def loop_breakers(ids: Sequence[int], max_repeats: int, max_ngram: int = MAX_LOOP_NGRAM) -> set[int]:
    """Tokens that would start one more copy of an n-gram already repeated `max_repeats` times in a row.

    Greedy decoding of a small model falls into loops ("ho-ho-ho-ho-...", "land-dweller,
    land-dweller, ..."); a character's own words may repeat ("Hmmm", "blub blub", "La la la"), so
    a repeat is allowed `max_repeats` times and only the next one is refused. Unlike a repetition
    penalty, words used earlier in the reply (a sign-off after a tag) are not touched.
    """
    banned = set()
    for n in range(1, max_ngram + 1):
        span = n * max_repeats
        if len(ids) < span:
            break
        gram = list(ids[-n:])
        if all(list(ids[-span + k * n: len(ids) - span + (k + 1) * n]) == gram for k in range(max_repeats)):
            banned.add(gram[0])
    return banned


def ban_loops(logits: torch.Tensor, histories: Sequence[Sequence[int]], max_repeats: int) -> torch.Tensor:
    """(B, V) logits with each row's loop breakers (see loop_breakers) set to -inf; unchanged when off."""
    if max_repeats <= 0:
        return logits
    rows, columns = [], []
    for row, ids in enumerate(histories):
        for token in loop_breakers(ids, max_repeats):
            rows.append(row)
            columns.append(token)
    if not rows:
        return logits
    logits = logits.clone()
    logits[rows, columns] = float("-inf")
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the smallest set with mass >= top_p."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already enough
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids; each row draws from its own generator."""
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    # per-row CPU generators (reproducible on any device); the noise then moves to the logits
    noise = torch.stack([torch.rand(logits.shape[-1], generator=g) for g in generators]).to(logits.device)
    gumbel = -torch.log(-torch.log(noise.clamp(1e-20, 1.0 - 1e-7)))
    return (logits + gumbel).argmax(-1)  # Gumbel-max: a sample from softmax(logits)


def stream_piece(text: str, emitted: int, finished: bool, stops: Sequence[str]) -> tuple[str, int]:
    """(the text after `emitted` that may be sent now, the new emitted offset).

    While a reply is unfinished, a trailing half character (U+FFFD from a split UTF-8 sequence)
    and a tail that could be the start of a stop string are held back.
    """
    safe = len(text)
    if not finished:
        while safe > emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        for stop in stops:
            for k in range(min(len(stop) - 1, safe - emitted), 0, -1):
                if text[safe - k : safe] == stop[:k]:
                    safe -= k
                    break
    return text[emitted:safe], max(emitted, safe)


class _Row:
    """Book-keeping of one sequence while it decodes."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, seed: int, eager_text: bool = True) -> None:
        self.tokenizer, self.params = tokenizer, params
        self.generator = torch.Generator().manual_seed(seed)
        self.ids: list[int] = []
        self.emitted, self.finish = 0, ""
        self._text: str | None = ""
        # text is decoded every step only when stop strings or streaming need it
        self.eager = eager_text or any(self.params.stop)

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.tokenizer.decode(self.ids)
        return self._text

    def push(self, token: int) -> None:
        if token == self.tokenizer.eos_id:
            self.finish = "stop"
            return
        self.ids.append(token)
        self._text = None
        if self.eager:
            text = self.text
            cut = min((text.find(s) for s in self.params.stop if s and s in text), default=-1)
            if cut >= 0:
                self._text, self.finish = text[:cut], "stop"
                return
        if len(self.ids) >= self.params.max_new_tokens:
            self.finish = "length"

    def new_text(self) -> str:
        """Text not yet emitted, holding back what may be half a character or the start of a stop string."""
        piece, self.emitted = stream_piece(self.text, self.emitted, bool(self.finish), self.params.stop)
        return piece


@torch.no_grad()
def stream_batch(model: PersonaeModel, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
                 pixel_values: torch.Tensor | None, params: SamplingParams) -> Iterator[list[str]]:
    """Decode a batch; yield, after every step, the new text piece of each row ('' when none).

    The final yield carries any held-back text; `Generation`s are available via `generate`.
    """
    yield from _decode(model, tokenizer, prompts, pixel_values, params, rows_out=None, stream=True)


def _decode(model: PersonaeModel, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
            pixel_values: torch.Tensor | None, params: SamplingParams, rows_out: list | None,
            stream: bool) -> Iterator[list[str]]:
    device = next(model.parameters()).device
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    if B == 0 or int(lengths.min()) == 0:
        raise ValueError("every prompt needs at least one token")
    ids = torch.full((B, int(lengths.max())), tokenizer.pad_id, dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        ids[i, : len(prompt)] = torch.tensor(list(prompt), device=device)
    prefix = model.image_prefix_length() if pixel_values is not None else 0
    room = model.cfg.decoder.max_len - prefix - ids.shape[1]
    if room < 1:
        raise ValueError(f"prompt of {ids.shape[1]} tokens leaves no room in model.decoder.max_len")
    steps = min(params.max_new_tokens, room)
    base_seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
    rows = [_Row(tokenizer, params, base_seed + i, eager_text=stream) for i in range(B)]
    if rows_out is not None:
        rows_out.extend(rows)
    cache = model.decoder.new_cache(B, prefix + ids.shape[1] + steps, device=device,
                                    dtype=next(model.parameters()).dtype)
    logits = model.prefill(pixel_values, ids, lengths, cache)  # (B, V)
    real = torch.ones(B, prefix + ids.shape[1] + steps, dtype=torch.bool, device=device)
    real[:, prefix : prefix + ids.shape[1]] = torch.arange(ids.shape[1], device=device) < lengths[:, None]
    padded_rows = int((lengths != ids.shape[1]).sum())
    seen = torch.zeros_like(logits, dtype=torch.bool)
    active = torch.arange(B, device=device)
    for step in range(steps):
        live = active.tolist()
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        logits = ban_loops(logits, [rows[i].ids for i in live], params.max_repeats)
        tokens = choose_tokens(logits, params, [rows[i].generator for i in live])
        for i, token in zip(live, tokens.tolist()):
            rows[i].push(token)
        if step == steps - 1:
            for i in live:
                rows[i].finish = rows[i].finish or "length"
        if stream:
            streaming = set(live)
            yield [row.new_text() if i in streaming else "" for i, row in enumerate(rows)]
        keep = torch.tensor([not rows[i].finish for i in live], device=device)
        if not keep.any():
            return
        seen[torch.arange(len(active), device=device), tokens] = True
        if not keep.all():
            active, tokens, seen, cache = active[keep], tokens[keep], seen[keep], cache.select(keep)
        positions = prefix + lengths[active] + step
        mask = None if padded_rows == 0 else real[active, : cache.length + 1]  # no padding: no mask needed
        logits = model.decode_step(tokens, positions, mask, cache)


def generate(model: PersonaeModel, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
             pixel_values: torch.Tensor | None, params: SamplingParams) -> list[Generation]:
    """Decode a batch of prompts (token ids) with optional images (B, 3, S, S) to finished replies."""
    rows: list[_Row] = []
    for _ in _decode(model, tokenizer, prompts, pixel_values, params, rows_out=rows, stream=False):
        pass
    return [Generation(text=row.text, token_ids=row.ids, finish_reason=row.finish or "length") for row in rows]
