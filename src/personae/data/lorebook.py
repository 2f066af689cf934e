"""Lorebooks (a card's ``character_book``): which entries a conversation activates, by SillyTavern's rules.

The rules (``docs/guide/cards.md`` has the table):

* An entry is **activated** when one of its ``keys`` occurs in the last ``scan_depth`` messages of
  the conversation (book field; default :data:`DEFAULT_SCAN_DEPTH`, as SillyTavern). Matching is
  case-insensitive unless the entry has ``case_sensitive: true``; with
  ``extensions.match_whole_words: true`` a key must not touch a letter, digit or ``_`` on either
  side. Keys are literal text (SillyTavern's ``/regex/`` keys are not run: a card from the web must
  not be able to stall the server).
* ``selective: true`` with non-empty ``secondary_keys`` also checks those, by
  ``extensions.selectiveLogic``: 0 AND ANY (default), 1 NOT ALL, 2 NOT ANY, 3 AND ALL.
* ``constant: true`` entries are always activated; ``enabled: false`` entries never are.
* With the book's ``recursive_scanning: true``, the content of activated entries is scanned too,
  until no new entry activates; an entry with ``extensions.exclude_recursion`` is activated only by
  the messages, and one with ``extensions.prevent_recursion`` has its content left out of the scan.
* Activated entries are kept by importance until ``token_budget`` (book field, in tokens; absent:
  no budget beyond the prompt's) is spent: higher ``priority`` first (absent: its
  ``insertion_order``), constants before others at equal priority, then earlier entries. Kept
  entries are placed in ascending ``insertion_order``, ``position: before_char`` ones before the
  character definition and the rest (``after_char``, the default) after it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from personae.errors import DataError

DEFAULT_SCAN_DEPTH = 2  # messages scanned when the book sets no scan_depth (SillyTavern's default)
POSITIONS = ("before_char", "after_char")
SELECTIVE_LOGIC = {0: "and_any", 1: "not_all", 2: "not_any", 3: "and_all"}


class LorebookError(DataError):
    """A ``character_book`` field of the wrong type; the message names the field."""


@dataclass(frozen=True)
class LoreEntry:
    """One lorebook entry, its fields read and defaulted."""

    index: int  # position in the book's entries list: the last tie-break
    content: str
    keys: tuple[str, ...] = ()
    secondary_keys: tuple[str, ...] = ()
    selective: bool = False
    logic: str = "and_any"  # one of SELECTIVE_LOGIC's values
    constant: bool = False
    enabled: bool = True
    insertion_order: float = 100
    priority: float = 100
    position: str = "after_char"
    case_sensitive: bool = False
    whole_words: bool = False
    exclude_recursion: bool = False  # not activated by other entries' content
    prevent_recursion: bool = False  # its content activates no other entry

    def matches(self, text: str) -> bool:
        """Whether the scanned text triggers this entry (its keys, then its secondary keys)."""
        if not any(self._found(key, text) for key in self.keys):
            return False
        if not self.selective or not self.secondary_keys:
            return True
        found = [self._found(key, text) for key in self.secondary_keys]
        return {"and_any": any(found), "and_all": all(found), "not_any": not any(found),
                "not_all": not all(found)}[self.logic]

    def _found(self, key: str, text: str) -> bool:
        if not key.strip():
            return False  # an empty key would match everything
        flags = 0 if self.case_sensitive else re.IGNORECASE
        pattern = re.escape(key.strip())
        if self.whole_words:
            pattern = rf"(?<!\w){pattern}(?!\w)"
        return re.search(pattern, text, flags) is not None


@dataclass(frozen=True)
class Lorebook:
    """A card's lorebook: its entries and the book-wide scanning settings."""

    entries: tuple[LoreEntry, ...]
    scan_depth: int = DEFAULT_SCAN_DEPTH
    token_budget: int | None = None
    recursive: bool = False

    def activate(self, messages: Sequence[str]) -> list[LoreEntry]:
        """Entries activated by the last ``scan_depth`` of ``messages`` (oldest first), in book order."""
        scanned = "\n".join(messages[-self.scan_depth:]) if self.scan_depth > 0 else ""
        live = [e for e in self.entries if e.enabled]
        active = {e.index for e in live if e.constant or e.matches(scanned)}
        grew = self.recursive
        while grew:  # recursion: activated content may name the keys of other entries
            content = "\n".join(e.content for e in live if e.index in active and not e.prevent_recursion)
            new = {e.index for e in live if e.index not in active and not e.exclude_recursion and e.matches(content)}
            active |= new
            grew = bool(new)
        return [e for e in live if e.index in active]

    def within_budget(self, entries: list[LoreEntry], size: Callable[[LoreEntry], int],
                      budget: int | None = None) -> list[LoreEntry]:
        """The most important entries that fit the book's budget and ``budget``, in insertion order."""
        limits = [b for b in (self.token_budget, budget) if b is not None]
        limit = min(limits) if limits else None
        kept, spent = [], 0
        for entry in sorted(entries, key=_importance):
            cost = size(entry)
            if limit is None or spent + cost <= limit:
                kept.append(entry)
                spent += cost
        return sorted(kept, key=lambda e: (e.insertion_order, e.index))


def _importance(entry: LoreEntry) -> tuple[float, bool, int]:
    return -entry.priority, not entry.constant, entry.index


def parse_lorebook(book: dict[str, Any] | None, where: str = "character_book") -> Lorebook | None:
    """A ``character_book`` object as a Lorebook (None for none); LorebookError names a bad field."""
    if book is None:
        return None
    if not isinstance(book, dict):
        raise LorebookError(f"'{where}' must be an object or null")
    entries = book.get("entries", [])
    if not isinstance(entries, list):
        raise LorebookError(f"'{where}.entries' must be a list")
    depth = _number(book, "scan_depth", DEFAULT_SCAN_DEPTH, where)
    budget = _number(book, "token_budget", None, where)
    recursive = _flag(book, "recursive_scanning", False, where)
    parsed = tuple(_entry(entry, i, f"{where}.entries[{i}]") for i, entry in enumerate(entries))
    return Lorebook(parsed, max(int(depth), 0), None if budget is None else max(int(budget), 0), recursive)


def _entry(raw: Any, index: int, where: str) -> LoreEntry:
    if not isinstance(raw, dict):
        raise LorebookError(f"'{where}' must be an object")
    extensions = raw.get("extensions") or {}
    if not isinstance(extensions, dict):
        raise LorebookError(f"'{where}.extensions' must be an object")
    content = raw.get("content", "")
    if not isinstance(content, str):
        raise LorebookError(f"'{where}.content' must be a string")
    position = raw.get("position") or "after_char"
    if position not in POSITIONS:
        raise LorebookError(f"'{where}.position' must be one of {', '.join(POSITIONS)}, got {position!r}")
    logic = extensions.get("selectiveLogic")
    logic = 0 if logic is None else logic  # SillyTavern writes null for "the default"
    if logic not in SELECTIVE_LOGIC:
        raise LorebookError(f"'{where}.extensions.selectiveLogic' must be one of 0, 1, 2, 3, got {logic!r}")
    order = _number(raw, "insertion_order", 100, where)
    return LoreEntry(
        index=index, content=content, keys=_keys(raw, "keys", where),
        secondary_keys=_keys(raw, "secondary_keys", where),
        selective=_flag(raw, "selective", False, where), logic=SELECTIVE_LOGIC[logic],
        constant=_flag(raw, "constant", False, where), enabled=_flag(raw, "enabled", True, where),
        insertion_order=order, priority=_number(raw, "priority", order, where), position=position,
        case_sensitive=_flag(raw, "case_sensitive", False, where) or _flag(extensions, "case_sensitive", False, where),
        whole_words=_flag(extensions, "match_whole_words", False, where),
        exclude_recursion=_flag(extensions, "exclude_recursion", False, where),
        prevent_recursion=_flag(extensions, "prevent_recursion", False, where),
    )


def _keys(raw: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise LorebookError(f"'{where}.{key}' must be a list of strings")
    return tuple(value)


def _flag(raw: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise LorebookError(f"'{where}.{key}' must be true or false, got {value!r}")
    return value


def _number(raw: dict[str, Any], key: str, default: Any, where: str) -> Any:
    value = raw.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LorebookError(f"'{where}.{key}' must be a number, got {value!r}")
    return value
