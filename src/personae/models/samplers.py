"""The next-token samplers beyond top-k / top-p: OpenAI's penalties and logit bias, min-p, typical-p, XTC, DRY.

Every function takes (B, V) logits and per-row (B,) settings, where a setting's "off" value leaves
a row unchanged, so a batch that mixes settings needs no grouping (DRY reads each row's whole context: its rows are
padded into one tensor). The engine's order is: logit bias, penalties, DRY, loop breaking
(the distribution logprobs report), then temperature, top-k, top-p, typical-p, min-p, XTC, draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DRY_MAX_MATCH = 50  # DRY follows a repeat back at most this many tokens (the penalty's exponent is capped with it)
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a logit_bias value: -100..100


def apply_frequency_presence(logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor,
                             presence: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties: logit -= count * frequency + (count > 0) * presence.

    counts (B, V) how often each row generated each token so far; frequency, presence (B,).
    """
    counts = counts.to(logits.dtype)
    return logits - counts * frequency[:, None] - (counts > 0).to(logits.dtype) * presence[:, None]


def filter_typical_p(logits: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al.): keep the tokens whose surprise is closest to the
    entropy, fewest first, until their mass reaches typical_p (B,) (1.0: off); the rest -> -inf."""
    on = typical_p < 1.0
    if not bool(on.any()):
        return logits
    log_probs = logits.log_softmax(-1)
    probs = log_probs.exp()
    entropy = -(log_probs * probs).nansum(-1, keepdim=True)  # -inf * 0 is nan: those tokens add nothing
    distance = (-log_probs - entropy).abs()
    order = distance.argsort(-1)
    cumulative = probs.gather(-1, order).cumsum(-1)
    # keep a token while the mass of the tokens before it is under typical_p (the first is always kept)
    drop_sorted = cumulative - probs.gather(-1, order) >= typical_p[:, None].to(probs.dtype)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted) & on[:, None]
    return logits.masked_fill(drop, float("-inf"))


def filter_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop (-inf) every token whose probability is under min_p (B,) times the most likely token's (0: off)."""
    on = min_p > 0
    if not bool(on.any()):
        return logits
    probs = logits.softmax(-1)
    floor = min_p[:, None].to(probs.dtype) * probs.max(-1, keepdim=True).values
    return logits.masked_fill((probs < floor) & on[:, None], float("-inf"))


def exclude_top_choices(logits: torch.Tensor, threshold: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """XTC (exclude top choices): in each `active` (B,) bool row with at least two tokens of probability
    >= threshold (B,), all of them but the least likely are dropped (-inf), as llama.cpp does."""
    if not bool(active.any()):
        return logits
    probs = logits.softmax(-1)
    above = probs >= threshold[:, None].to(probs.dtype)
    least = probs.masked_fill(~above, float("inf")).min(-1, keepdim=True).values
    rows = active & (above.sum(-1) >= 2)
    return logits.masked_fill(above & (probs > least) & rows[:, None], float("-inf"))


def dry_penalties(context: torch.Tensor, breakers: torch.Tensor, multiplier: float, base: float,
                  allowed_length: int) -> torch.Tensor:
    """DRY ("don't repeat yourself") penalties (V,) for one row's context (L,) of token ids (see dry_penalties_rows)."""
    return dry_penalties_rows([context], breakers[None], torch.tensor([multiplier]), torch.tensor([base]),
                              torch.tensor([allowed_length]))[0]


def dry_penalties_rows(contexts: Sequence[torch.Tensor], breakers: torch.Tensor, multiplier: torch.Tensor,
                       base: torch.Tensor, allowed_length: torch.Tensor) -> torch.Tensor:
    """DRY penalties (R, V) for R rows: contexts (each (L_r,) token ids), breakers (R, V) bool, settings (R,).

    For each earlier position j, the match is the length of the longest run of tokens ending the
    context that also ends just before j (no run crosses a sequence-breaker token). The token at j
    would extend that repeat; when the match is at least allowed_length it is penalised by
    multiplier * base ** (match - allowed_length), the largest over its positions. The contexts are
    right-aligned in one (R, L) tensor (padding -1 on the left acts as a breaker), so the rows are
    followed back together, one vectorised comparison per step back.
    """
    rows, vocab = breakers.shape
    width = max(len(c) for c in contexts)
    padded = torch.full((rows, width), -1, dtype=torch.long)
    for r, context in enumerate(contexts):
        padded[r, width - len(context):] = context
    is_breaker = breakers.gather(1, padded.clamp(min=0)) | (padded < 0)  # (R, L)
    j = torch.arange(1, width)  # the candidate positions (the token at j follows the match)
    match = torch.zeros(rows, max(width - 1, 0), dtype=torch.long)
    alive = torch.ones_like(match, dtype=torch.bool) & (padded[:, 1:] >= 0)
    going = torch.ones(rows, dtype=torch.bool)  # rows whose ending has not yet reached a breaker
    for k in range(1, min(width, DRY_MAX_MATCH + 1)):
        going &= ~is_breaker[:, width - k]
        earlier = (j - k).clamp(min=0)
        alive &= going[:, None] & (j - k >= 0) & (padded[:, earlier] == padded[:, width - k, None])
        if not bool(alive.any()):
            break
        match += alive.long()
    penalties = torch.zeros(rows, vocab)
    hit = (match >= allowed_length[:, None]) & (multiplier[:, None] > 0)
    if not bool(hit.any()):
        return penalties
    exponent = (match - allowed_length[:, None]).clamp(0, DRY_MAX_MATCH).double()
    amounts = (multiplier[:, None].double() * base[:, None].double() ** exponent).float() * hit
    return penalties.scatter_reduce(1, padded[:, 1:].clamp(min=0), amounts, reduce="amax")


def breaker_tokens(decode_one: Sequence[str], breakers: Sequence[str], special: Sequence[int]) -> torch.Tensor:
    """(V,) bool: the tokens whose text contains a sequence-breaker string, and the special tokens
    (role markers end a turn, so a repeat never runs across them)."""
    mask = torch.tensor([any(b and b in text for b in breakers) for text in decode_one], dtype=torch.bool)
    if special:
        mask[torch.tensor(sorted(special), dtype=torch.long)] = True
    return mask


__all__ = ["DRY_MAX_MATCH", "LOGIT_BIAS_LIMIT", "apply_frequency_presence", "breaker_tokens", "dry_penalties", "dry_penalties_rows",
           "exclude_top_choices", "filter_min_p", "filter_typical_p"]
