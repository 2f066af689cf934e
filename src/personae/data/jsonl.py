"""JSONL reading shared by every manifest: numbered lines, one object per line, typed fields."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from personae.errors import DataError
from personae.files import atomic_path

T = TypeVar("T")


def numbered_lines(path: Path) -> Iterator[tuple[int, str | DataError]]:
    """Yield (1-based line number, text) for non-blank, non-comment lines.

    A line that is not valid UTF-8 is yielded as a DataError so that ``skip_bad`` can skip it.
    """
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte-order mark written by some editors
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                yield line_no, DataError(f"not valid UTF-8 at byte {exc.start}", path, line_no)
                continue
            if text and not text.startswith("#"):
                yield line_no, text


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
        row = json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", path, line) from None
    except ValueError as exc:  # duplicate key
        raise DataError(f"invalid row: {exc}", path, line) from None
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
