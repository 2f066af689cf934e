"""The sampling settings of a batch's rows as (B,) tensors, and the pipeline stages that read them.

:class:`~personae.models.generation.DecodeBatch` rebuilds a :class:`RowSettings` whenever its rows
change; each step it asks for the penalised logits (what logprobs report), the truncation for the
sampled rows (with this step's XTC coins), and the logprobs of the chosen tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from personae.models.next_token import (
    Row,
    SamplingParams,
    TokenLogprob,
    Truncation,
    apply_repetition_penalty,
    ban_loops,
    token_logprobs,
)
from personae.models.samplers import apply_frequency_presence, dry_penalties_rows

BreakerMask = Callable[[tuple[str, ...], int], torch.Tensor]  # (breaker strings, vocab) -> (V,) bool


class RowSettings:
    """Per-row (B,) settings of the rows decoding together, and which pipeline stages any row needs."""

    def __init__(self, rows: Sequence[Row], vocab: int, breakers: BreakerMask, eos_id: int) -> None:
        self.rows, self.vocab, self.breakers, self.eos_id = list(rows), vocab, breakers, eos_id
        params = [row.params for row in self.rows]
        self.temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        self.top_k = torch.tensor([p.top_k for p in params], dtype=torch.long)
        self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        self.penalty = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32)
        self.max_repeats = torch.tensor([p.max_repeats for p in params], dtype=torch.long)
        self.ignore_eos = torch.tensor([row.request.ignore_eos for row in self.rows], dtype=torch.bool)
        self.any_ignore_eos = bool(self.ignore_eos.any())
        self.sampled = [i for i, p in enumerate(params) if p.temperature > 0]
        self.sampled_index = torch.tensor(self.sampled, dtype=torch.long)
        self.penalised = any(p.repetition_penalty != 1.0 for p in params)
        self.loops = any(p.max_repeats > 0 for p in params)
        self.frequency = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32)
        self.presence = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32)
        self.freq_presence = any(p.frequency_penalty or p.presence_penalty for p in params)
        self.counted = self.penalised or self.freq_presence  # whether the batch keeps per-token counts
        self.bias = _logit_bias(params, vocab)
        sampled = [params[i] for i in self.sampled]  # truncation applies to sampled rows only
        self.typical = torch.tensor([p.typical_p for p in params]) if any(p.typical_p < 1 for p in sampled) else None
        self.min_p = torch.tensor([p.min_p for p in params]) if any(p.min_p > 0 for p in sampled) else None
        self.xtc = [i for i in self.sampled if params[i].xtc_probability > 0]
        self.xtc_threshold = torch.tensor([p.xtc_threshold for p in params]) if self.xtc else None
        self.dry = [i for i, p in enumerate(params) if p.dry_multiplier > 0]
        self.logprob_rows = torch.tensor([i for i, p in enumerate(params) if p.logprobs], dtype=torch.long)
        self.top_logprobs = max((p.top_logprobs for p in params if p.logprobs), default=0)

    def penalise(self, logits: torch.Tensor, counts: torch.Tensor, history: torch.Tensor,
                 generated: torch.Tensor) -> torch.Tensor:
        """Ignore-eos, logit bias, repetition / frequency / presence penalties, DRY and loop breaking."""
        if self.any_ignore_eos:
            logits[self.ignore_eos, self.eos_id] = float("-inf")
        if self.bias is not None:
            logits = logits + self.bias
        if self.penalised:
            logits = apply_repetition_penalty(logits, counts > 0, self.penalty)
        if self.freq_presence:
            logits = apply_frequency_presence(logits, counts, self.frequency, self.presence)
        if self.dry:
            logits[self.dry] -= self._dry_penalties()
        if self.loops:
            logits = ban_loops(logits, history, generated, self.max_repeats)
        return logits

    def _dry_penalties(self) -> torch.Tensor:
        """(D, V) DRY penalties of the rows using DRY, over each one's prompt and reply so far."""
        rows = [self.rows[i] for i in self.dry]
        contexts = [torch.tensor([*row.request.prompt_ids, *row.ids], dtype=torch.long) for row in rows]
        breakers = torch.stack([self.breakers(tuple(row.params.dry_sequence_breakers), self.vocab) for row in rows])
        params = [row.params for row in rows]
        return dry_penalties_rows(contexts, breakers, torch.tensor([p.dry_multiplier for p in params]),
                                  torch.tensor([p.dry_base for p in params]),
                                  torch.tensor([p.dry_allowed_length for p in params]))

    def truncation(self) -> Truncation:
        """This step's truncation of the sampled rows, with the XTC coins drawn."""
        return Truncation(self.top_k, self.top_p, self.typical, self.min_p, self.xtc_threshold, self._xtc_draws())

    def _xtc_draws(self) -> torch.Tensor | None:
        """(B,) bool: the rows whose XTC coin (from their second generator) came up this step; None: no XTC row."""
        if not self.xtc:
            return None
        active = torch.zeros(len(self.rows), dtype=torch.bool)
        for i in self.xtc:
            row = self.rows[i]
            active[i] = float(torch.rand((), generator=row.xtc_generator)) < row.params.xtc_probability
        return active

    def logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> dict[int, TokenLogprob]:
        """Row index -> its chosen token's logprob (and alternatives), for the rows that asked."""
        if not len(self.logprob_rows):
            return {}
        found = token_logprobs(logits[self.logprob_rows], tokens[self.logprob_rows], self.top_logprobs)
        return dict(zip(self.logprob_rows.tolist(), found))


def _logit_bias(params: Sequence[SamplingParams], vocab: int) -> torch.Tensor | None:
    """(B, V) bias added to the logits, or None when no row has a logit_bias."""
    if not any(p.logit_bias for p in params):
        return None
    bias = torch.zeros(len(params), vocab)
    for i, p in enumerate(params):
        for token, value in p.logit_bias.items():
            if not 0 <= int(token) < vocab:
                raise ValueError(f"logit_bias names token {token}, outside the vocabulary [0, {vocab})")
            bias[i, int(token)] = float(value)
    return bias


__all__ = ["RowSettings"]
