"""Scene-world characters: personas with checkable styles, read back from Tavern character cards (V2).

A :class:`Character` has facts (name, role, home) and a :class:`Style` whose every part can be
found in text by a pattern: greetings, a "seeing" phrase, a sign-off, a favourite and a disliked
object category, and one :class:`Quirk`. ``CHARACTERS`` holds the built-in cast (see
``personas.py``). ``personae.world.cards`` writes ``characters/<id>.json`` cards plus a
``characters.jsonl`` index; ``load_characters`` reads them back through the card reader of
``personae.data.cards`` (the card's ``extensions.personae`` block holds the style, so a card is
all a loader needs).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personae.data.cards import CharacterCard, load_card
from personae.world.catalog import categories
from personae.world.personas import HELDOUT_ROWS, TRAIN_ROWS

CHARACTER_SPLITS = ("train", "heldout")
QUIRK_KINDS = ("capitals", "lowercase", "prefix", "tag", "title")
STRING_QUIRKS = ("prefix", "tag", "title")  # kinds whose text is a marker
CHARACTERS_DIR = "characters"
CHARACTERS_FILE = "characters.jsonl"
_SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")


@dataclass(frozen=True)
class Quirk:
    """One verbal quirk: all capitals, all lower case, a fixed prefix, a sentence tag or a title."""

    kind: str
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in QUIRK_KINDS:
            raise ValueError(f"quirk kind must be one of {QUIRK_KINDS}, got {self.kind!r}")
        if (self.kind in STRING_QUIRKS) != bool(self.text.strip()):
            raise ValueError(f"quirk {self.kind!r} needs text exactly when it is one of "
                             f"{STRING_QUIRKS}, got text {self.text!r}")

    def instruction(self) -> str:
        """The rule in words, for a card's post-history instructions."""
        return {
            "capitals": "Write every reply entirely in capital letters.",
            "lowercase": "Write every reply entirely in lower case, without capital letters.",
            "prefix": f"Begin every reply with \"{self.text}\".",
            "tag": f"End every sentence with \", {self.text}\".",
            "title": f"Address the user as \"{self.text}\" in every reply.",
        }[self.kind]


@dataclass(frozen=True)
class Style:
    """The checkable parts of a voice: greeting, seeing phrase, sign-off, likes and the quirk."""

    greetings: tuple[str, ...]
    seeing: str
    sign_off: str
    favourite: str
    disliked: str
    quirk: Quirk

    def markers(self) -> tuple[str, ...]:
        """Every string that identifies this voice: greetings, seeing, sign-off, quirk text."""
        quirk = (self.quirk.text,) if self.quirk.text else ()
        return (*self.greetings, self.seeing, self.sign_off, *quirk)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (the card's extensions.personae.style)."""
        return {"greetings": list(self.greetings), "seeing": self.seeing,
                "sign_off": self.sign_off, "favourite": self.favourite,
                "disliked": self.disliked,
                "quirk": {"kind": self.quirk.kind, "text": self.quirk.text}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Style:
        """Inverse of to_dict."""
        quirk = data["quirk"]
        return cls(tuple(data["greetings"]), str(data["seeing"]), str(data["sign_off"]),
                   str(data["favourite"]), str(data["disliked"]),
                   Quirk(str(quirk["kind"]), str(quirk.get("text", ""))))


@dataclass(frozen=True)
class Character:
    """A persona: id, split (train / heldout), who-am-I facts, style, and card text."""

    id: str
    name: str
    role: str
    home: str
    split: str
    style: Style
    personality: str = ""
    bio: str = ""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def role_phrase(self) -> str:
        """The role with its article: 'a pirate captain', 'an astronaut'."""
        return f"{'an' if self.role[:1].lower() in 'aeiou' else 'a'} {self.role}"

    def facts(self) -> dict[str, str]:
        """What a 'who are you' answer must agree with."""
        return {"name": self.name, "role": self.role, "home": self.home}

    def validate(self) -> None:
        """Raise ValueError naming the character and the first bad field."""
        where = f"character {self.id!r}"
        if not _SLUG.match(self.id):
            raise ValueError(f"{where}: id must be a lower-case slug like 'captain-saltbeard'")
        if self.split not in CHARACTER_SPLITS:
            raise ValueError(
                f"{where}: split must be one of {CHARACTER_SPLITS}, got {self.split!r}")
        for field_name in ("name", "role", "home"):
            if not getattr(self, field_name).strip():
                raise ValueError(f"{where}: {field_name} is empty")
        style = self.style
        if not 1 <= len(style.greetings) <= 3:
            raise ValueError(f"{where}: needs 1-3 greetings, has {len(style.greetings)}")
        known = categories()
        for label, category in (("favourite", style.favourite), ("disliked", style.disliked)):
            if category not in known:
                raise ValueError(f"{where}: {label} category {category!r} is not one of {known}")
        if style.favourite == style.disliked:
            raise ValueError(
                f"{where}: favourite and disliked category are both {style.favourite!r}")
        if any(not m.strip() or not m.isascii() for m in style.markers()):
            raise ValueError(f"{where}: every marker must be non-empty ASCII text")


def character_from_row(row: Mapping[str, Any], split: str) -> Character:
    """A Character from one row of personas.py."""
    style = Style.from_dict(row)
    return Character(row["id"], row["name"], row["role"], row["home"], split, style,
                     row.get("personality", ""), row.get("bio", ""))


def _build_cast() -> dict[str, Character]:
    cast = [character_from_row(r, "train") for r in TRAIN_ROWS]
    cast += [character_from_row(r, "heldout") for r in HELDOUT_ROWS]
    by_id = {c.id: c for c in cast}
    if len(by_id) != len(cast):
        raise ValueError("character ids repeat in personas.py")
    return by_id


CHARACTERS: dict[str, Character] = _build_cast()


def characters_in(split: str, characters: Mapping[str, Character] | None = None) -> list[Character]:
    """The characters of one split ('train' or 'heldout'), in table order."""
    if split not in CHARACTER_SPLITS:
        raise ValueError(f"split must be one of {CHARACTER_SPLITS}, got {split!r}")
    return [c for c in (characters or CHARACTERS).values() if c.split == split]


def as_character_map(characters: Mapping[str, Character] | Sequence[Character] | None,
                     ) -> dict[str, Character]:
    """Accept a mapping id -> Character, a sequence of Characters, or None (the built-in cast)."""
    if characters is None:
        return dict(CHARACTERS)
    if isinstance(characters, Mapping):
        return dict(characters)
    return {c.id: c for c in characters}


def character_from_card(card: CharacterCard) -> Character:
    """Read a Character back from a card written by ``character_card`` (or any card with the block)."""
    block = card.extensions.get("personae")
    if not isinstance(block, Mapping):
        raise ValueError(f"card {card.name!r} has no extensions.personae block")
    facts = block["facts"]
    return Character(block["id"], facts["name"], facts["role"], facts["home"], block["split"],
                     Style.from_dict(block["style"]), card.personality, block.get("bio", ""))


def card_path(character_id: str) -> str:
    """Where a character's card lives, relative to the world folder."""
    return f"{CHARACTERS_DIR}/{character_id}.json"


def load_characters(world_dir: Path | str, split: str | None = None) -> dict[str, Character]:
    """Read a world folder's characters (characters.jsonl and the cards), optionally one split."""
    world_dir = Path(world_dir)
    index_path = world_dir / CHARACTERS_FILE
    if split is not None and split not in CHARACTER_SPLITS:
        raise ValueError(f"split must be one of {CHARACTER_SPLITS}, got {split!r}")
    loaded: dict[str, Character] = {}
    lines = index_path.read_text(encoding="utf-8").splitlines()
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            character = character_from_card(load_card(world_dir / entry["card"]))
        except (ValueError, KeyError, TypeError, OSError) as error:
            raise ValueError(f"{index_path}:{line_number}: bad character: {error!r}") from error
        if split is None or character.split == split:
            loaded[character.id] = character
    return loaded


__all__ = [
    "CHARACTERS", "CHARACTERS_DIR", "CHARACTERS_FILE", "CHARACTER_SPLITS", "QUIRK_KINDS",
    "Character", "Quirk", "Style", "as_character_map", "card_path", "character_from_card",
    "character_from_row", "characters_in", "load_characters",
]
