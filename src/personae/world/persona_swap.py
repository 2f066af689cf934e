"""Persona-swapped episodes: for one episode, a train character speaks with freshly drawn markers.

Meta-learning over the 32 train characters has a trap: after role-play fine-tuning the model
already knows every train character, so the inner loop has nothing to learn from a support set
and the outer loop learns nothing about learning a *new* voice (the "memorisation problem" of
meta-learning, Yin et al. 2020). Held-out characters differ exactly there: their greetings,
seeing phrase, sign-off and quirk words were never seen.

A swap makes every meta-training task look like a held-out one: each marker of the episode's
character (greetings, seeing phrase, sign-off, quirk text) is replaced, in the card and in every
reply of its support and query conversations alike, by a phrase of fresh words drawn for that
episode. The words are made up (two in three) or come from :data:`WORDS`, never a word of any character's
markers or of the answer vocabulary, so a swap never teaches a held-out marker and never fakes an answer.
Draws are a pure function of (seed, episode key, character), so a resumed run sees the same swaps.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from personae.data.cards import CharacterCard
from personae.data.dialogues import DialogueRecord, DialogueTurn
from personae.data.prompt import PromptBuilder, PromptTooLong, Turn
from personae.data.roleplay import RolePlayDataset, collate_roleplay
from personae.errors import PersonaeError
from personae.world.catalog import OBJECTS
from personae.world.characters import Character, load_characters
from personae.world.styles import NEGATIVE_CUES, NEUTRAL_CUES, NO_WORDS, POSITIVE_CUES, SELF_INTRO_CUES, YES_WORDS

log = logging.getLogger(__name__)

WORDS = tuple("""
    amber anchor apricot arrow aurora autumn badger bagpipe bamboo banjo basil beacon beetle biscuit blossom
    bonfire bramble breeze bronze bubble bucket buckle button cabbage cactus candle canyon caramel carpet cedar
    chalk cherry chestnut cider cinnamon clover cobalt comet copper coral cotton crater crayon cricket crimson
    crystal cuckoo daisy dazzle dewdrop dingo dolphin dragon drizzle drum dune ember emerald falcon feather fiddle
    fig firefly flannel flute fog fossil fountain fox frost galaxy garnet ginger glacier glimmer goblet gravel
    hazel hedgehog heron hickory honey hopscotch horizon hummingbird indigo iris ivory jasmine jelly jester jigsaw
    juniper kettle kiwi lagoon lantern lavender lemon lilac linen lobster locket lotus lullaby magpie mango maple
    marble marigold meadowlark melon mint mitten moss moth muffin nectar nettle nutmeg oak oatmeal olive onyx
    orchid otter owl paddle pebble pepper pickle pinecone plum pollen poppy puddle pumpkin quartz quill quince
    radish raven ribbon riddle ripple robin saffron sapphire satin sequin shamrock silver skylark sleet sorrel
    sparrow spindle sprocket spruce squirrel starling strudel sunbeam swan tadpole tambourine teapot thimble
    thistle thunder tinsel toffee topaz trumpet tulip turnip twig velvet violet walnut waffle walrus whisker
    willow wombat wren yarrow yodel zephyr zinnia zither
""".split())
INTERJECTIONS = ("ho", "hey", "yo", "oi", "ha", "la", "ta", "hup", "whee", "zing", "bah", "tut")
# pseudo-words: an onset, a vowel and maybe a coda, once or twice ("brimtoo", "zaush")
ONSETS = tuple("b c d f g h j k l m n p r s t v w z ch sh th br cr dr fl gr pl st tr sk qu".split())
VOWELS = tuple("a e i o u ee oo ai ou au".split())
CODAS = ("", "", "n", "r", "s", "t", "m", "l", "ck", "ng", "sh")
PSEUDO_SHARE = 2 / 3  # of the words of a fresh phrase; the rest are real words from WORDS


def _words_of(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def forbidden_words(characters: Mapping[str, Character]) -> set[str]:
    """Words a swap must not use: every character's marker words, names, and the answer vocabulary."""
    forbidden: set[str] = set()
    for character in characters.values():
        for text in (*character.style.markers(), character.name, character.role, character.home):
            forbidden |= _words_of(text)
    for obj in OBJECTS.values():
        forbidden |= _words_of(obj.name) | _words_of(obj.plural)
    for cue in (*YES_WORDS, *NO_WORDS, *POSITIVE_CUES, *NEGATIVE_CUES, *NEUTRAL_CUES, *SELF_INTRO_CUES):
        forbidden |= _words_of(cue)
    return forbidden


def _match_case(found: str, replacement: str) -> str:
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


class PersonaSwap:
    """Draws fresh markers for a character and rewrites its card and conversations with them."""

    def __init__(self, characters: Mapping[str, Character], seed: int = 0) -> None:
        self.characters, self.seed = dict(characters), seed
        self.forbidden = forbidden = forbidden_words(self.characters)
        self.words = tuple(w for w in WORDS if w not in forbidden)
        self.interjections = tuple(w for w in INTERJECTIONS if w not in forbidden)
        if len(self.words) < 40 or not self.interjections:
            raise PersonaeError(f"only {len(self.words)} swap words are free of the characters' markers")

    @classmethod
    def of_world(cls, data_dir: Path, seed: int, setting: str) -> PersonaSwap:
        """The swap of a scene world's characters; SETTING (the config key asking for it) names the error."""
        if not (Path(data_dir) / "world.json").is_file():
            raise PersonaeError(f"{setting} needs a scene world (its characters' styles); {data_dir} is not one")
        return cls(load_characters(data_dir), seed)

    def _pseudo_word(self, rng: np.random.Generator) -> str:
        """A pronounceable made-up word that is no character's marker word and no answer word."""
        while True:
            word = "".join(str(rng.choice(ONSETS)) + str(rng.choice(VOWELS)) + str(rng.choice(CODAS))
                           for _ in range(int(rng.integers(1, 3))))
            if word not in self.forbidden:
                return word

    def _word(self, rng: np.random.Generator) -> str:
        # Made-up words spread the copy targets over the whole sub-word vocabulary: held-out markers
        # are spelt with pieces no train reply uses, and a model that never had to produce such pieces
        # learns they never occur.
        return self._pseudo_word(rng) if rng.random() < PSEUDO_SHARE else str(rng.choice(self.words))

    def _phrase(self, original: str, rng: np.random.Generator) -> str:
        """A fresh phrase with as many words as the original (1 to 4)."""
        count = min(4, max(1, len(original.split())))
        if count == 1 and len(original) <= 6:  # short markers (tags like 'blub blub', titles) stay short
            return str(rng.choice(self.interjections)) + "-" + self._word(rng)
        return " ".join(self._word(rng) for _ in range(count))

    def mapping(self, character_id: str, key: int) -> dict[str, str]:
        """Marker -> fresh phrase for one episode (key) of one character; same inputs, same phrases."""
        if character_id not in self.characters:
            raise PersonaeError(f"character {character_id!r} has no world style to swap (is this a scene world?)")
        rng = np.random.default_rng([self.seed, key, sorted(self.characters).index(character_id)])
        markers = dict.fromkeys(m for m in self.characters[character_id].style.markers() if m.strip())
        return {marker: _match_case(marker, self._phrase(marker, rng)) for marker in markers}

    @staticmethod
    def rewrite(text: str, mapping: Mapping[str, str]) -> str:
        """Every marker of `mapping` in TEXT replaced (longest first, any case, keeping the case found)."""
        if not mapping or not text:
            return text
        lowered = {m.lower(): r for m, r in mapping.items()}
        return _marker_pattern(tuple(mapping)).sub(
            lambda found: _match_case(found.group(0), lowered[found.group(0).lower()]), text)

    def record(self, record: DialogueRecord, mapping: Mapping[str, str]) -> DialogueRecord:
        """The conversation with its replies (and user turns) rewritten."""
        turns = tuple(DialogueTurn(self.rewrite(t.user, mapping), self.rewrite(t.reply, mapping), t.meta)
                      for t in record.turns)
        return dataclasses.replace(record, turns=turns)

    def card(self, card: CharacterCard, mapping: Mapping[str, str]) -> CharacterCard:
        """The card with every prompt-facing text field rewritten."""
        fields = ("description", "personality", "scenario", "first_mes", "mes_example", "system_prompt",
                  "post_history_instructions")
        changes: dict[str, Any] = {name: self.rewrite(getattr(card, name), mapping) for name in fields}
        changes["alternate_greetings"] = [self.rewrite(g, mapping) for g in card.alternate_greetings]
        return dataclasses.replace(card, **changes)


def swap_conversations(records: Sequence[DialogueRecord], cards: Mapping[str, CharacterCard], swap: PersonaSwap,
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
        variants[index] = (swap.record(record, mapping), swap.card(cards[record.character], mapping))
    return variants


class SwappedEpisodeCollator:
    """EpisodeCollator's interface, each episode's prompts rebuilt with a swap of its character.

    Images come from the pool dataset's cache; `key_fn(episode)` names the draw (the meta step).
    """

    def __init__(self, dataset: RolePlayDataset, pad_id: int, swap: PersonaSwap, cards: Mapping[str, CharacterCard],
                 *, max_tokens: int, include_examples: bool) -> None:
        self.dataset, self.pad_id, self.swap, self.cards = dataset, pad_id, swap, dict(cards)
        self.builder = PromptBuilder(dataset.tokenizer)
        self.max_tokens, self.include_examples = max_tokens, include_examples
        self.fallbacks = 0

    def _items(self, indices: Sequence[int], mapping: Mapping[str, str], card: CharacterCard) -> list[dict[str, Any]]:
        items = []
        for index in indices:
            record = self.swap.record(self.dataset.records[index], mapping)
            prompt = self.builder.build(card, [Turn(t.user, t.reply) for t in record.turns],
                                        max_tokens=self.max_tokens, include_examples=self.include_examples)
            item: dict[str, Any] = {"input_ids": torch.tensor(prompt.ids), "labels": torch.tensor(prompt.labels),
                                    "index": index}
            if self.dataset.images is not None:
                item["image"] = self.dataset.images[index]
            items.append(item)
        return items

    def episode(self, episode: Any, key: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
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

    def _batches(self, episode: Any, mapping: Mapping[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        card = self.swap.card(self.cards[episode.character], mapping)
        return (collate_roleplay(self._items(episode.support, mapping, card), self.pad_id),
                collate_roleplay(self._items(episode.query, mapping, card), self.pad_id))

    def meta_batch(self, episodes: Sequence[Any], key: int) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """[(support, query), ...] for a meta-step; every task gets its own swap."""
        return [self.episode(episode, key) for episode in episodes]


__all__ = ["WORDS", "PersonaSwap", "SwappedEpisodeCollator", "forbidden_words", "swap_conversations"]
