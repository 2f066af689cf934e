"""personae.chat: character cards, prompt assembly, sampling and chat sessions."""

from personae.chat.cards import (
    PROMPT_FIELDS,
    CardError,
    CharacterCard,
    default_avatar,
    load_card,
    parse_mes_example,
    save_card_json,
    save_card_png,
)

__all__ = [
    "PROMPT_FIELDS",
    "CardError",
    "CharacterCard",
    "default_avatar",
    "load_card",
    "parse_mes_example",
    "save_card_json",
    "save_card_png",
]
