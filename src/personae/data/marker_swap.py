"""Marker swaps, the generic half of persona swapping: rewrite conversations and cards with a mapping.

A data kind that knows its characters' markers (the scene world's greetings, seeing phrase,
sign-off and quirk text) hands out a :class:`MarkerSwap`: ``mapping(character, key)`` draws
marker -> fresh phrase for one conversation or episode. Everything after that is generic and
lives here: every marker in the replies, user turns and prompt-facing card fields is replaced
(longest first, any case, keeping the case found); :func:`swap_conversations` gives fine-tuning
its swapped conversations and :class:`SwappedEpisodeCollator` gives meta-training its swapped
episodes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from personae.data.cards import CharacterCard
from personae.data.dialogues import DialogueRecord, DialogueTurn
from personae.data.prompt import PromptBuilder, PromptTooLong, Turn
from personae.data.roleplay import RolePlayDataset, collate_roleplay
from personae.errors import PersonaeError

log = logging.getLogger(__name__)

# the card fields a prompt shows (besides alternate_greetings, a list): a swap rewrites them all
SWAPPED_CARD_FIELDS = ("description", "personality", "scenario", "first_mes", "mes_example", "system_prompt",
                       "post_history_instructions")


Batch = dict[str, torch.Tensor]  # one collated batch: input_ids, labels, pixel_values, ...


class MarkerSwap(Protocol):
    """Draws, for one character and one key (a conversation index or a meta step), marker -> fresh phrase."""

    def mapping(self, character_id: str, key: int) -> Mapping[str, str]:
        """The same (character, key) must always give the same mapping, so a resumed run sees the same swaps."""
        ...


def match_case(found: str, replacement: str) -> str:
    """REPLACEMENT in the case of FOUND: upper, lower, capitalised, or as it is."""
    if found.isupper():
        return replacement.upper()
    if found.islower():
        return replacement.lower()
    if found[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


@functools.lru_cache(maxsize=256)
def _marker_pattern(markers: tuple[str, ...]) -> re.Pattern[str]:
    """One case-insensitive alternation of MARKERS, longest first (compiled once per character's markers)."""
    ordered = sorted(markers, key=len, reverse=True)
    return re.compile("|".join(re.escape(m) for m in ordered), re.IGNORECASE)


def rewrite(text: str, mapping: Mapping[str, str]) -> str:
    """Every marker of `mapping` in TEXT replaced (longest first, any case, keeping the case found)."""
    if not mapping or not text:
        return text
    lowered = {m.lower(): r for m, r in mapping.items()}
    return _marker_pattern(tuple(mapping)).sub(
        lambda found: match_case(found.group(0), lowered[found.group(0).lower()]), text)


def swap_record(record: DialogueRecord, mapping: Mapping[str, str]) -> DialogueRecord:
    """The conversation with its replies (and user turns) rewritten."""
    turns = tuple(DialogueTurn(rewrite(t.user, mapping), rewrite(t.reply, mapping), t.meta) for t in record.turns)
    return dataclasses.replace(record, turns=turns)


def swap_card(card: CharacterCard, mapping: Mapping[str, str]) -> CharacterCard:
    """The card with every prompt-facing text field rewritten."""
    changes: dict[str, Any] = {name: rewrite(getattr(card, name), mapping) for name in SWAPPED_CARD_FIELDS}
    changes["alternate_greetings"] = [rewrite(g, mapping) for g in card.alternate_greetings]
    return dataclasses.replace(card, **changes)


def swap_conversations(records: Sequence[DialogueRecord], cards: Mapping[str, CharacterCard], swap: MarkerSwap,
                       fraction: float, seed: int = 0) -> dict[int, tuple[DialogueRecord, CharacterCard]]:
    """A FRACTION of RECORDS (drawn with SEED), each rewritten with fresh markers, with its rewritten card.

    Returns index -> (swapped conversation, swapped card), the form RolePlayDataset's `variants`
    takes. Each swapped conversation gets its own draw (key = its index), so no fresh phrase recurs
    often enough to be learnt as a voice: copying it from the card is the only way to predict it.
    """
    if not 0.0 <= fraction <= 1.0:
        raise PersonaeError(f"the persona-swap fraction must be within [0, 1], got {fraction}")
    chosen = np.random.default_rng([seed, len(records)]).random(len(records)) < fraction
    variants = {}
    for index in np.flatnonzero(chosen).tolist():
        record = records[index]
        mapping = swap.mapping(record.character, index)
        variants[index] = (swap_record(record, mapping), swap_card(cards[record.character], mapping))
    return variants


class SwappedEpisodeCollator:
    """EpisodeCollator's interface, each episode's prompts rebuilt with a swap of its character.

    Images come from the pool dataset's cache; the `key` of `meta_batch` names the draw (the meta step).
    """

    def __init__(self, dataset: RolePlayDataset, pad_id: int, swap: MarkerSwap, cards: Mapping[str, CharacterCard],
                 *, max_tokens: int, include_examples: bool) -> None:
        self.dataset, self.pad_id, self.swap, self.cards = dataset, pad_id, swap, dict(cards)
        self.builder = PromptBuilder(dataset.tokenizer)
        self.max_tokens, self.include_examples = max_tokens, include_examples
        self.fallbacks = 0

    def _items(self, indices: Sequence[int], mapping: Mapping[str, str], card: CharacterCard) -> list[dict[str, Any]]:
        items = []
        for index in indices:
            record = swap_record(self.dataset.records[index], mapping)
            prompt = self.builder.build(card, [Turn(t.user, t.reply) for t in record.turns],
                                        max_tokens=self.max_tokens, include_examples=self.include_examples)
            item: dict[str, Any] = {"input_ids": torch.tensor(prompt.ids), "labels": torch.tensor(prompt.labels),
                                    "index": index}
            if self.dataset.images is not None:
                item["image"] = self.dataset.images[index]
            items.append(item)
        return items

    def episode(self, episode: Any, key: int) -> tuple[Batch, Batch]:
        """(support, query) batches of one episode under the swap drawn for `key`.

        If the fresh phrases make a prompt too long for the budget, the whole episode keeps its own
        markers (as fine-tuning's swapped conversations do); `fallbacks` counts such episodes.
        """
        try:
            return self._batches(episode, self.swap.mapping(episode.character, key))
        except PromptTooLong:
            self.fallbacks += 1
            if self.fallbacks == 1:
                log.warning("a swapped episode of %s does not fit %d tokens: it keeps its own markers "
                            "(further ones are counted, not logged)", episode.character, self.max_tokens)
            return self._batches(episode, {})

    def _batches(self, episode: Any, mapping: Mapping[str, str]) -> tuple[Batch, Batch]:
        card = swap_card(self.cards[episode.character], mapping)
        return (collate_roleplay(self._items(episode.support, mapping, card), self.pad_id),
                collate_roleplay(self._items(episode.query, mapping, card), self.pad_id))

    def meta_batch(self, episodes: Sequence[Any], key: int) -> list[tuple[Batch, Batch]]:
        """[(support, query), ...] for a meta-step; every task gets its own swap."""
        return [self.episode(episode, key) for episode in episodes]


__all__ = ["SWAPPED_CARD_FIELDS", "MarkerSwap", "SwappedEpisodeCollator", "match_case", "rewrite", "swap_card",
           "swap_conversations", "swap_record"]
