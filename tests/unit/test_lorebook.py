"""Lorebooks: each activation rule of character_book, one by one, and the entries' place in a prompt."""

import pytest

from personae.data.cards import CardError, CharacterCard
from personae.data.lorebook import DEFAULT_SCAN_DEPTH, parse_lorebook
from personae.data.prompt import PromptBuilder, Turn
from personae.data.tokenizer import train_tokenizer


def book(*entries, **settings):
    return parse_lorebook({"entries": list(entries), **settings})


def entry(content, keys=(), **fields):
    return {"keys": list(keys), "content": content, "enabled": True, "insertion_order": 100, **fields}


def active(lorebook, *messages):
    return [e.content for e in lorebook.activate(list(messages))]


def test_keys_match_case_insensitively_unless_case_sensitive():
    lore = book(entry("A", ["Dragon"]), entry("B", ["Dragon"], case_sensitive=True))
    assert active(lore, "a DRAGON flies") == ["A"]
    assert active(lore, "a Dragon flies") == ["A", "B"]


def test_whole_word_option():
    lore = book(entry("A", ["cat"]), entry("B", ["cat"], extensions={"match_whole_words": True}))
    assert active(lore, "a catalogue") == ["A"]
    assert active(lore, "the cat, asleep") == ["A", "B"]


def test_only_the_last_scan_depth_messages_are_scanned():
    messages = ["the sword is here", "hello", "hi"]
    assert active(book(entry("A", ["sword"])), *messages) == []  # default depth 2
    assert DEFAULT_SCAN_DEPTH == 2
    assert active(book(entry("A", ["sword"]), scan_depth=3), *messages) == ["A"]
    assert active(book(entry("A", ["sword"]), scan_depth=0), *messages) == []


@pytest.mark.parametrize("logic, secondary_text, expected", [
    (0, "only the moon", True), (0, "nothing else", False),          # AND ANY
    (3, "the moon and the sun", True), (3, "only the moon", False),  # AND ALL
    (2, "nothing else", True), (2, "only the sun", False),           # NOT ANY
    (1, "only the sun", True), (1, "the sun and the moon", False),   # NOT ALL
])
def test_selective_secondary_keys_by_logic(logic, secondary_text, expected):
    lore = book(entry("A", ["wolf"], selective=True, secondary_keys=["moon", "sun"],
                      extensions={"selectiveLogic": logic}))
    assert (active(lore, f"a wolf, {secondary_text}") == ["A"]) is expected
    assert active(lore, secondary_text) == []  # the primary key is always required


def test_null_settings_mean_their_defaults():
    lore = book(entry("A", ["wolf"], selective=True, secondary_keys=["moon"], case_sensitive=None, priority=None,
                      extensions={"selectiveLogic": None, "match_whole_words": None}))
    assert active(lore, "a WOLF and the moon") == ["A"] and lore.entries[0].priority == 100


def test_secondary_keys_are_ignored_without_selective():
    lore = book(entry("A", ["wolf"], secondary_keys=["moon"]))
    assert active(lore, "a wolf") == ["A"]


def test_constant_entries_always_and_disabled_entries_never():
    lore = book(entry("C", [], constant=True), entry("D", ["wolf"], enabled=False),
                entry("E", [], constant=True, enabled=False))
    assert active(lore, "a wolf") == ["C"]


def test_empty_keys_match_nothing():
    assert active(book(entry("A", ["", "  "])), "anything at all") == []


def test_recursive_scanning_follows_activated_content():
    entries = (entry("the castle has a dungeon", ["castle"]), entry("the dungeon holds a dragon", ["dungeon"]),
               entry("dragons breathe fire", ["dragon"]))
    assert active(book(*entries), "we reach the castle") == ["the castle has a dungeon"]
    assert len(active(book(*entries, recursive_scanning=True), "we reach the castle")) == 3


def test_recursion_can_be_excluded_or_prevented_per_entry():
    castle = entry("the castle has a dungeon", ["castle"])
    dungeon = entry("the dungeon holds a dragon", ["dungeon"])
    excluded = book(castle, {**dungeon, "extensions": {"exclude_recursion": True}}, recursive_scanning=True)
    assert active(excluded, "we reach the castle") == ["the castle has a dungeon"]
    assert len(active(excluded, "the castle and its dungeon")) == 2  # the messages still activate it
    prevented = book({**castle, "extensions": {"prevent_recursion": True}}, dungeon, recursive_scanning=True)
    assert active(prevented, "we reach the castle") == ["the castle has a dungeon"]


def test_token_budget_keeps_higher_priority_then_orders_by_insertion_order():
    lore = book(entry("low", ["x"], priority=1, insertion_order=1), entry("high", ["x"], priority=9, insertion_order=5),
                entry("mid", ["x"], priority=5, insertion_order=3), token_budget=2)
    kept = lore.within_budget(lore.activate(["x"]), lambda e: 1)
    assert [e.content for e in kept] == ["mid", "high"]  # the two most important, by insertion order
    everything = lore.within_budget(lore.activate(["x"]), lambda e: 1, 10)
    assert [e.content for e in everything] == ["mid", "high"]  # the book's own budget still applies
    unbounded = book(entry("b", ["x"], insertion_order=2), entry("a", ["x"], insertion_order=1))
    assert [e.content for e in unbounded.within_budget(unbounded.activate(["x"]), lambda e: 5)] == ["a", "b"]


def test_priority_defaults_to_insertion_order_and_constants_win_ties():
    lore = book(entry("plain", ["x"], insertion_order=7), entry("const", [], insertion_order=7, constant=True))
    kept = lore.within_budget(lore.activate(["x"]), lambda e: 1, 1)
    assert [e.content for e in kept] == ["const"]


@pytest.mark.parametrize("field, value, message", [
    ("keys", "dragon", "entries\\[0\\].keys' must be a list of strings"),
    ("position", "middle", "position' must be one of before_char, after_char"),
    ("enabled", "yes", "enabled' must be true or false"),
    ("insertion_order", "1", "insertion_order' must be a number"),
    ("extensions", {"selectiveLogic": 7}, "selectiveLogic' must be one of 0, 1, 2, 3"),
])
def test_a_bad_entry_field_fails_at_card_load_naming_it(field, value, message):
    raw = {"spec": "chara_card_v2", "spec_version": "2.0",
           "data": {"name": "Lore", "character_book": {"entries": [{**entry("A", ["a"]), field: value}]}}}
    with pytest.raises(CardError, match=message):
        CharacterCard.from_json(raw, "card.json")


# ---- in a prompt ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    text = "Mira is a witch. The tower is old. The moon is bright. Dragons sleep. Hello there, how are you?"
    return train_tokenizer([text] * 20, vocab_size=300)


def lore_card(**book_fields):
    return CharacterCard(name="Mira", description="{{char}} is a witch.", character_book={"entries": [
        entry("BEFORE the tower is old", ["tower"], position="before_char"),
        entry("AFTER the moon is bright", ["moon"], position="after_char"),
        entry("NEVER disabled", ["tower"], enabled=False),
    ], **book_fields})


def test_entries_sit_before_and_after_the_definition(tok):
    prompt = PromptBuilder(tok).build(lore_card(), [Turn("the tower and the moon?")], max_tokens=500)
    text = tok.decode(prompt.ids, skip_special=False)
    assert text.index("BEFORE") < text.index("Mira is a witch.") < text.index("AFTER") < text.index("the tower and")
    assert "NEVER" not in text and prompt.lore_entries == 2 and prompt.segments["lore"] > 0
    plain = PromptBuilder(tok).build(lore_card(), [Turn("hello there")], max_tokens=500)
    assert plain.lore_entries == 0 and "BEFORE" not in tok.decode(plain.ids, skip_special=False)


def test_training_never_scans_the_reply_being_learned(tok):
    turns = [Turn("hello there", "the moon is bright")]
    prompt = PromptBuilder(tok).build(lore_card(), turns, max_tokens=500)
    assert prompt.lore_entries == 0  # the key is only in the target reply
    later = PromptBuilder(tok).build(lore_card(), turns + [Turn("how are you?", "fine")], max_tokens=500)
    assert later.lore_entries == 1  # a past reply is scanned like any message


def test_lorebook_entries_macros_are_substituted(tok):
    card = CharacterCard(name="Mira", character_book={"entries": [entry("{{char}} fears the moon", ["moon"])]})
    text = tok.decode(PromptBuilder(tok).build(card, [Turn("moon?")], max_tokens=500).ids, skip_special=False)
    assert "Mira fears the moon" in text
