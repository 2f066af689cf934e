"""Role-play conversation manifests (dialogues.jsonl) and character folders: read and validate.

One JSON object per line::

    {"id": "d000001", "image": "images/s000001.png", "character": "captain-saltbeard",
     "split": "train", "character_split": "train",
     "turns": [{"user": "How many tents do you see?", "reply": "Ahoy! I spy two tents, matey."}]}

Required: `character` (the id of a card in the characters folder) and `turns` (a non-empty list of
objects with non-empty string `user` and `reply`). Optional: `image` (relative to the manifest's
folder; without it the conversation is text-only), `id`, `split` (train/val/test, default train),
`character_split` (train/heldout, default train), `scene_id`. Other keys of a row or a turn are
kept in `meta` (the built-in world stores each turn's question type and exact answer there).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personae.data.cards import CharacterCard, load_card
from personae.data.jsonl import json_type, load_json_object, numbered_lines, required_str
from personae.data.manifest import SPLITS
from personae.errors import DataError

logger = logging.getLogger(__name__)

CHARACTER_SPLITS = ("train", "heldout")
ROW_KEYS = ("id", "image", "character", "split", "character_split", "scene_id", "turns")


@dataclass(frozen=True)
class DialogueTurn:
    """The user's message and the character's reply, plus any extra keys of the turn."""

    user: str
    reply: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class DialogueRecord:
    """One conversation with one character, optionally about one image."""

    id: str
    character: str
    turns: tuple[DialogueTurn, ...]
    image: Path | None = None
    split: str = "train"
    character_split: str = "train"
    scene_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    line: int = 0


def _choice(row: dict[str, Any], key: str, choices: tuple[str, ...], path: Path, line: int) -> str:
    value = row.get(key, choices[0])
    if value not in choices:
        shown = value if isinstance(value, str) else json_type(value)
        raise DataError(f"field {key!r} must be one of {', '.join(map(repr, choices))}, got {shown!r}", path, line)
    return value


def _turns(row: dict[str, Any], path: Path, line: int) -> tuple[DialogueTurn, ...]:
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"field 'turns' must be a non-empty array, got {json_type(turns)}", path, line)
    parsed = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"turns[{i}] must be an object, got {json_type(turn)}", path, line)
        try:
            user, reply = required_str(turn, "user", path, line), required_str(turn, "reply", path, line)
        except DataError as error:
            raise DataError(f"turns[{i}]: {error.message}", path, line) from None
        parsed.append(DialogueTurn(user, reply, {k: v for k, v in turn.items() if k not in ("user", "reply")}))
    return tuple(parsed)


def parse_dialogue(text: str | DataError, path: Path, line: int, check_images: bool = True) -> DialogueRecord:
    """Validate one dialogues.jsonl line."""
    if isinstance(text, DataError):
        raise text
    row = load_json_object(text, path, line)
    character = required_str(row, "character", path, line)
    turns = _turns(row, path, line)
    image = None
    if "image" in row:
        image = Path(required_str(row, "image", path, line))
        image = image if image.is_absolute() else path.parent / image
        if check_images and not image.is_file():
            raise DataError(f"image file not found: {row['image']} (looked for {image})", path, line)
    return DialogueRecord(
        id=str(row.get("id", f"line{line}")), character=character, turns=turns, image=image,
        split=_choice(row, "split", SPLITS, path, line),
        character_split=_choice(row, "character_split", CHARACTER_SPLITS, path, line),
        scene_id=str(row["scene_id"]) if "scene_id" in row else None,
        meta={k: v for k, v in row.items() if k not in ROW_KEYS}, line=line,
    )


def read_dialogues(path: str | Path, *, split: str | None = None, character_split: str | None = None,
                   skip_bad: bool = False, check_images: bool = True) -> list[DialogueRecord]:
    """Read dialogues.jsonl (or an examples file of the same format), optionally filtered.

    A bad row raises DataError naming file and line; with skip_bad it is counted and left out.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("dialogue file not found" if not path.exists() else "not a file", path)
    records, skipped = [], []
    for line, text in numbered_lines(path):
        try:
            record = parse_dialogue(text, path, line, check_images)
        except DataError as error:
            if not skip_bad:
                raise
            skipped.append(error)
            continue
        if (split is None or record.split == split) and (
                character_split is None or record.character_split == character_split):
            records.append(record)
    if skipped:
        logger.warning("%s: skipped %d bad row(s); first: %s", path, len(skipped), skipped[0])
    return records


def load_character_cards(folder: str | Path) -> dict[str, CharacterCard]:
    """Every card in a characters folder (`<id>.json` or `<id>.png`), keyed by file stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("characters folder not found", folder)
    cards = {}
    for path in sorted(folder.iterdir()):
        if path.suffix in (".json", ".png") and not path.name.endswith(".examples.jsonl"):
            cards[path.stem] = load_card(path)
    return cards


def require_cards(records: list[DialogueRecord], cards: dict[str, CharacterCard], where: Path) -> None:
    """Every conversation's character must have a card; say which are missing and where."""
    missing = sorted({r.character for r in records} - set(cards))
    if missing:
        first = next(r for r in records if r.character in missing)
        raise DataError(f"no card for character(s) {', '.join(missing[:5])} (first used here)", where, first.line)
