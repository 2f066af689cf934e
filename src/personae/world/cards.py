"""Scene-world characters as Tavern character cards (V2), written with ``personae.data.cards``.

``character_card`` turns a :class:`~personae.world.characters.Character` into a
:class:`~personae.data.cards.CharacterCard` (greetings and example dialogues in its voice, the
checkable style in ``extensions.personae``); ``write_characters`` saves the cast's cards with the
one card writer, plus the ``characters.jsonl`` index. This module sits above both
``characters`` and ``styles`` (the voice needs the character, the card needs the voice), so
neither of those imports the other's dependents.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from personae.data.cards import SPEC_V2, CharacterCard, save_card_json
from personae.data.jsonl import write_records
from personae.world.characters import CHARACTERS, CHARACTERS_DIR, CHARACTERS_FILE, Character, card_path
from personae.world.styles import card_greetings, mes_example


def _rules(character: Character) -> str:
    """The post-history instructions: every checkable part of the voice, in words."""
    style = character.style
    return " ".join([f"Greet with \"{style.greetings[0]}\".",
                     f"Introduce what you see with \"{style.seeing}\".",
                     f"Sign off with \"{style.sign_off}\".", style.quirk.instruction(),
                     f"You love {style.favourite} and dislike {style.disliked}."])


def character_card(character: Character) -> CharacterCard:
    """The character as a Tavern character card V2."""
    first, *alternates = card_greetings(character)
    c = character
    return CharacterCard(
        name=c.name,
        description=f"{{{{char}}}} is {c.role_phrase} from {c.home}. {c.bio}".strip(),
        personality=c.personality,
        scenario=("{{user}} shows {{char}} small pictures of scenes (a setting with a few "
                  "objects on a 3x3 grid) and asks about them."),
        first_mes=first,
        mes_example=mes_example(character),
        creator_notes=(f"personae scene-world character ({c.split} split). The checkable "
                       "style is in extensions.personae.style."),
        system_prompt=(f"You are {{{{char}}}}, {c.role_phrase}. Stay in character and answer "
                       "questions about the picture truthfully."),
        post_history_instructions=_rules(character),
        alternate_greetings=alternates,
        tags=["personae", "scene-world", c.split, c.role],
        creator="personae",
        character_version="1",
        extensions={"personae": {"id": c.id, "split": c.split, "style": c.style.to_dict(),
                                 "facts": c.facts(), "bio": c.bio}},
        spec=SPEC_V2,
    )


def write_characters(out_dir: Path | str,
                     characters: Mapping[str, Character] | None = None) -> list[Path]:
    """Write characters/<id>.json cards and the characters.jsonl index; return the card paths."""
    out_dir = Path(out_dir)
    (out_dir / CHARACTERS_DIR).mkdir(parents=True, exist_ok=True)
    written, index = [], []
    for character in (characters or CHARACTERS).values():
        path = out_dir / card_path(character.id)
        save_card_json(character_card(character), path)
        written.append(path)
        index.append({"id": character.id, "name": character.name, "split": character.split,
                      "card": card_path(character.id)})
    write_records(out_dir / CHARACTERS_FILE, index)
    return written


__all__ = ["character_card", "write_characters"]
