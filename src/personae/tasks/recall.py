"""Associative recall on random tokens: the decoder learns to copy from its context before it talks.

A sequence is a random segment of the vocabulary's ordinary tokens followed by the same segment
again; the loss is on the repeat, where every token can be read off the first copy (the token that
followed the previous occurrence of the current one: an induction head). Each sequence sits at a
random offset in the decoder's position table, so every position takes part.

Why: a small decoder fine-tuned on role-play alone memorises the characters' templates and never
leaves the long plateau before copying is learned (docs/lab/2026-12-02-copy-first.md: the tiny
decoder stays at chance on plain associative recall after 500 steps at the role-play learning
rate). A few hundred steps of this task get it over the plateau, so that role-play fine-tuning
starts from a decoder that can carry a name from the question, a marker from the card, or a word
from the image into its reply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from personae.data.labels import IGNORE_INDEX
from personae.models.model import PersonaeModel


def recall_batch(batch: int, length: int, low: int, vocab: int, max_positions: int,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`batch` sequences of `length` tokens: a random segment of ids in [low, vocab), then its repeat.

    labels (B, T) hold, at each position of the repeat but its last, the next token (IGNORE_INDEX
    elsewhere); positions (B, T) start at a random offset that keeps the sequence in the table.
    """
    if length < 4 or length % 2 or length > max_positions:
        raise ValueError(f"finetune.recall_length must be even, >= 4 and <= the decoder's {max_positions} "
                         f"positions, got {length}")
    half = length // 2
    segment = torch.randint(low, vocab, (batch, half), generator=generator)
    input_ids = torch.cat([segment, segment], dim=1)  # (B, T)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, half:-1] = input_ids[:, half + 1:]
    offset = torch.randint(0, max_positions - length + 1, (batch, 1), generator=generator)
    return {"input_ids": input_ids, "labels": labels, "positions": offset + torch.arange(length)}


class RecallTask(nn.Module):
    """Next-token loss of the decoder (no image) on recall_batch sequences; labels are already shifted."""

    def __init__(self, model: PersonaeModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        decoder = self.model.require_decoder()
        hidden = decoder(decoder.embed(batch["input_ids"]), positions=batch["positions"])  # (B, T, D)
        selected = batch["labels"] != IGNORE_INDEX
        logits = self.model.lm_head(hidden[selected])  # (M, V)
        wanted = batch["labels"][selected]
        return {"loss": F.cross_entropy(logits, wanted),
                "recall_acc": (logits.argmax(-1) == wanted).float().mean().detach()}
