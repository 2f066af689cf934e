"""Prompt assembly: one documented template for training and chat, truncated by documented rules.

The decoder sees the image as a prefix of projected regions, then these tokens::

    <system> {system_prompt, or the default} <eos>
    {lorebook entries with position before_char}        (activated by the conversation: data/lorebook.py)
    {name}: {description}                               \\  the character definition
    Personality: {personality}   Scenario: {scenario}  /
    {lorebook entries with position after_char}
    <user> {example user line} <char> {example reply} <eos>   ... (the card's mes_example)
    <user> {oldest message} <char> {reply} <eos>              ... (history)
    <user> {latest message}
    <system> {post_history_instructions}                  (only when the card has them)
    <char>                                                 -> the model writes the reply, then <eos>

When the whole does not fit the token budget, parts go in this order until it fits: history turns
(oldest first), then lorebook entries (least important first), then example dialogues (last
first), then the description's tail (whole words). Each cut of the card (lore, examples,
description) adds a line to ``Prompt.warnings``. Only when the system prompt, the rest of the
definition and the latest message alone are over budget is the prompt refused (PromptTooLong).

User- and card-provided text is tokenized with special-token parsing off, so typing "<system>"
in a message is plain text. In training every reply of the conversation carries the loss (its
tokens and the closing <eos>); every other position has label IGNORE_INDEX.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from personae.data.cards import CharacterCard
from personae.data.labels import IGNORE_INDEX
from personae.data.lorebook import LoreEntry, parse_lorebook
from personae.data.tokenizer import Tokenizer
from personae.errors import PersonaeError

DEFAULT_SYSTEM = "You are {{char}}. Stay in character, and answer about the image you see."
_MACRO = re.compile(r"\{\{\s*(?:char|user)\s*\}\}|<(?:bot|char|user)>", re.IGNORECASE)


class PromptTooLong(PersonaeError, ValueError):
    """The system prompt, the uncuttable definition and the latest message alone exceed the budget."""


@dataclass
class Turn:
    """One exchange: the user's message and the character's reply (None: the reply to generate)."""

    user: str
    reply: str | None = None


@dataclass
class Prompt:
    """Token ids (and training labels) of an assembled prompt, with what truncation removed."""

    ids: list[int]
    labels: list[int]
    dropped_turns: int = 0
    dropped_examples: int = 0
    segments: dict[str, int] = field(default_factory=dict)  # tokens per part, for inspection
    lore_entries: int = 0  # lorebook entries in the prompt
    dropped_lore: int = 0  # activated entries left out for lack of room (not for the book's own budget)
    description_cut: int = 0  # words cut from the description's tail
    warnings: list[str] = field(default_factory=list)  # one line per cut of the card, for the user


def definition_text(card: CharacterCard, user: str = "User", description: str | None = None) -> tuple[str, str]:
    """(system text, definition text) of a card, with {{char}} / {{user}} substituted."""
    fields = card.prompt_fields(user)
    system = fields["system_prompt"] or card.render(DEFAULT_SYSTEM, user)
    shown = fields["description"] if description is None else description
    lines = [f"{card.nickname or card.name}: {shown}".strip()]
    if fields["personality"]:
        lines.append(f"Personality: {fields['personality']}")
    if fields["scenario"]:
        lines.append(f"Scenario: {fields['scenario']}")
    return system, "\n".join(lines)


def carries_card(system: str, card: CharacterCard) -> bool:
    """Whether a client's system text already holds the card's description (whitespace and case aside).

    The description's text between its {{char}}/{{user}} macros must appear, in order, in the system
    text: a client that substituted other names for the macros still counts.
    """
    pieces = [_normal(piece) for piece in _MACRO.split(card.description)]
    pieces = [piece for piece in pieces if piece]
    haystack, at = _normal(system), 0
    for piece in pieces:
        at = haystack.find(piece, at)
        if at < 0:
            return False
        at += len(piece)
    return bool(pieces)


def client_system_card(card: CharacterCard, system: str) -> CharacterCard:
    """The card to play when a client sends its own system text.

    Documented rule: when the text carries the card (:func:`carries_card`), it replaces the card's
    whole definition (description, personality, scenario, examples, lorebook, post-history
    instructions), since a client that sends the card sends the rest of it too; otherwise it only
    replaces the card's ``system_prompt``.
    """
    if carries_card(system, card):
        return dataclasses.replace(card, system_prompt=system, description="", personality="", scenario="",
                                   mes_example="", character_book=None, post_history_instructions="")
    return dataclasses.replace(card, system_prompt=system)


def _normal(text: str) -> str:
    return " ".join(text.split()).casefold()
class PromptBuilder:
    """Assembles prompts for one tokenizer; the template and the cutting rules are the module docstring's."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer

    def _text(self, text: str) -> list[int]:
        return self.tok.encode(text, add_cls=False, add_eos=False, parse_special=False)

    def _exchange(self, turn: Turn) -> tuple[list[int], list[int]]:
        """A past exchange: <user> message <char> reply <eos>, the reply and <eos> labelled."""
        if turn.reply is None:
            raise ValueError("only the last turn may lack a reply")
        ids = [self.tok.user_id] + self._text(turn.user) + [self.tok.char_id]
        reply = self._text(turn.reply) + [self.tok.eos_id]
        return ids + reply, [IGNORE_INDEX] * len(ids) + reply

    def build(self, card: CharacterCard, turns: list[Turn], *, max_tokens: int, user: str = "User",
              include_examples: bool = True) -> Prompt:
        """Assemble `turns` (the last one's reply None when generating) into at most max_tokens ids."""
        if not turns:
            raise ValueError("a prompt needs at least one turn")
        parts = _Parts(
            system=[self.tok.system_id] + self._text(definition_text(card, user)[0]) + [self.tok.eos_id],
            definition=self._text(definition_text(card, user)[1]),
            lore=self._lore(card, turns, user),
            examples=[self._example(d) for d in card.example_dialogues(user)] if include_examples else [],
            history=[self._exchange(t) for t in turns[:-1]],
            latest=[self.tok.user_id] + self._text(turns[-1].user) + self._tail(card, user),
            reply=self._text(turns[-1].reply) + [self.tok.eos_id] if turns[-1].reply is not None else [],
        )
        activated, examples_given = len(parts.lore), len(parts.examples)
        dropped_turns, cut_words, words = self._fit(parts, card, user, max_tokens)
        prompt = parts.assemble()
        prompt.dropped_turns, prompt.dropped_examples = dropped_turns, examples_given - len(parts.examples)
        prompt.dropped_lore, prompt.description_cut = activated - len(parts.lore), cut_words
        prompt.warnings = _warnings(prompt, activated, examples_given, words, max_tokens)
        return prompt

    def _fit(self, parts: _Parts, card: CharacterCard, user: str, max_tokens: int) -> tuple[int, int, int]:
        """Cut `parts` to max_tokens in the module docstring's order; (turns dropped, words cut, words)."""
        dropped_turns = 0
        while parts.history and parts.total() > max_tokens:
            parts.history.pop(0)
            dropped_turns += 1
        if parts.lore and parts.total() > max_tokens:
            room = max_tokens - (parts.total() - parts.lore_size())
            sizes = {entry.index: len(ids) for entry, ids in parts.lore}
            book = parse_lorebook(card.character_book)
            assert book is not None  # entries came from it
            kept = {e.index for e in book.within_budget([e for e, _ in parts.lore], lambda e: sizes[e.index],
                                                        max(room, 0))}
            parts.lore = [(entry, ids) for entry, ids in parts.lore if entry.index in kept]
        while parts.examples and parts.total() > max_tokens:
            parts.examples.pop()
        room = max_tokens - (parts.total() - len(parts.definition))
        parts.definition, cut_words, words = self._cut_description(card, user, parts.definition, room)
        if parts.fixed() + len(parts.definition) > max_tokens:
            raise PromptTooLong(f"the system prompt, the character definition without its description and the "
                                f"latest message take {parts.fixed() + len(parts.definition)} tokens, more than "
                                f"the budget of {max_tokens}; shorten the card's system prompt, personality or "
                                f"scenario, or the message")
        return dropped_turns, cut_words, words

    def _lore(self, card: CharacterCard, turns: list[Turn], user: str) -> list[tuple[LoreEntry, list[int]]]:
        """Activated lorebook entries within the book's own token budget, each with its ids, in insertion order."""
        book = parse_lorebook(card.character_book)
        if book is None:
            return []
        last = turns[-1]  # its reply, when given, is the one being learned: never scanned
        messages = [m for t in turns[:-1] for m in (t.user, t.reply) if m] + ([last.user] if last.user else [])
        active = book.activate(messages)
        encoded = {e.index: self._lore_ids(card.render(e.content, user), e.position) for e in active}
        kept = book.within_budget(active, lambda e: len(encoded[e.index]))
        return [(entry, encoded[entry.index]) for entry in kept]

    def _lore_ids(self, content: str, position: str) -> list[int]:
        """An entry's tokens, with the newline that joins it to the definition on its side."""
        return self._text(f"{content}\n" if position == "before_char" else f"\n{content}")

    def _cut_description(self, card: CharacterCard, user: str, definition: list[int],
                         room: int) -> tuple[list[int], int, int]:
        """(definition ids, words cut, words in all): the description's tail cut, whole words, to fit `room`."""
        words = re.findall(r"\S+\s*", card.prompt_fields(user)["description"])
        if len(definition) <= room or not words:
            return definition, 0, len(words)

        def ids(keep: int) -> list[int]:
            return self._text(definition_text(card, user, "".join(words[:keep]).rstrip())[1])

        low, high = 0, len(words) - 1  # the most words that fit lies in [low, high]
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if len(ids(middle)) <= room else (low, middle - 1)
        return ids(low), len(words) - low, len(words)

    def _example(self, dialogue: list[tuple[str, str]]) -> list[int]:
        ids: list[int] = []
        for who, text in dialogue:
            role = self.tok.user_id if who == "user" else self.tok.char_id
            ids += [role] + self._text(text) + ([self.tok.eos_id] if who == "char" else [])
        return ids

    def _tail(self, card: CharacterCard, user: str) -> list[int]:
        """Post-history instructions (if any) and the <char> cue the reply follows."""
        instructions = card.prompt_fields(user)["post_history_instructions"]
        ids = [self.tok.system_id] + self._text(instructions) if instructions else []
        return ids + [self.tok.char_id]


@dataclass
class _Parts:
    """A prompt's pieces as token ids, while they are cut to fit."""

    system: list[int]
    definition: list[int]
    lore: list[tuple[LoreEntry, list[int]]]  # kept entries, in insertion order
    examples: list[list[int]]
    history: list[tuple[list[int], list[int]]]  # (ids, labels) per past exchange
    latest: list[int]
    reply: list[int]

    def fixed(self) -> int:
        """What is never cut: the system prompt, the latest message with its cue, the reply."""
        return len(self.system) + len(self.latest) + len(self.reply)

    def lore_size(self) -> int:
        return sum(len(ids) for _, ids in self.lore)

    def total(self) -> int:
        return self.fixed() + len(self.definition) + self.lore_size() + _size(self.examples) + _size(self.history)

    def assemble(self) -> Prompt:
        """The ids and labels in template order, and the tokens of each part."""
        before = [i for entry, ids in self.lore if entry.position == "before_char" for i in ids]
        after = [i for entry, ids in self.lore if entry.position != "before_char" for i in ids]
        head = self.system + before + self.definition + after
        examples = [i for e in self.examples for i in e]
        ids = head + examples + [i for h, _ in self.history for i in h] + self.latest + self.reply
        labels = ([IGNORE_INDEX] * (len(head) + len(examples)) + [x for _, lab in self.history for x in lab]
                  + [IGNORE_INDEX] * len(self.latest) + self.reply)
        segments = {"definition": len(head), "lore": len(before) + len(after), "examples": len(examples),
                    "history": _size(self.history), "latest": len(self.latest), "reply": len(self.reply)}
        return Prompt(ids, labels, segments=segments, lore_entries=len(self.lore))


def _size(parts: list) -> int:
    """Total tokens of example id lists or (ids, labels) history pairs."""
    return sum(len(p[0]) if isinstance(p, tuple) else len(p) for p in parts)


def _warnings(prompt: Prompt, activated: int, examples: int, words: int, max_tokens: int) -> list[str]:
    """One line per part of the card the budget cut, for the response and the page."""
    fit = f"to fit the prompt budget of {max_tokens} tokens"
    lines = []
    if prompt.dropped_lore:
        lines.append(f"lorebook: {prompt.dropped_lore} of {activated} activated entries left out {fit}")
    if prompt.dropped_examples:
        lines.append(f"{prompt.dropped_examples} of {examples} example dialogues left out {fit}")
    if prompt.description_cut:
        lines.append(f"the description was cut: its last {prompt.description_cut} of {words} words left out {fit}")
    return lines
