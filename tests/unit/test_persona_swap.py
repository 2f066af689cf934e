"""Persona swaps: fresh markers everywhere the old ones were, never a held-out marker, deterministic."""

import dataclasses
import re

import pytest
import torch

from personae.data.cards import load_card
from personae.data.dialogues import load_character_cards, read_dialogues
from personae.data.episodes import Episode, EpisodeCollator
from personae.data.marker_swap import SwappedEpisodeCollator, rewrite, swap_card, swap_conversations, swap_record
from personae.data.roleplay import RolePlayDataset
from personae.data.tokenizer import train_tokenizer
from personae.errors import PersonaeError
from personae.world.characters import load_characters
from personae.world.metrics import persona_consistency
from personae.world.persona_swap import PersonaSwap, forbidden_words


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
    swapped = swap_record(record, mapping)
    card = swap_card(load_card(world / "characters" / f"{record.character}.json"), mapping)
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
    rewritten = rewrite("AHOY, MATEY! Ahoy there. ahoy", {"Ahoy": "Zing", "Ahoy, matey": "Plum tea"})
    assert rewritten == "PLUM TEA! Zing there. zing"


def test_swap_conversations_draws_the_fraction_each_with_its_own_markers(world_bits):
    world, characters, records = world_bits
    cards = load_character_cards(world / "characters")
    swap = PersonaSwap(characters, seed=0)
    variants = swap_conversations(records, cards, swap, 0.5, seed=0)
    assert 0.35 * len(records) < len(variants) < 0.65 * len(records)
    assert variants.keys() == swap_conversations(records, cards, swap, 0.5, seed=0).keys()
    assert not swap_conversations(records, cards, swap, 0.0) and len(swap_conversations(records, cards, swap, 1.0)) == len(records)
    greetings = set()
    for index, (record, card) in variants.items():
        original = characters[records[index].character]
        assert record.id == records[index].id and card.name == cards[original.id].name
        assert not any(m.lower() in card.post_history_instructions.lower() for m in original.style.markers())
        greetings.add(card.post_history_instructions.split('"')[1])
    assert len(greetings) > 0.9 * len(variants)  # fresh words per conversation, not per character
    with pytest.raises(PersonaeError, match="within"):
        swap_conversations(records, cards, swap, 1.5)


@pytest.fixture(scope="module")
def tokenizer(small_world):
    texts = [p.read_text() for p in (small_world / "characters").glob("*.json")]
    return train_tokenizer(texts + (small_world / "dialogues.jsonl").read_text().splitlines(), vocab_size=800)


def test_dataset_variants_replace_conversations_and_fall_back_when_too_long(world_bits, tokenizer):
    world, characters, records = world_bits
    cards = load_character_cards(world / "characters")
    subset = records[:6]
    variants = swap_conversations(subset, cards, PersonaSwap(characters, seed=0), 1.0)
    settings = {"image_size": 32, "max_tokens": 1000, "include_examples": False, "progress": False}
    plain = RolePlayDataset(subset, cards, tokenizer, **settings)
    swapped = RolePlayDataset(subset, cards, tokenizer, **settings, variants=variants)
    assert swapped.fallbacks == 0
    assert all(swapped.examples[i][0] != plain.examples[i][0] for i in range(len(subset)))
    assert variants[0][1].post_history_instructions.split('"')[1] in tokenizer.decode(swapped.examples[0][0])
    # a variant whose definition cannot fit falls back to its plain conversation: nothing is lost
    record, card = variants[2]
    bloated = dataclasses.replace(card, post_history_instructions=card.post_history_instructions * 40)
    mixed = RolePlayDataset(subset, cards, tokenizer, **settings, variants={**variants, 2: (record, bloated)})
    assert mixed.fallbacks == 1 and len(mixed) == len(subset)
    assert mixed.examples[2] == plain.examples[2] and mixed.examples[1] == swapped.examples[1]


def test_a_swapped_episode_too_long_for_the_budget_keeps_its_own_markers(world_bits, tokenizer):
    world, characters, records = world_bits
    cards = load_character_cards(world / "characters")
    name = records[0].character
    rows = [r for r in records if r.character == name][:3]
    budget = 1000
    dataset = RolePlayDataset(rows, cards, tokenizer, image_size=32, max_tokens=budget, include_examples=False,
                              progress=False)
    swap = PersonaSwap(characters, seed=0)
    collator = SwappedEpisodeCollator(dataset, tokenizer.pad_id, swap, cards, max_tokens=budget, include_examples=False)
    episode = Episode(name, (0,), (1, 2))
    swapped, _ = collator.episode(episode, key=1)
    assert collator.fallbacks == 0
    assert not torch.equal(swapped["input_ids"], EpisodeCollator(dataset, tokenizer.pad_id).batch([0])["input_ids"])
    # fresh phrases so long that the card no longer fits: the episode is its own, unswapped one
    swap.mapping = lambda character, key: {m: " ".join(["zaush"] * 200) for m in characters[character].style.markers()}
    support, query = collator.episode(episode, key=1)
    plain = EpisodeCollator(dataset, tokenizer.pad_id)
    assert collator.fallbacks == 1
    assert torch.equal(support["input_ids"], plain.batch([0])["input_ids"])
    assert torch.equal(query["input_ids"], plain.batch([1, 2])["input_ids"])
