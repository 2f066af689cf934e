"""The scene world's persona swap: for one episode, a train character speaks with freshly drawn markers.

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
:class:`PersonaSwap` is the world's :class:`~personae.data.marker_swap.MarkerSwap` (which markers,
which fresh words); the rewriting of conversations, cards and episodes is generic and lives in
:mod:`personae.data.marker_swap`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from personae.data.marker_swap import match_case
from personae.errors import PersonaeError
from personae.world.catalog import OBJECTS
from personae.world.characters import Character
from personae.world.styles import NEGATIVE_CUES, NEUTRAL_CUES, NO_WORDS, POSITIVE_CUES, SELF_INTRO_CUES, YES_WORDS

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


class PersonaSwap:
    """Draws fresh markers for a character and rewrites its card and conversations with them."""

    def __init__(self, characters: Mapping[str, Character], seed: int = 0) -> None:
        self.characters, self.seed = dict(characters), seed
        self.forbidden = forbidden = forbidden_words(self.characters)
        self.words = tuple(w for w in WORDS if w not in forbidden)
        self.interjections = tuple(w for w in INTERJECTIONS if w not in forbidden)
        if len(self.words) < 40 or not self.interjections:
            raise PersonaeError(f"only {len(self.words)} swap words are free of the characters' markers")

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
        return {marker: match_case(marker, self._phrase(marker, rng)) for marker in markers}


__all__ = ["WORDS", "PersonaSwap", "forbidden_words"]
