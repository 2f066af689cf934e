"""Readers of other tools' conversation files: OpenAI messages, ShareGPT, SillyTavern chats, personae's own.

Each reader yields :class:`Conversation` objects or, for a row it cannot use, a DataError naming
the file and row and saying why; :mod:`personae.data.convert` counts both. The formats are
described in ``docs/guide/data-format.md`` ("Converting other formats").
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personae.data.cards import CharacterCard, load_card
from personae.data.dialogues import parse_dialogue
from personae.data.images import load_image_bytes, sniff_format
from personae.data.jsonl import JsonError, json_type, load_json_object, numbered_lines, strict_json_loads
from personae.data.prompt import definition_text
from personae.errors import DataError

IMAGE_PLACEHOLDER = "<image>"  # ShareGPT's mark of where an image goes
_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.IGNORECASE)
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "bot": "assistant", "character": "assistant"}


@dataclass(frozen=True)
class ConvertedImage:
    """An image's encoded bytes (checked to decode) and its file suffix, e.g. ".png"."""

    data: bytes
    suffix: str


@dataclass
class Message:
    """One message: role ("system", "user" or "assistant"), its text, and the images it carries."""

    role: str
    text: str
    images: list[ConvertedImage] = field(default_factory=list)


@dataclass
class Conversation:
    """One conversation read from any format, before it is written in another."""

    id: str
    messages: list[Message]
    character: str = "Assistant"  # the character's display name
    where: str = ""  # "file:row", for the writers' refusals

    @property
    def system(self) -> str:
        return "\n".join(m.text for m in self.messages if m.role == "system" and m.text)

    @property
    def images(self) -> list[ConvertedImage]:
        return [image for message in self.messages for image in message.images]


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
    """(row number, object) for a JSONL file (row = line) or a JSON array file (row = 1-based index)."""
    with open(path, "rb") as handle:
        start = handle.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not start.startswith(b"["):
        for line, text in numbered_lines(path):
            try:
                yield line, text if isinstance(text, DataError) else load_json_object(text, path, line)
            except DataError as error:
                yield line, error
        return
    try:
        rows = strict_json_loads(path.read_text(encoding="utf-8-sig"))  # no NaN, bounded depth
    except (UnicodeDecodeError, JsonError) as error:
        raise DataError(f"not a JSON array of rows: {error}", path) from None
    for index, row in enumerate(rows, start=1):
        ok = isinstance(row, dict)
        yield index, row if ok else DataError(f"row {index}: expected a JSON object, got {json_type(row)}", path)


def load_image_ref(ref: str, base: Path, where: str) -> ConvertedImage:
    """An image from a data URL, a file:// URL or a path (relative to `base`); remote URLs are refused."""
    if ref.split(":", 1)[0].lower() in ("http", "https"):
        raise DataError(f"remote image URL {ref[:60]!r} is not fetched: download it and give a path", where)
    match = _DATA_URL.match(ref)
    if match:
        try:
            data = base64.b64decode(ref[match.end():], validate=True)
        except (binascii.Error, ValueError):
            raise DataError("an image data URL's base64 is malformed", where) from None
    else:
        path = Path(ref.removeprefix("file://"))
        path = path if path.is_absolute() else base / path
        try:
            data = path.read_bytes()
        except (OSError, ValueError):  # missing, a folder, unreadable, or a name with a NUL byte
            raise DataError(f"image file not found: {ref} (looked for {path})", where) from None
    load_image_bytes(data, name=f"{where}: image {ref[:60]}")  # refuses broken, oversized and non-images
    kind = (sniff_format(data[:12]) or "png").lower()  # by magic bytes, as load_image_bytes decided
    return ConvertedImage(data, "." + {"jpeg": "jpg"}.get(kind, kind))


def _message_id(row: dict[str, Any], path: Path, number: int) -> str:
    value = row.get("id")
    return str(value) if isinstance(value, (str, int)) and str(value).strip() else f"{path.stem}-{number}"


# ---- OpenAI messages ---------------------------------------------------------------------------------


def read_openai(path: Path) -> Iterator[Conversation | DataError]:
    """Rows ``{"messages": [{"role", "content": text or [text / image_url parts], "name"?}]}``."""
    for number, row in read_rows(path):
        where = f"{path}:{number}"
        try:
            if isinstance(row, DataError):
                raise row
            yield _openai_row(row, path, number, where)
        except DataError as error:
            yield error if error.path else DataError(error.message, path, number)


def _openai_row(row: dict[str, Any], path: Path, number: int, where: str) -> Conversation:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"field 'messages' must be a non-empty array, got {json_type(messages)}")
    parsed, name = [], None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"messages[{i}] must be an object, got {json_type(message)}")
        role = _ROLES.get(message["role"]) if isinstance(message.get("role"), str) else None
        if role is None:
            raise DataError(f"messages[{i}].role {message.get('role')!r} is not supported: personae converts "
                            f"conversations of system, user and assistant messages (no tools)")
        if message.get("tool_calls") or message.get("function_call"):
            raise DataError(f"messages[{i}] is a tool call: personae converts conversations in text, without tools")
        text, images = _openai_content(message.get("content"), f"messages[{i}].content", path.parent, where)
        if role == "assistant" and isinstance(message.get("name"), str) and name is None:
            name = message["name"]
        parsed.append(Message(role, text, images))
    return Conversation(_message_id(row, path, number), parsed, name or _row_character(row), where)


def _row_character(row: dict[str, Any]) -> str:
    value = row.get("character")
    return value if isinstance(value, str) and value.strip() else "Assistant"


def _openai_content(content: Any, field_name: str, base: Path, where: str) -> tuple[str, list[ConvertedImage]]:
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list):
        raise DataError(f"{field_name} must be a string or an array of parts, got {json_type(content)}")
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise DataError(f"{field_name}[{j}].image_url.url must be a string")
            images.append(load_image_ref(url, base, f"{where}: {field_name}[{j}]"))
        else:
            raise DataError(f"{field_name}[{j}] must be a text or image_url part, got {str(part)[:60]}")
    return "\n".join(texts), images


# ---- ShareGPT ----------------------------------------------------------------------------------------


def read_sharegpt(path: Path) -> Iterator[Conversation | DataError]:
    """Rows ``{"conversations": [{"from", "value"}], "images": [...], "system"?}``, images at ``<image>``."""
    for number, row in read_rows(path):
        try:
            if isinstance(row, DataError):
                raise row
            yield _sharegpt_row(row, path, number)
        except DataError as error:
            yield error if error.path else DataError(error.message, path, number)


def _sharegpt_row(row: dict[str, Any], path: Path, number: int) -> Conversation:
    turns = row.get("conversations", row.get("messages"))  # LLaMA-Factory's sharegpt sets use either name
    if not isinstance(turns, list) or not turns:
        raise DataError(f"field 'conversations' must be a non-empty array, got {json_type(turns)}")
    refs = row.get("images", [])
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise DataError("field 'images' must be an array of paths")
    texts = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value", turn.get("content")), str):
            raise DataError(f"conversations[{i}] must be an object with a string 'value'")
        texts.append(turn.get("value", turn.get("content")))
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for text in texts)
    if placeholders != len(refs):
        raise DataError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in 'conversations' but {len(refs)} "
                        f"image(s) in 'images': each image needs one placeholder where it is shown")
    images = iter([load_image_ref(ref, path.parent, f"{path}:{number}: images[{k}]") for k, ref in enumerate(refs)])
    messages = [Message("system", row["system"])] if isinstance(row.get("system"), str) and row["system"] else []
    for i, (turn, text) in enumerate(zip(turns, texts)):
        speaker = turn.get("from", turn.get("role"))
        role = _SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise DataError(f"conversations[{i}].from {speaker!r} is not supported; use one of "
                            f"{', '.join(sorted(_SHAREGPT_ROLES))}")
        shown = [next(images) for _ in range(text.count(IMAGE_PLACEHOLDER))]
        messages.append(Message(role, text.replace(IMAGE_PLACEHOLDER, "").strip(), shown))
    return Conversation(_message_id(row, path, number), messages, _row_character(row), f"{path}:{number}")


# ---- SillyTavern chat exports ------------------------------------------------------------------------


def read_sillytavern(path: Path) -> Iterator[Conversation | DataError]:
    """Chat exports (a ``.jsonl`` file, or a folder of them): a header line, then one line per message."""
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    for chat in files:
        yield from _sillytavern_chat(chat)


def _sillytavern_chat(path: Path) -> Iterator[Conversation | DataError]:
    rows = read_rows(path)
    first = next(rows, None)
    header = first[1] if first else None
    if not isinstance(header, dict) or "character_name" not in header or "mes" in header:
        yield DataError("not a SillyTavern chat: the first line must be the header with 'character_name'", path,
                        first[0] if first else None)
        return
    character = str(header["character_name"])
    messages = []
    for number, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            messages.append(_sillytavern_message(row, character, path, number))
        except DataError as error:
            yield error if error.path else DataError(error.message, path, number)
    yield Conversation(path.stem, messages, character, str(path))


def _sillytavern_message(row: dict[str, Any], character: str, path: Path, number: int) -> Message:
    if not isinstance(row.get("mes"), str) or not isinstance(row.get("is_user"), bool):
        raise DataError("a message line needs a string 'mes' and a boolean 'is_user'")
    if row.get("is_system"):
        raise DataError("a hidden or system message (is_system) is not part of the conversation")
    if not row["is_user"] and row.get("name", character) != character:
        raise DataError(f"a message by {row.get('name')!r}, not by the chat's character {character!r} "
                        f"(group chats are not converted)")
    extra = row.get("extra") if isinstance(row.get("extra"), dict) else {}
    ref = extra.get("image")
    images = [load_image_ref(ref, path.parent, f"{path}:{number}: extra.image")] if isinstance(ref, str) and ref else []
    return Message("user" if row["is_user"] else "assistant", row["mes"], images)


# ---- personae's own dialogues ------------------------------------------------------------------------


def read_personae(path: Path) -> Iterator[Conversation | DataError]:
    """A ``dialogues.jsonl`` (or its folder) with its ``characters/`` cards, as system + user/assistant messages."""
    manifest = path / "dialogues.jsonl" if path.is_dir() else path
    cards: dict[str, CharacterCard] = {}
    for line, text in numbered_lines(manifest):
        try:
            record = parse_dialogue(text, manifest, line)
            if record.character not in cards:
                cards[record.character] = _card(manifest.parent / "characters", record.character, manifest, line)
            card = cards[record.character]
            system, definition = definition_text(card)
            images = [load_image_ref(str(record.image), manifest.parent, f"{manifest}:{line}")] if record.image else []
            messages = [Message("system", f"{system}\n{definition}")]
            for k, turn in enumerate(record.turns):
                messages += [Message("user", turn.user, images if k == 0 else []), Message("assistant", turn.reply)]
            yield Conversation(record.id, messages, card.nickname or card.name, f"{manifest}:{line}")
        except DataError as error:
            yield error


def _card(folder: Path, character: str, manifest: Path, line: int) -> CharacterCard:
    for suffix in (".json", ".png"):
        if (folder / f"{character}{suffix}").is_file():
            return load_card(folder / f"{character}{suffix}")
    raise DataError(f"no card for character {character!r} in {folder}", manifest, line)
