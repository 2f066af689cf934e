"""`personae data convert`: other tools' conversation files into personae's dialogues, or out to OpenAI messages.

In: OpenAI ``messages`` JSONL, ShareGPT, SillyTavern chat exports, or personae's own
``dialogues.jsonl`` (readers: :mod:`personae.data.convert_readers`). Out: personae's layout
(``dialogues.jsonl`` + ``characters/`` + ``images/``, ``docs/guide/data-format.md``) or OpenAI
``messages`` JSONL with images inline as data URLs. Every row is kept or refused with a reason;
:class:`ConvertReport` counts both.

Into personae's layout a conversation becomes (user, reply) turns: consecutive messages of one role
are joined with a newline, assistant messages before the first user message and a last user
message without a reply are left out, and a conversation needs at least one complete exchange and
at most one image (a personae conversation looks at one image). Each distinct (character name,
system text) gets a card whose ``system_prompt`` is that text, unless ``card`` gives one card for all.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from personae.data.cards import CharacterCard, character_id, save_card_json, save_card_png
from personae.data.convert_readers import Conversation, read_openai, read_personae, read_sharegpt, read_sillytavern
from personae.errors import DataError
from personae.files import atomic_directory, atomic_path

READERS: dict[str, Callable[[Path], Iterator[Conversation | DataError]]] = {
    "openai": read_openai,
    "sharegpt": read_sharegpt,
    "sillytavern": read_sillytavern,
    "personae": read_personae,
}
TARGETS = ("personae", "openai")
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp", ".bmp": "image/bmp"}


@dataclass
class ConvertReport:
    """What a conversion did: rows kept, rows refused (each with where and why), files written."""

    source: str
    target: str
    kept: int = 0
    refused: list[str] = field(default_factory=list)  # "file:row: reason", one per refused row
    characters: int = 0  # cards written (personae target)
    out: str = ""
    notes: list[str] = field(default_factory=list)  # about the output as a whole

    def summary(self, shown: int = 20) -> str:
        """A few lines for the terminal: the counts, then the first refusals."""
        lines = [f"{self.source} -> {self.target}: kept {self.kept} row(s), refused {len(self.refused)}"
                 + (f", {self.characters} character card(s)" if self.target == "personae" else "")
                 + f"; wrote {self.out}"]
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  refused {reason}" for reason in self.refused[:shown]]
        if len(self.refused) > shown:
            lines.append(f"  ... and {len(self.refused) - shown} more")
        return "\n".join(lines)


def slugify(name: str) -> str:
    """A file- and URL-safe id from a character name, any script: :func:`~personae.data.cards.character_id`."""
    return character_id(name)


def convert(source: Path, fmt: str, out: Path, *, to: str = "personae",
            card: CharacterCard | None = None) -> ConvertReport:
    """Convert `source` (format `fmt`) into `out`; a bad row is refused and counted, never fatal."""
    if fmt not in READERS:
        raise DataError(f"unknown input format {fmt!r}; choose one of {', '.join(READERS)}")
    if to not in TARGETS:
        raise DataError(f"unknown output format {to!r}; choose one of {', '.join(TARGETS)}")
    if not source.exists():
        raise DataError("input not found", source)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise DataError("output exists; choose a new --out or remove it first", out)
    report = ConvertReport(fmt, to, out=str(out))
    rows = READERS[fmt](Path(source))
    if to == "openai":
        _write_openai(rows, out, report)
    else:
        _write_personae(rows, out, report, card)
    return report


def _write_openai(rows: Iterator[Conversation | DataError], out: Path, report: ConvertReport) -> None:
    with atomic_path(out) as staging, staging.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            if isinstance(row, DataError):
                report.refused.append(str(row))
                continue
            handle.write(json.dumps(openai_row(row), ensure_ascii=False) + "\n")
            report.kept += 1


def openai_row(conversation: Conversation) -> dict:
    """One conversation as an OpenAI ``messages`` row; images become data-URL parts after the text."""
    messages = []
    for message in conversation.messages:
        entry: dict = {"role": message.role, "content": message.text}
        if message.images:
            urls = [f"data:{_MIME.get(i.suffix, 'image/png')};base64,{base64.b64encode(i.data).decode()}"
                    for i in message.images]
            entry["content"] = ([{"type": "text", "text": message.text}] if message.text else []) + [
                {"type": "image_url", "image_url": {"url": url}} for url in urls]
        if message.role == "assistant" and conversation.character != "Assistant":
            entry["name"] = conversation.character
        messages.append(entry)
    return {"id": conversation.id, "messages": messages}


def dialogue_turns(conversation: Conversation) -> list[dict[str, str]]:
    """(user, reply) turns: same-role messages joined, a leading greeting and a trailing question left out."""
    turns, user, reply = [], None, None
    for message in conversation.messages:
        if message.role == "user":
            if reply is not None:
                turns.append({"user": user, "reply": reply})
                user, reply = None, None
            user = message.text if user is None else f"{user}\n{message.text}"
        elif message.role == "assistant" and user is not None:
            reply = message.text if reply is None else f"{reply}\n{message.text}"
    if user is not None and reply is not None:
        turns.append({"user": user, "reply": reply})
    return [t for t in turns if t["user"].strip() and t["reply"].strip()]


class _Cards:
    """The character cards a personae conversion writes: one per (name, system text), or the given one."""

    def __init__(self, given: CharacterCard | None) -> None:
        self.given = given
        self.ids: dict[tuple[str, str], str] = {}
        self.cards: dict[str, CharacterCard] = {}
        if given is not None:
            self.cards[slugify(given.name)] = given

    def id_for(self, conversation: Conversation) -> str:
        if self.given is not None:
            return slugify(self.given.name)
        key = (conversation.character, conversation.system)
        if key not in self.ids:
            base = cid = slugify(conversation.character)
            number = 1
            while cid in self.cards:  # the same name with another system text: another character
                number += 1
                cid = f"{base}-{number}"
            self.ids[key] = cid
            self.cards[cid] = CharacterCard(name=conversation.character, system_prompt=conversation.system)
        return self.ids[key]


def _write_personae(rows: Iterator[Conversation | DataError], out: Path, report: ConvertReport,
                    card: CharacterCard | None) -> None:
    cards, records = _Cards(card), []
    with atomic_directory(out) as staging:
        (staging / "images").mkdir()
        for row in rows:
            try:
                if isinstance(row, DataError):
                    raise row
                records.append(_personae_record(row, len(records), staging, cards))
                report.kept += 1
            except DataError as error:
                report.refused.append(str(error))
        (staging / "characters").mkdir()
        for cid, character in cards.cards.items():
            if character.avatar is not None:  # a PNG card given with --card keeps its image
                save_card_png(character, staging / "characters" / f"{cid}.png")
            else:
                save_card_json(character, staging / "characters" / f"{cid}.json")
        with (staging / "dialogues.jsonl").open("w", encoding="utf-8", newline="\n") as handle:
            handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    report.characters = len(cards.cards)
    with_image = sum(1 for record in records if "image" in record)
    if 0 < with_image < len(records):
        report.notes.append(f"{with_image} conversation(s) have an image and {len(records) - with_image} do not; "
                            f"training takes one kind per data set, so split the file by kind")


def _personae_record(conversation: Conversation, index: int, staging: Path, cards: _Cards) -> dict:
    images = conversation.images
    if len(images) > 1:
        raise DataError(f"{len(images)} images: a personae conversation looks at one image (convert it with "
                        f"--to openai, or split it)", conversation.where)
    turns = dialogue_turns(conversation)
    if not turns:
        raise DataError("no user message followed by an assistant reply: nothing to train on", conversation.where)
    record: dict = {"id": conversation.id, "character": cards.id_for(conversation)}
    if images:
        name = f"images/{index:06d}{images[0].suffix}"
        (staging / name).write_bytes(images[0].data)
        record["image"] = name
    record["turns"] = turns
    return record
