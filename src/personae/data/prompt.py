"""Prompt assembly: one documented template for training and chat, truncated from the oldest turns.

The decoder sees the image as a prefix of projected regions, then these tokens::

    <system> {system_prompt, or the default}          \\
    {name}: {description}                              |  the character definition: never cut
    Personality: {personality}   Scenario: {scenario}  /
    <user> {example user line} <char> {example reply} <eos>   ... (card's mes_example; dropped last-first
                                                                   only when history alone does not fit)
    <user> {oldest message} <char> {reply} <eos>              ... (history: dropped oldest-first)
    <user> {latest message}
    <system> {post_history_instructions}                  (only when the card has them)
    <char>                                                 -> the model writes the reply, then <eos>

User- and card-provided text is tokenized with special-token parsing off, so typing "<system>"
in a message is plain text. In training every reply of the conversation carries the loss (its
tokens and the closing <eos>); every other position has label IGNORE_INDEX.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from personae.data.cards import CharacterCard
from personae.data.labels import IGNORE_INDEX
from personae.data.tokenizer import Tokenizer
from personae.errors import PersonaeError

DEFAULT_SYSTEM = "You are {{char}}. Stay in character, and answer about the image you see."


class PromptTooLong(PersonaeError, ValueError):
    """The character definition and the latest message alone exceed the token budget."""


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


def definition_text(card: CharacterCard, user: str = "User") -> tuple[str, str]:
    """(system text, definition text) of a card, with {{char}} / {{user}} substituted."""
    fields = card.prompt_fields(user)
    system = fields["system_prompt"] or card.render(DEFAULT_SYSTEM, user)
    lines = [f"{card.nickname or card.name}: {fields['description']}".strip()]
    if fields["personality"]:
        lines.append(f"Personality: {fields['personality']}")
    if fields["scenario"]:
        lines.append(f"Scenario: {fields['scenario']}")
    return system, "\n".join(lines)


class PromptBuilder:
    """Assembles prompts for one tokenizer; the template is the module docstring's."""

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
        system, definition = definition_text(card, user)
        head = [self.tok.system_id] + self._text(system) + [self.tok.eos_id] + self._text(definition)
        examples = [self._example(dialogue) for dialogue in card.example_dialogues(user)] if include_examples else []
        history = [self._exchange(t) for t in turns[:-1]]
        latest = [self.tok.user_id] + self._text(turns[-1].user) + self._tail(card, user)
        reply = self._text(turns[-1].reply) + [self.tok.eos_id] if turns[-1].reply is not None else []
        fixed = len(head) + len(latest) + len(reply)
        if fixed > max_tokens:
            raise PromptTooLong(f"the character definition and the latest message take {fixed} tokens, "
                                f"more than the budget of {max_tokens}; shorten the card or the message")
        dropped_turns = dropped_examples = 0
        while history and fixed + _size(examples) + _size(history) > max_tokens:
            history.pop(0)
            dropped_turns += 1
        while examples and fixed + _size(examples) + _size(history) > max_tokens:
            examples.pop()
            dropped_examples += 1
        ids = head + [i for e in examples for i in e] + [i for h, _ in history for i in h] + latest + reply
        labels = ([IGNORE_INDEX] * (len(head) + _size(examples)) + [x for _, lab in history for x in lab]
                  + [IGNORE_INDEX] * len(latest) + reply)
        segments = {"definition": len(head), "examples": _size(examples), "history": _size(history),
                    "latest": len(latest), "reply": len(reply)}
        return Prompt(ids, labels, dropped_turns, dropped_examples, segments)

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


def _size(parts: list) -> int:
    """Total tokens of example id lists or (ids, labels) history pairs."""
    return sum(len(p[0]) if isinstance(p, tuple) else len(p) for p in parts)
