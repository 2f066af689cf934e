"""Tests for the scene-world characters: the cast, distinctive markers, and Tavern V2 cards."""

from __future__ import annotations

import json
import re
from itertools import permutations
from pathlib import Path

import pytest

from personae.data.cards import CharacterCard, load_card
from personae.world import OBJECTS, POSITION_PHRASES, SETTINGS, categories, parse_mentions
from personae.world.cards import character_card, write_characters
from personae.world.catalog import NUMBER_WORDS
from personae.world.characters import (
    CHARACTERS,
    Character,
    Quirk,
    Style,
    character_from_card,
    characters_in,
    load_characters,
)
from personae.world.dialogues import QUESTIONS
from personae.world.styles import (
    NEGATIVE_CUES,
    NEUTRAL_CUES,
    NO_WORDS,
    POSITIVE_CUES,
    SELF_INTRO_CUES,
    YES_WORDS,
    all_templates,
    card_greetings,
    mes_example,
)

TRAIN, HELDOUT = characters_in("train"), characters_in("heldout")
POSITION_WORDS = ("top", "middle", "bottom", "left", "right", "centre", "center", "row", "column",
                  "corner", "upper", "lower")
# words the metrics parse: a marker holding one would change how a reply is read
ANSWER_WORDS = (*YES_WORDS, *NO_WORDS, *NUMBER_WORDS, *POSITIVE_CUES, *NEGATIVE_CUES,
                *NEUTRAL_CUES, *SELF_INTRO_CUES, *POSITION_WORDS)


def has_phrase(text: str, phrase: str) -> bool:
    if phrase.lower() not in text.lower():  # cheap test first; the regex adds word boundaries
        return False
    pattern = rf"(?<![a-z0-9]){re.escape(phrase.lower())}(?![a-z0-9])"
    return re.search(pattern, text.lower()) is not None


def content_vocabulary() -> list[str]:
    """Every fixed string of replies and questions that is not a character's own."""
    texts = [text for template in all_templates() for text, _ in template]
    texts += [q for phrasings in QUESTIONS.values() for q in phrasings]
    texts += [p for setting in SETTINGS.values() for p in setting.places]
    texts += list(POSITION_PHRASES)
    texts += [form for obj in OBJECTS.values() for form in (obj.name, obj.plural)]
    return texts


def test_the_cast_has_40_characters_32_train_and_8_heldout() -> None:
    assert len(CHARACTERS) == 40 and len(TRAIN) == 32 and len(HELDOUT) == 8
    assert len({c.name for c in CHARACTERS.values()}) == 40
    for character in CHARACTERS.values():
        assert 2 <= len(character.style.greetings) <= 3, character.id
        assert character.style.favourite != character.style.disliked
    assert {c.style.favourite for c in TRAIN} == set(categories())  # every category is loved
    assert {c.style.quirk.kind for c in TRAIN} == {"capitals", "lowercase", "prefix", "tag",
                                                   "title"}


def test_heldout_quirks_are_strings_never_seen_in_training() -> None:
    train_markers = " | ".join(m.lower() for c in TRAIN for m in c.style.markers())
    train_cards = json.dumps([character_card(c).to_json() for c in TRAIN]).lower()
    for character in HELDOUT:
        assert character.style.quirk.kind in ("prefix", "tag", "title"), character.id
        for marker in (*character.style.markers(), character.name):
            assert marker.lower() not in train_markers, (character.id, marker)
            assert marker.lower() not in train_cards, (character.id, marker)


def test_no_marker_is_part_of_another_characters_markers_or_name() -> None:
    for a, b in permutations(CHARACTERS.values(), 2):
        for marker in a.style.markers():
            for other in (*b.style.markers(), b.name):
                assert marker.lower() not in other.lower(), (a.id, marker, b.id, other)
        assert a.name.lower() not in b.name.lower(), (a.name, b.name)


def test_markers_do_not_collide_with_the_answer_vocabulary() -> None:
    vocabulary = content_vocabulary()
    for character in CHARACTERS.values():
        for marker in character.style.markers():
            assert parse_mentions(marker) == {}, (character.id, marker)
            clashes = [w for w in ANSWER_WORDS if has_phrase(marker, w)]
            assert not clashes, (character.id, marker, clashes)
            for text in vocabulary:
                assert not has_phrase(text, marker), (character.id, marker, text)
                assert not has_phrase(marker, text), (character.id, marker, text)
        for fact in (character.name, character.role):
            assert parse_mentions(fact) == {}, (character.id, fact)


def test_quirk_and_character_validation() -> None:
    with pytest.raises(ValueError, match="quirk kind"):
        Quirk("shouting")
    with pytest.raises(ValueError, match="needs text"):
        Quirk("title")
    with pytest.raises(ValueError, match="needs text"):
        Quirk("capitals", "LOUD")
    style = CHARACTERS["captain-saltbeard"].style
    with pytest.raises(ValueError, match="slug"):
        Character("Captain Saltbeard", "x", "pirate", "sea", "train", style)
    with pytest.raises(ValueError, match="split"):
        Character("pirate", "x", "pirate", "sea", "test", style)
    same = Style(style.greetings, style.seeing, style.sign_off, "food", "food", style.quirk)
    with pytest.raises(ValueError, match="both"):
        Character("pirate", "x", "pirate", "sea", "train", same)
    wrong = Style(style.greetings, style.seeing, style.sign_off, "food", "cheese", style.quirk)
    with pytest.raises(ValueError, match="cheese"):
        Character("pirate", "x", "pirate", "sea", "train", wrong)


def test_card_is_tavern_v2_with_greetings_and_examples_in_voice() -> None:
    character = CHARACTERS["gizmotron"]
    card = character_card(character)
    assert isinstance(card, CharacterCard) and card.character_book is None
    written = card.to_json()
    assert written["spec"] == "chara_card_v2" and written["spec_version"] == "2.0"
    data = written["data"]
    expected = {"name", "description", "personality", "scenario", "first_mes", "mes_example",
                "creator_notes", "system_prompt", "post_history_instructions",
                "alternate_greetings", "tags", "creator", "character_version", "extensions"}
    assert set(data) == expected  # no character book: the V2 writer leaves the optional key out
    assert data["first_mes"].startswith("GREETINGS, ORGANIC FRIEND!")  # capitals quirk
    assert len(data["alternate_greetings"]) == len(character.style.greetings) - 1
    blocks = data["mes_example"].split("<START>\n")[1:]
    assert len(blocks) == 2
    for block in blocks:
        user, char = block.strip().split("\n")
        assert user.startswith("{{user}}: ") and char.startswith("{{char}}: ")
        assert char.removeprefix("{{char}}: ").isupper()
    block = data["extensions"]["personae"]
    assert block["id"] == "gizmotron" and block["split"] == "train"
    assert block["facts"] == {"name": "Gizmotron", "role": "helper robot",
                              "home": "the assembly works of Cogsville"}
    assert character_from_card(card) == character


def test_card_text_uses_the_characters_quirk() -> None:
    granny = CHARACTERS["granny-marigold"]
    for greeting in card_greetings(granny):
        sentences = re.split(r"(?<=[.!?])\s+", greeting)
        assert all(s.rstrip(".!").endswith("bless your heart") for s in sentences)
    assert "matey" in mes_example(CHARACTERS["captain-saltbeard"])


def test_write_and_load_characters_round_trip(tmp_path: Path) -> None:
    paths = write_characters(tmp_path)
    assert len(paths) == 40 and all(p.parent.name == "characters" for p in paths)
    index = [json.loads(line) for line in (tmp_path / "characters.jsonl").read_text().splitlines()]
    assert index[0] == {"id": "captain-saltbeard", "name": "Captain Saltbeard", "split": "train",
                        "card": "characters/captain-saltbeard.json"}
    assert load_characters(tmp_path) == CHARACTERS
    assert list(load_characters(tmp_path, split="heldout")) == [c.id for c in HELDOUT]
    with pytest.raises(ValueError, match="split"):
        load_characters(tmp_path, split="val")
    (tmp_path / "characters" / "gizmotron.json").write_text('{"spec": "v1"}')
    with pytest.raises(ValueError, match=r"characters.jsonl:2"):
        load_characters(tmp_path)


def test_cards_load_with_the_card_reader(tmp_path: Path) -> None:
    write_characters(tmp_path)
    for character in CHARACTERS.values():
        card = load_card(tmp_path / "characters" / f"{character.id}.json")
        assert card.name == character.name
