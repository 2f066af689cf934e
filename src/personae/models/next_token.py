"""The next-token pipeline, vectorised over rows with per-row settings, and streaming hold-back.

`SamplingParams` says how a row picks tokens, `RowRequest` / `Row` are one sequence's request and
decoding state (tokens, text, stop strings, what was streamed), `Generation` a finished reply.

Each stage takes (B, V) logits and per-row (B,) settings, so a batch mixing sampling settings
needs no grouping and no Python work per row (except the draws from each sampled row's generator).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from personae.data.tokenizer import Tokenizer
from personae.models.samplers import LOGIT_BIAS_LIMIT, exclude_top_choices, filter_min_p, filter_typical_p

MAX_LOOP_NGRAM = 8  # loop breaking looks at n-grams of up to this many tokens
XTC_SEED_OFFSET = 0x5EED  # XTC's generator is seeded with the row's seed + this
MAX_TOP_LOGPROBS = 20  # the most alternatives a token's logprobs may list (OpenAI's limit)
DRY_BREAKERS = ("\n", ":", '"', "*")  # DRY's default sequence breakers (SillyTavern's and llama.cpp's)


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
    frequency_penalty: float = 0.0  # logit -= count * this, count: times the token was generated (OpenAI's)
    presence_penalty: float = 0.0  # logit -= this for every token generated at least once (OpenAI's)
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to its logit (-100..100)
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one (0: off)
    typical_p: float = 1.0  # locally typical sampling: the mass kept, closest-to-entropy tokens first (1: off)
    dry_multiplier: float = 0.0  # DRY repeat penalty's scale (0: off)
    dry_base: float = 1.75  # DRY: the penalty grows by this factor per token of repeat past allowed_length
    dry_allowed_length: int = 2  # DRY: repeats this long are not penalised
    dry_sequence_breakers: Sequence[str] = DRY_BREAKERS  # DRY: a repeat never runs across a token holding one
    xtc_threshold: float = 0.1  # XTC: tokens at least this likely are the "top choices"
    xtc_probability: float = 0.0  # XTC: chance per step that all top choices but the least likely are dropped (0: off)
    logprobs: bool = False  # record each chosen token's logprob (after penalties, before temperature)
    top_logprobs: int = 0  # and this many most likely alternatives per token (at most MAX_TOP_LOGPROBS)

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_repeats >= 0, "max_repeats must be >= 0 (0: off)"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (all(abs(b) <= LOGIT_BIAS_LIMIT for b in self.logit_bias.values()), "logit_bias values must be in [-100, 100]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (0 < self.typical_p <= 1, "typical_p must be in (0, 1]"),
            (self.dry_multiplier >= 0, "dry_multiplier must be >= 0 (0: off)"),
            (self.dry_base >= 1, "dry_base must be >= 1"),
            (self.dry_allowed_length >= 1, "dry_allowed_length must be >= 1"),
            (0 <= self.xtc_threshold <= 1, "xtc_threshold must be in [0, 1]"),
            (0 <= self.xtc_probability <= 1, "xtc_probability must be in [0, 1]"),
            (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {self})")


@dataclass
class TokenLogprob:
    """A chosen token's log-probability and the most likely alternatives (id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Generation:
    """One finished reply: text (stop string excluded), token ids, and why it ended."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (end token or stop string) or "length"
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the params asked for them


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor | float) -> torch.Tensor:
    """CTRL-style: logits of already generated tokens are divided (if > 0) or multiplied by penalty.

    seen (B, V) bool; penalty a float or (B,) per row (1.0 leaves a row unchanged).
    """
    if not isinstance(penalty, torch.Tensor):
        penalty = torch.tensor([penalty], dtype=logits.dtype)
    penalty = penalty.to(logits.dtype)[:, None]  # (B or 1, 1)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def ban_loops(logits: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor, max_repeats: torch.Tensor,
              max_ngram: int = MAX_LOOP_NGRAM) -> torch.Tensor:
    """(B, V) logits with every token that would start one more copy of an n-gram already repeated
    `max_repeats` times in a row set to -inf.

    history (B, W) holds each row's last W generated ids, newest last (-1 before the first);
    lengths (B,) how many ids each row generated; max_repeats (B,) per row (0: off). W must be at
    least max_ngram * max(max_repeats).

    Greedy decoding of a small model falls into loops ("ho-ho-ho-ho-...", "land-dweller,
    land-dweller, ..."); a character's own words may repeat ("Hmmm", "blub blub", "La la la"), so
    a repeat is allowed `max_repeats` times and only the next one is refused. Unlike a repetition
    penalty, words used earlier in the reply (a sign-off after a tag) are not touched.
    """
    B, W = history.shape
    if W == 0:
        return logits
    n = torch.arange(1, max_ngram + 1)  # (N,) n-gram lengths
    back = torch.arange(W)  # (W,) how far back from the newest id
    newer = (W - 1 - back)[None].expand(max_ngram, W)  # (N, W) slot of the id `back` from the newest
    older = (newer - n[:, None]).clamp(min=0)  # the id one n-gram earlier
    periodic_at = history[:, newer] == history[:, older]  # (B, N, W)
    # the last n * r ids repeat one n-gram r times: each of the newest n * (r - 1) equals the one n before it
    needed = back[None, None] < (n[None, :, None] * (max_repeats[:, None, None] - 1))
    periodic = (periodic_at | ~needed).all(-1)  # (B, N)
    ban = periodic & (lengths[:, None] >= n[None] * max_repeats[:, None]) & (max_repeats[:, None] > 0)
    ban &= n[None] <= W
    rows, grams = ban.nonzero(as_tuple=True)
    if len(rows) == 0:
        return logits
    first = history[rows, (W - n[grams]).clamp(min=0)]  # the n-gram's first id starts the next copy
    logits = logits.clone()
    logits[rows, first] = float("-inf")
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | int = 0,
                       top_p: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the smallest set with mass >= top_p.

    top_k (B,) or an int (0: off), top_p (B,) or a float (1.0: off), per row.
    """
    B, V = logits.shape
    top_k = torch.as_tensor(top_k, dtype=torch.long).expand(B)
    top_p = torch.as_tensor(top_p, dtype=torch.float32).expand(B)
    k_on = (top_k > 0) & (top_k < V)
    if bool(k_on.any()):
        sorted_logits = logits.sort(dim=-1, descending=True).values
        kth = sorted_logits.gather(1, (top_k.clamp(min=1, max=V) - 1)[:, None])  # (B, 1)
        logits = logits.masked_fill((logits < kth) & k_on[:, None], float("-inf"))
    p_on = top_p < 1.0
    if bool(p_on.any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p[:, None].to(probs.dtype)  # mass before it already enough
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted) & p_on[:, None]
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@dataclass
class Truncation:
    """Per-row (B,) truncation settings applied to sampled rows after temperature; off values leave a row as it is."""

    top_k: torch.Tensor
    top_p: torch.Tensor
    typical_p: torch.Tensor | None = None
    min_p: torch.Tensor | None = None
    xtc_threshold: torch.Tensor | None = None
    xtc_active: torch.Tensor | None = None  # (B,) bool: rows whose XTC draw fired this step

    def rows(self, index: torch.Tensor) -> Truncation:
        """These settings for the rows `index` only."""

        def pick(values: torch.Tensor | None) -> torch.Tensor | None:
            return values[index] if values is not None else None

        return Truncation(self.top_k[index], self.top_p[index], pick(self.typical_p), pick(self.min_p),
                          pick(self.xtc_threshold), pick(self.xtc_active))

    def apply(self, scaled: torch.Tensor) -> torch.Tensor:
        """Top-k, top-p, typical-p, min-p, then XTC on temperature-scaled logits."""
        scaled = filter_top_k_top_p(scaled, self.top_k, self.top_p)
        if self.typical_p is not None:
            scaled = filter_typical_p(scaled, self.typical_p)
        if self.min_p is not None:
            scaled = filter_min_p(scaled, self.min_p)
        if self.xtc_active is not None and self.xtc_threshold is not None:
            scaled = exclude_top_choices(scaled, self.xtc_threshold, self.xtc_active)
        return scaled


def choose_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | Truncation,
                  top_p: torch.Tensor | None, sampled: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids: argmax for greedy rows, a draw for the `sampled` rows.

    `top_k` is the per-row top-k (with `top_p`), or a whole :class:`Truncation` (then `top_p` is
    None). sampled (S,) indexes the rows with temperature > 0 and uniform (S,) holds one U(0, 1)
    number per sampled row, drawn from the row's own generator; the token is where it falls in the
    cumulative softmax(logits / temperature) after truncation (inverse-CDF sampling: one random
    number per row and step, not one per vocabulary entry). So a row's reply depends neither on
    the other rows nor on the device. Greedy rows take the argmax: truncation never changes it
    except typical-p and XTC, which only sampled rows use.
    """
    truncation = top_k if isinstance(top_k, Truncation) else Truncation(top_k, top_p)  # type: ignore[arg-type]
    if len(sampled) == len(logits):  # every row samples: no greedy pass needed
        return _inverse_cdf(truncation.apply(logits / temperature[:, None]), uniform)
    tokens = logits.argmax(-1)
    if len(sampled):
        scaled = truncation.rows(sampled).apply(logits[sampled] / temperature[sampled, None])
        tokens[sampled] = _inverse_cdf(scaled, uniform)
    return tokens


def _inverse_cdf(scaled: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(S, V) logits and (S,) uniforms -> (S,) samples from softmax(scaled); -inf logits are never drawn."""
    cdf = scaled.softmax(-1).cumsum(-1)  # (S, V)
    target = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]
    # the first entry whose cdf exceeds the target: a token of probability 0 never is (its cdf equals the one before)
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=scaled.shape[-1] - 1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """(R, V) logits and (R,) chosen tokens -> each token's log-softmax value and the `top` best alternatives."""
    log_probs = logits.log_softmax(-1)
    chosen = log_probs.gather(1, tokens[:, None])[:, 0].tolist()
    if top > 0:
        values, ids = log_probs.topk(min(top, log_probs.shape[-1]), dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        alternatives = [[] for _ in chosen]
    return [TokenLogprob(t, lp, alt) for t, lp, alt in zip(tokens.tolist(), chosen, alternatives)]


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



@dataclass
class RowRequest:
    """What one row needs to start decoding."""

    prompt_ids: Sequence[int]
    pixel_values: torch.Tensor | None  # (3, S, S) normalised, or None for a text-only prompt
    params: SamplingParams
    seed: int  # of the row's own generator
    head_len: int = 0  # leading prompt tokens that many requests share (prefix-cached)
    adapter: str | None = None  # whose LoRA adapter this row decodes with (None: the model's own)
    ignore_eos: bool = False  # the end token is never sampled
    stream: bool = False  # the text is decoded every step (for new_text); else once, at the end
    owner: object = None  # the caller's tag (the scheduler's request and choice index)


class Row:
    """One decoding sequence: its request, generator, tokens, text, what was streamed, why it ended."""

    def __init__(self, request: RowRequest, tokenizer: Tokenizer, max_new: int) -> None:
        self.request, self.tokenizer, self.max_new = request, tokenizer, max_new
        self.params = request.params
        self.generator = torch.Generator().manual_seed(request.seed)
        self.draws = 0  # samples drawn so far from the generator (the engine draws a few steps at a time)
        # XTC's coin flips: a second generator, so the token draws are the same with XTC on or off
        self.xtc_generator = (torch.Generator().manual_seed(request.seed + XTC_SEED_OFFSET)
                              if self.params.xtc_probability > 0 else None)
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if self.params.logprobs else None  # one per id
        self.logprobs_emitted = 0  # logprobs already streamed
        self.emitted, self.finish = 0, ""
        self._text: str | None = ""
        self._eager = request.stream or any(self.params.stop)  # decode every step only when read every step

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.tokenizer.decode(self.ids)
        return self._text

    def push(self, token: int, logprob: TokenLogprob | None = None) -> None:
        """Record a sampled token (and its logprob): the end token, a stop string or the length limit end the row."""
        if token == self.tokenizer.eos_id and not self.request.ignore_eos:
            self.finish = "stop"
            return
        self.ids.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        self._text = None
        if self._eager and self.params.stop:
            text = self.text
            cut = min((text.find(s) for s in self.params.stop if s and s in text), default=-1)
            if cut >= 0:
                self._text, self.finish = text[:cut], "stop"
                return
        if len(self.ids) >= self.max_new:
            self.finish = "length"

    def new_text(self) -> str:
        """Text not yet emitted, holding back what may be half a character or the start of a stop string."""
        piece, self.emitted = stream_piece(self.text, self.emitted, bool(self.finish), self.params.stop)
        return piece

    def new_logprobs(self) -> list[TokenLogprob]:
        """Logprobs of the tokens pushed since the last call (streamed along with their text)."""
        if self.logprobs is None:
            return []
        fresh = self.logprobs[self.logprobs_emitted :]
        self.logprobs_emitted = len(self.logprobs)
        return fresh

    def generation(self) -> Generation:
        logprobs = list(self.logprobs) if self.logprobs is not None else None
        return Generation(text=self.text, token_ids=list(self.ids), finish_reason=self.finish or "length",
                          logprobs=logprobs)


__all__ = ["DRY_BREAKERS", "MAX_LOOP_NGRAM", "MAX_TOP_LOGPROBS", "Generation", "Row", "RowRequest", "SamplingParams",
           "TokenLogprob", "Truncation", "apply_repetition_penalty", "ban_loops", "choose_tokens",
           "filter_top_k_top_p", "stream_piece", "token_logprobs"]
