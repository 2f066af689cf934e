"""Strict JSON and JSONL reading shared by every manifest, dialogue file and card.

Strict means: standard JSON only (``NaN``, ``Infinity`` and ``-Infinity`` are refused, as are
duplicate keys), containers nested at most :data:`MAX_JSON_DEPTH` deep (deeper input is an error,
never a ``RecursionError``), every string valid Unicode (a ``\\ud800`` escape, a lone surrogate, is
refused: it could not be written back as UTF-8) and every JSONL line at most
:data:`MAX_LINE_BYTES` long (longer lines are refused without being held in memory).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from personae.errors import DataError
from personae.files import atomic_path

T = TypeVar("T")

MAX_JSON_DEPTH: int = 64  # objects/arrays inside each other; real cards and rows use fewer than 10
MAX_LINE_BYTES: int = 8 * 1024 * 1024  # one JSONL row; a caption or a dialogue is far smaller


class JsonError(ValueError):
    """Text that is not strict JSON; the message says what and where (``data.tags[2]``)."""


def strict_json_loads(text: str | bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse standard JSON and check it with :func:`check_json_value`; raises :class:`JsonError`."""
    try:
        value = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise JsonError(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise JsonError(f"nested more than {max_depth} levels deep") from None
    except ValueError as exc:  # duplicate key, NaN/Infinity, an integer too long to convert
        raise JsonError(str(exc)) from None
    check_json_value(value, max_depth=max_depth)
    return value


def check_json_value(value: Any, *, max_depth: int = MAX_JSON_DEPTH, where: str = "") -> None:
    """Raise :class:`JsonError` unless ``value`` is plain JSON that writes back as UTF-8 unchanged.

    Plain JSON: dicts with string keys, lists, strings without lone surrogates, finite numbers,
    booleans and None, nested at most ``max_depth`` deep. Walks iteratively (no recursion).
    """
    stack: list[tuple[Any, int, str]] = [(value, 0, where)]
    while stack:
        item, depth, at = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= max_depth:
                shown = at if len(at) <= 60 else at[:57] + "..."  # the first steps say where
                raise JsonError(f"{shown or 'the value'} is nested more than {max_depth} levels deep")
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        raise JsonError(f"{at or 'an object'} has a non-string key {key!r}")
                    _check_text(key, f"a key of {at or 'the object'}")
                    stack.append((child, depth + 1, f"{at}.{key}" if at else key))
            else:
                stack.extend((child, depth + 1, f"{at}[{i}]") for i, child in enumerate(item))
        elif isinstance(item, str):
            _check_text(item, at or "the string")
        elif isinstance(item, float) and not math.isfinite(item):
            raise JsonError(f"{at or 'the value'} is {item}, not a JSON number")
        elif item is not None and not isinstance(item, (bool, int, float)):
            raise JsonError(f"{at or 'the value'} is a {type(item).__name__}, not a JSON value")


def _check_text(text: str, at: str) -> None:
    """A string must encode as UTF-8: lone surrogates (from ``\\udXXX`` escapes) cannot."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise JsonError(f"{at} holds a lone surrogate U+{code:04X} at character {exc.start}: "
                        f"not valid Unicode text") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (NaN and Infinity are not standard JSON)")


def numbered_lines(path: Path, max_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str | DataError]]:
    """Yield (1-based line number, text) for non-blank, non-comment lines.

    A line that is not valid UTF-8, or longer than ``max_bytes``, is yielded as a DataError so
    that ``skip_bad`` can skip it; a long line is read past in chunks, never held whole.
    """
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(iter(lambda: handle.readline(max_bytes + 1), b""), start=1):
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                _skip_to_line_end(handle, max_bytes)
                yield line_no, DataError(f"line is over the limit of {max_bytes} bytes", path, line_no)
                continue
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte-order mark written by some editors
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                yield line_no, DataError(f"not valid UTF-8 at byte {exc.start}", path, line_no)
                continue
            if text and not text.startswith("#"):
                yield line_no, text


def _skip_to_line_end(handle: IO[bytes], chunk: int) -> None:
    """Read past the rest of the current line without keeping it."""
    while True:
        part = handle.readline(chunk)
        if not part or part.endswith(b"\n"):
            return


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def load_json_object(text: str, path: Path, line: int) -> dict[str, Any]:
    """Parse one line into a JSON object, or raise a DataError saying why not."""
    try:
        row = strict_json_loads(text)
    except JsonError as exc:
        raise DataError(f"invalid JSON: {exc}", path, line) from None
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {json_type(row)}", path, line)
    return row


def required_str(row: dict[str, Any], key: str, path: Path, line: int) -> str:
    """row[key] as a non-empty string, or a DataError naming the field."""
    if key not in row:
        raise DataError(f"missing field {key!r}", path, line)
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"field {key!r} must be a string, got {json_type(value)}", path, line)
    if not value.strip():
        raise DataError(f"field {key!r} is empty", path, line)
    return value


def json_type(value: Any) -> str:
    """How a JSON value's type reads in an error message ('an array', 'null', ...)."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def read_records(path: Path, parse: Callable[[dict[str, Any]], T], what: str) -> list[T]:
    """Every line of a JSONL file parsed into a record; a bad line is a DataError naming file and line."""
    records = []
    for line, text in numbered_lines(path):
        if isinstance(text, DataError):
            raise text
        row = load_json_object(text, path, line)
        try:
            records.append(parse(row))
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"bad {what}: {error!r}", path, line) from error
    return records


def write_records(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line atomically (temp file, then rename); returns how many."""
    path = Path(path)
    written = 0
    with atomic_path(path) as staging, staging.open("w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
    return written
