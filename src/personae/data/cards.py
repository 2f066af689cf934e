"""Tavern-style character cards (V1, V2, V3) in JSON or PNG: load, validate, save, substitute.

A card is read from a JSON file or from a PNG whose ``tEXt`` (or ``zTXt``/``iTXt``) chunk ``ccv3``
(V3) or ``chara`` (V2/V1) holds the base64 of the card's JSON; ``ccv3`` wins when both exist.
Fields we do not model are kept in ``card.unknown`` so that load -> save gives back the same JSON.
Only :data:`PROMPT_FIELDS` may reach a model prompt; ``creator_notes`` is for humans and never does.
See ``docs/guide/cards.md``.
"""

from __future__ import annotations

import base64
import colorsys
import copy
import hashlib
import io
import json
import re
import unicodedata
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from personae.data.card_png import (
    CARD_CHUNKS,
    PNG_SIGNATURE,
    TEXT_CHUNKS,
    Where,
    card_text,
    decode_payload,
    parse_card_json,
    png_chunks,
)
from personae.data.images import DEFAULT_MAX_PIXELS, load_image_bytes
from personae.data.jsonl import JsonError, check_json_value
from personae.data.lorebook import LorebookError, parse_lorebook
from personae.errors import CardError, DataError
from personae.files import write_bytes_atomic

__all__ = [
    "CardError",
    "CharacterCard",
    "load_card",
    "save_card_json",
    "save_card_png",
    "default_avatar",
    "parse_mes_example",
    "character_id",
    "PROMPT_FIELDS",
    "SPEC_V2",
    "SPEC_V3",
    "MAX_JSON_BYTES",
    "MAX_PNG_BYTES",
    "MAX_AVATAR_PIXELS",
]

SPEC_V2 = "chara_card_v2"
SPEC_V3 = "chara_card_v3"
_SPEC_VERSIONS = {SPEC_V2: "2.0", SPEC_V3: "3.0"}
MAX_JSON_BYTES: int = 2 * 1024 * 1024  # card JSON, whether a file or decoded from a PNG chunk
MAX_PNG_BYTES: int = 20 * 1024 * 1024
MAX_AVATAR_PIXELS: int = DEFAULT_MAX_PIXELS

# The only fields that may be put in front of a model, in the order a prompt usually uses them.
PROMPT_FIELDS: tuple[str, ...] = (
    "system_prompt",
    "description",
    "personality",
    "scenario",
    "mes_example",
    "post_history_instructions",
    "first_mes",
)
_V2_KEYS = (
    "name", "description", "personality", "scenario", "first_mes", "mes_example", "creator_notes",
    "system_prompt", "post_history_instructions", "alternate_greetings", "character_book", "tags",
    "creator", "character_version", "extensions",
)  # fmt: skip
_V3_KEYS = (
    "assets", "nickname", "creator_notes_multilingual", "source", "group_only_greetings",
    "creation_date", "modification_date",
)  # fmt: skip
_ROOT_KEYS = ("spec", "spec_version", "data")
_V1_KEYS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
_BACKFILL_NOTE = (
    "This character card is Character Card V3, but it is loaded as a Character Card V2. "
    "Please use a Character Card V3 compatible application to use this character card properly."
)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{key: (lambda v: isinstance(v, str), "a string") for key in _V2_KEYS},
    "alternate_greetings": (_is_str_list, "a list of strings"),
    "tags": (_is_str_list, "a list of strings"),
    "character_book": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "extensions": (lambda v: isinstance(v, dict), "an object"),
    "assets": (
        lambda v: isinstance(v, list) and all(isinstance(a, dict) for a in v),
        "a list of objects",
    ),
    "nickname": (lambda v: isinstance(v, str), "a string"),
    "creator_notes_multilingual": (
        lambda v: isinstance(v, dict) and all(isinstance(s, str) for s in v.values()),
        "an object of strings",
    ),
    "source": (_is_str_list, "a list of strings"),
    "group_only_greetings": (_is_str_list, "a list of strings"),
    "creation_date": (_is_number, "a number"),
    "modification_date": (_is_number, "a number"),
}


def _json_type(value: Any) -> str:
    """The JSON name of a Python value's type, for error messages."""
    names = {str: "a string", list: "a list", dict: "an object", bool: "a boolean"}
    if value is None:
        return "null"
    if _is_number(value):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _describe(value: Any) -> str:
    """``_json_type`` plus, for a list, the first item that breaks the list's majority type."""
    if not isinstance(value, list) or not value:
        return _json_type(value)
    item_types = [_json_type(item) for item in value]
    usual = max(set(item_types), key=item_types.count)
    odd = next((i for i, name in enumerate(item_types) if name != usual), None)
    if odd is None:
        return f"a list of {usual.split(' ')[-1]}s"  # "a list of strings", "... of nulls"
    return f"a list whose item {odd} is {item_types[odd]}"


def _check_fields(values: dict[str, Any], where: Where, prefix: str) -> None:
    """Raise CardError for the first modelled field of the wrong type, or a missing/empty name."""
    if "name" not in values:
        raise CardError(f"missing '{prefix}name': every card needs a character name", where)
    for key, value in values.items():
        check, expected = _FIELD_TYPES[key]
        if key in _V3_KEYS and value is None:
            continue  # an absent V3 extra
        if not check(value):
            raise CardError(f"'{prefix}{key}' must be {expected}, got {_describe(value)}", where)
    if not values["name"].strip():
        raise CardError(f"'{prefix}name' is empty: every card needs a character name", where)
    _check_plain_json(values, where, prefix.rstrip("."))
    try:  # a lorebook is checked on load so that a bad one fails at upload, not at the first message
        parse_lorebook(values.get("character_book"), f"{prefix}character_book")
    except LorebookError as error:
        raise CardError(error.message, where) from None


def _check_plain_json(values: Any, where: Where, at: str) -> None:
    """Every accepted card can be written back: no lone surrogates, NaN, or too-deep nesting."""
    try:
        check_json_value(values, where=at)
    except JsonError as exc:
        raise CardError(str(exc), where) from None


@dataclass
class CharacterCard:
    """One character: the V2/V3 card fields, unknown fields kept verbatim, and the PNG avatar."""

    name: str
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    creator_notes: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    alternate_greetings: list[str] = field(default_factory=list)
    character_book: dict[str, Any] | None = None
    tags: list[str] = field(default_factory=list)
    creator: str = ""
    character_version: str = ""
    extensions: dict[str, Any] = field(default_factory=dict)
    spec: str = SPEC_V2
    spec_version: str = ""  # "" -> "2.0" or "3.0" by spec
    # V3 extras: None means absent (and absent from the JSON we write).
    assets: list[dict[str, Any]] | None = None
    nickname: str | None = None
    creator_notes_multilingual: dict[str, str] | None = None
    source: list[str] | None = None
    group_only_greetings: list[str] | None = None
    creation_date: int | float | None = None
    modification_date: int | float | None = None
    # Fields we do not model: {"root": top-level keys besides spec/spec_version/data, "data": ...}.
    unknown: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The PNG's image as RGB (H, W, 3) uint8 when the card came from a PNG; else None.
    avatar: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_spec(self.spec, None)
        if not self.spec_version:
            self.spec_version = _SPEC_VERSIONS[self.spec]
        self.unknown.setdefault("root", {})
        self.unknown.setdefault("data", {})
        parts_ok = all(isinstance(part, dict) for part in self.unknown.values())
        if set(self.unknown) != {"root", "data"} or not parts_ok:
            raise CardError("'unknown' must be {'root': {...}, 'data': {...}}")
        _check_plain_json(self.unknown, None, "unknown")
        _check_fields({key: getattr(self, key) for key in _V2_KEYS + _V3_KEYS}, None, "")

    @classmethod
    def from_json(cls, obj: Any, where: Where = None) -> CharacterCard:
        """Build a card from a parsed V1, V2 or V3 JSON object; ``where`` names it in errors."""
        if not isinstance(obj, dict):
            raise CardError(f"a card must be a JSON object, got {_json_type(obj)}", where)
        if "spec" not in obj:
            if "data" in obj:
                raise CardError("missing 'spec' (expected 'chara_card_v2' or 'chara_card_v3')", where)
            return cls._from_v1(obj, where)
        spec = obj["spec"]
        _check_spec(spec, where)
        version = obj.get("spec_version", _SPEC_VERSIONS[spec])
        if not isinstance(version, str):
            raise CardError(f"'spec_version' must be a string, got {_json_type(version)}", where)
        data = obj.get("data")
        if not isinstance(data, dict):
            raise CardError(f"'data' must be an object, got {_json_type(data)}", where)
        keys = _V2_KEYS + (_V3_KEYS if spec == SPEC_V3 else ())
        known = {key: copy.deepcopy(data[key]) for key in keys if key in data}
        _check_fields(known, where, "data.")
        unknown = {
            "root": {k: copy.deepcopy(v) for k, v in obj.items() if k not in _ROOT_KEYS},
            "data": {k: copy.deepcopy(v) for k, v in data.items() if k not in keys},
        }
        return cls(**known, spec=spec, spec_version=version, unknown=unknown)

    @classmethod
    def _from_v1(cls, obj: dict[str, Any], where: Where) -> CharacterCard:
        """Upgrade a flat V1 card; every top-level key is kept (the V1 six as refreshed mirrors)."""
        if "name" not in obj:
            raise CardError("missing 'name': not a character card (no 'spec', no V1 'name')", where)
        known = {key: copy.deepcopy(obj[key]) for key in _V1_KEYS if key in obj}
        _check_fields(known, where, "")
        return cls(**known, unknown={"root": copy.deepcopy(obj), "data": {}})

    def to_json(self, spec: str | None = None) -> dict[str, Any]:
        """The card as a V2 or V3 JSON object (``spec`` overrides ``card.spec``), unknowns included.

        V1 mirror fields found at the top level on load are written back with the current values.
        """
        spec = spec or self.spec
        _check_spec(spec, None)
        _check_fields({key: getattr(self, key) for key in _V2_KEYS + _V3_KEYS}, None, "")
        data = {key: copy.deepcopy(getattr(self, key)) for key in _V2_KEYS}
        if self.character_book is None:
            del data["character_book"]
        if spec == SPEC_V3:
            data.update(self._v3_extras())
        for key, value in self.unknown.get("data", {}).items():
            data.setdefault(key, copy.deepcopy(value))
        version = self.spec_version if spec == self.spec else _SPEC_VERSIONS[spec]
        root: dict[str, Any] = {"spec": spec, "spec_version": version, "data": data}
        for key, value in self.unknown.get("root", {}).items():
            root.setdefault(key, getattr(self, key) if key in _V1_KEYS else copy.deepcopy(value))
        return root

    def _v3_extras(self) -> dict[str, Any]:
        """The V3-only fields that are present; ``group_only_greetings`` is required, default []."""
        extras = {key: copy.deepcopy(getattr(self, key)) for key in _V3_KEYS}
        if extras["group_only_greetings"] is None:
            extras["group_only_greetings"] = []
        return {key: value for key, value in extras.items() if value is not None}

    def render(self, text: str, user: str = "User") -> str:
        """Replace ``{{char}}``/``<BOT>``/``<char>`` and ``{{user}}``/``<USER>`` (any case) in one pass."""
        char = self.nickname or self.name  # V3: the nickname, when set, stands in for the name

        def replace(match: re.Match[str]) -> str:
            return user if (match.group(1) or match.group(2)).lower() == "user" else char

        return _MACRO.sub(replace, text)

    def prompt_fields(self, user: str = "User") -> dict[str, str]:
        """The fields that may reach a prompt (:data:`PROMPT_FIELDS`), substituted; never notes."""
        return {key: self.render(getattr(self, key), user) for key in PROMPT_FIELDS}

    def greetings(self, user: str = "User") -> list[str]:
        """``first_mes`` (when set) then the alternate greetings, substituted."""
        texts = ([self.first_mes] if self.first_mes else []) + self.alternate_greetings
        return [self.render(text, user) for text in texts]

    def example_dialogues(self, user: str = "User") -> list[list[tuple[str, str]]]:
        """``mes_example`` parsed into dialogues of ("user" | "char", text) turns, substituted."""
        dialogues = parse_mes_example(self.mes_example, char_name=self.name, user_name=user)
        return [[(who, self.render(text, user)) for who, text in turns] for turns in dialogues]


def _check_spec(spec: Any, where: Where) -> None:
    if not isinstance(spec, str):  # a list or object is not even hashable: say what it is
        raise CardError(f"'spec' must be a string ('chara_card_v2' or 'chara_card_v3'), got {_json_type(spec)}",
                        where)
    if spec not in _SPEC_VERSIONS:
        raise CardError(f"unsupported spec {spec[:40]!r}; expected 'chara_card_v2' or 'chara_card_v3'", where)


_MACRO = re.compile(r"\{\{\s*(char|user)\s*\}\}|<(bot|char|user)>", re.IGNORECASE)
_START = re.compile(r"<start>", re.IGNORECASE)  # a marker, on its own line or not


def parse_mes_example(
    text: str, *, char_name: str | None = None, user_name: str | None = None
) -> list[list[tuple[str, str]]]:
    """Split ``mes_example`` at ``<START>`` lines into dialogues of ("user" | "char", text) turns.

    A turn starts at a line prefixed ``{{user}}:``/``<USER>:`` or ``{{char}}:``/``<BOT>:`` (any case;
    also ``char_name:``/``user_name:`` when given) and runs to the next prefix; lines before the
    first prefix of a block are the character's narration. Empty dialogues are dropped.
    """
    user_alts = [r"\{\{\s*user\s*\}\}", "<user>"] + ([re.escape(user_name)] if user_name else [])
    char_alts = [r"\{\{\s*char\s*\}\}", "<bot>", "<char>"] + ([re.escape(char_name)] if char_name else [])
    prefix = re.compile(
        rf"^[ \t]*(?:(?P<user>{'|'.join(user_alts)})|(?P<char>{'|'.join(char_alts)}))[ \t]*:[ \t]?",
        re.IGNORECASE | re.MULTILINE,
    )
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    dialogues = [_split_turns(block, prefix) for block in _START.split(text)]
    return [turns for turns in dialogues if turns]


def _split_turns(block: str, prefix: re.Pattern[str]) -> list[tuple[str, str]]:
    """One ``<START>`` block as (speaker, text) turns; multi-line turns are kept whole."""
    matches = list(prefix.finditer(block))
    head = block[: matches[0].start()] if matches else block
    turns = [("char", head.strip())]
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(block)
        turns.append(("user" if match.group("user") else "char", block[match.end() : end].strip()))
    return [(who, said) for who, said in turns if said]


def character_id(name: str, max_length: int = 48) -> str:
    """A file- and URL-safe id for any character name; distinct names never share an id by accident.

    A name that folds to ASCII without losing a letter or digit ("Chef Baptiste!", "Zoë") gives
    its slug ("chef-baptiste", "zoe"), so names that differ only in case, accents or punctuation
    are the same character. A name with letters that do not fold ("Ωμέγα", "李白", "Dr. 李") or one
    longer than ``max_length`` gets the slug of what folds plus 8 hex digits of the SHA-256 of the
    NFC name ("Ωμέγα" -> "c-59b35e54", "Dr. 李" -> "dr-5608a35a"): stable across runs, and a collision needs two names
    with equal hashes.
    """
    normal = unicodedata.normalize("NFC", name.strip())
    folded = unicodedata.normalize("NFKD", normal).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")
    kept = sum(ch.isalnum() for ch in folded)
    # NFKD splits "é" into "e" + a combining accent; only the base letters count
    letters = sum(ch.isalnum() for ch in unicodedata.normalize("NFKD", normal) if not unicodedata.combining(ch))
    if slug and kept == letters and len(slug) <= max_length:
        return slug
    digest = hashlib.sha256(normal.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    stem = slug[: max_length - 9].strip("-") or "c"
    return f"{stem}-{digest}"


# --------------------------------------------------------------------------- reading


def load_card(
    source: str | PathLike[str] | bytes,
    *,
    name: str | None = None,
    max_json_bytes: int = MAX_JSON_BYTES,
    max_png_bytes: int = MAX_PNG_BYTES,
    max_pixels: int = MAX_AVATAR_PIXELS,
) -> CharacterCard:
    """Read a card from a JSON or PNG file (or their bytes; ``name`` labels them in errors)."""
    raw, where = _read_source(source, name, max(max_json_bytes, max_png_bytes))
    if raw.startswith(PNG_SIGNATURE):
        if len(raw) > max_png_bytes:
            raise CardError(f"PNG card is over the limit of {max_png_bytes} bytes", where)
        return _load_png(raw, where, max_json_bytes, max_pixels)
    if not raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        raise CardError("not a character card: neither a PNG nor a JSON object", where)
    if len(raw) > max_json_bytes:
        raise CardError(f"JSON card is over the limit of {max_json_bytes} bytes", where)
    return CharacterCard.from_json(parse_card_json(raw, where, "card"), where)


def _read_source(source: str | PathLike[str] | bytes, name: str | None, limit: int) -> tuple[bytes, str]:
    """The bytes of a card and the label for its errors; refuses files over ``limit`` unread."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        raw, where = bytes(source), name or "<bytes>"
    else:
        path = Path(source)
        where = name or str(path)
        if not path.is_file():
            raise CardError("card file not found" if not path.exists() else "not a file", where)
        if path.stat().st_size > limit:
            raise CardError(f"file is {path.stat().st_size} bytes, over the limit of {limit}", where)
        raw = path.read_bytes()
    if not raw:
        raise CardError("empty card file", where)
    return raw, where


def _load_png(raw: bytes, where: str, max_json_bytes: int, max_pixels: int) -> CharacterCard:
    """A card from its PNG: the preferred text chunk's JSON plus the decoded avatar."""
    payloads: dict[str, bytes] = {}
    image_parts = [PNG_SIGNATURE]  # the PNG without its text: Pillow caps text chunks at 1 MB
    for chunk_type, body, whole in png_chunks(raw, where):
        found = card_text(chunk_type, body, where, max_json_bytes)
        if found is not None and found[0] not in payloads:
            payloads[found[0]] = found[1]
        if chunk_type not in TEXT_CHUNKS:
            image_parts.append(whole)
    keyword = next((key for key in CARD_CHUNKS if key in payloads), None)
    if keyword is None:
        raise CardError("PNG has no 'chara' or 'ccv3' text chunk: an image, not a character card", where)
    card = CharacterCard.from_json(decode_payload(keyword, payloads[keyword], where, max_json_bytes), where)
    try:
        card.avatar = load_image_bytes(b"".join(image_parts), max_pixels=max_pixels, name=where)
    except DataError as exc:
        raise CardError(f"avatar: {exc.message}", where) from None
    return card


# --------------------------------------------------------------------------- writing


def save_card_json(
    card: CharacterCard, path: str | PathLike[str], *, max_json_bytes: int = MAX_JSON_BYTES
) -> None:
    """Write ``card.to_json()`` as UTF-8 JSON (atomically: a crash never leaves half a card)."""
    data = (json.dumps(card.to_json(), ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    if len(data) > max_json_bytes:
        raise CardError(f"card JSON is {len(data)} bytes, over the limit of {max_json_bytes}", path)
    write_bytes_atomic(path, data)


def save_card_png(
    card: CharacterCard,
    path: str | PathLike[str],
    avatar: Image.Image | np.ndarray | None = None,
    *,
    max_json_bytes: int = MAX_JSON_BYTES,
) -> None:
    """Write a PNG card (:func:`card_png_bytes`) atomically."""
    write_bytes_atomic(path, card_png_bytes(card, avatar, max_json_bytes=max_json_bytes, where=path))


def card_png_bytes(
    card: CharacterCard,
    avatar: Image.Image | np.ndarray | None = None,
    *,
    max_json_bytes: int = MAX_JSON_BYTES,
    where: str | PathLike[str] = "card.png",
) -> bytes:
    """A PNG card: ``chara`` (V2 JSON, base64) and, for V3 cards, ``ccv3`` (V3 JSON).

    The image is ``avatar``, else ``card.avatar``, else :func:`default_avatar`; `where` names the
    card in errors.
    """
    image = _avatar_image(card, avatar)
    info = PngInfo()
    v2 = card.to_json(SPEC_V2)
    if card.spec == SPEC_V3:  # the V3 spec asks that a V2 backfill say so to V2-only readers
        notes = v2["data"]["creator_notes"]
        v2["data"]["creator_notes"] = _BACKFILL_NOTE + (f"\n\n{notes}" if notes else "")
    info.add_text("chara", _base64_json(v2, where, max_json_bytes))
    if card.spec == SPEC_V3:
        info.add_text("ccv3", _base64_json(card.to_json(), where, max_json_bytes))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)  # text chunks of a source image are not copied
    return buffer.getvalue()


def _base64_json(obj: dict[str, Any], path: str | PathLike[str], limit: int) -> str:
    raw = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(raw) > limit:
        raise CardError(f"card JSON is {len(raw)} bytes, over the limit of {limit}", path)
    return base64.b64encode(raw).decode("ascii")


def _avatar_image(card: CharacterCard, avatar: Image.Image | np.ndarray | None) -> Image.Image:
    """The image to save: the argument, the card's own avatar, or a generated one."""
    if avatar is None:
        avatar = card.avatar if card.avatar is not None else default_avatar(card.name)
    if isinstance(avatar, np.ndarray):
        channels = avatar.shape[2] if avatar.ndim == 3 else 1
        if avatar.dtype != np.uint8 or avatar.ndim not in (2, 3) or channels not in (1, 3, 4):
            shape = f"{avatar.dtype} {avatar.shape}"
            raise ValueError(f"avatar array must be uint8 (H, W), (H, W, 3) or (H, W, 4); got {shape}")
        avatar = Image.fromarray(avatar)
    if not isinstance(avatar, Image.Image):
        raise TypeError(f"avatar must be a PIL image or a numpy array, got {type(avatar).__name__}")
    if avatar.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
        avatar = avatar.convert("RGBA" if "A" in avatar.mode else "RGB")
    return avatar


def default_avatar(name: str, size: int = 256) -> Image.Image:
    """A ``size`` square in a colour derived from ``name``, with its initial in white."""
    hue = (zlib.crc32(name.encode("utf-8")) % 360) / 360.0
    colour = tuple(round(255 * c) for c in colorsys.hls_to_rgb(hue, 0.42, 0.55))
    image = Image.new("RGB", (size, size), colour)  # type: ignore[arg-type]
    initial = name.strip()[:1].upper() or "?"
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=size * 0.6)  # bitmap fallback when FreeType is missing
    left, top, right, bottom = draw.textbbox((0, 0), initial, font=font)
    origin = ((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top)
    draw.text(origin, initial, fill=(255, 255, 255), font=font)
    return image


