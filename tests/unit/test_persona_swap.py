"""Persona swaps: fresh markers everywhere the old ones were, never a held-out marker, deterministic."""

import re

import pytest

from personae.data.cards import load_card
from personae.data.dialogues import read_dialogues
from personae.data.persona_swap import PersonaSwap, forbidden_words
from personae.data.world.characters import load_characters
from personae.eval.roleplay_metrics import persona_consistency


@pytest.fixture(scope="module")
def world_bits(small_world):
    characters = load_characters(small_world)
    records = read_dialogues(small_world / "dialogues.jsonl", split="train", character_split="train")
    return small_world, characters, records


def test_a_swap_replaces_every_marker_in_replies_and_card(world_bits):
    world, characters, records = world_bits
    swap = PersonaSwap(characters, seed=0)
    record = next(r for r in records if characters[r.character].style.quirk.kind == "tag")
    character = characters[record.character]
    mapping = swap.mapping(record.character, key=3)
    assert set(mapping) == set(character.style.markers())
    swapped = swap.record(record, mapping)
    card = swap.card(load_card(world / "characters" / f"{record.character}.json"), mapping)
    for text in [t.reply for t in swapped.turns] + [card.mes_example, card.first_mes, card.post_history_instructions]:
        for marker in character.style.markers():
            assert marker.lower() not in text.lower(), (marker, text)
    # the original reply fits its character; the swapped one fits the swapped character (same quirk kind, new words)
    original = record.turns[0].reply
    assert persona_consistency(original, character, characters) == 1.0
    assert persona_consistency(swapped.turns[0].reply, character, characters) < 1.0
    assert [t.user for t in swapped.turns] == [t.user for t in record.turns]


def test_swaps_are_deterministic_and_vary_with_the_key(world_bits):
    _, characters, records = world_bits
    swap = PersonaSwap(characters, seed=0)
    name = records[0].character
    assert swap.mapping(name, 1) == PersonaSwap(characters, seed=0).mapping(name, 1)
    assert swap.mapping(name, 1) != swap.mapping(name, 2)
    assert swap.mapping(name, 1) != PersonaSwap(characters, seed=1).mapping(name, 1)


def test_fresh_words_avoid_every_marker_and_answer_word(world_bits):
    _, characters, _ = world_bits
    swap = PersonaSwap(characters, seed=0)
    forbidden = forbidden_words(characters)
    heldout = {w for c in characters.values() if c.split == "heldout" for m in c.style.markers()
               for w in re.findall(r"[a-z]+", m.lower())}
    assert heldout and heldout <= forbidden and "yes" in forbidden and "dog" in forbidden
    drawn = {w for name in characters for key in range(20) for phrase in swap.mapping(name, key).values()
             for w in re.findall(r"[a-z]+", phrase.lower())}
    assert not drawn & forbidden


def test_case_is_kept_and_longest_markers_win():
    rewritten = PersonaSwap.rewrite("AHOY, MATEY! Ahoy there. ahoy", {"Ahoy": "Zing", "Ahoy, matey": "Plum tea"})
    assert rewritten == "PLUM TEA! Zing there. zing"
