"""JSONL image-text pair manifests: reading with file:line errors, and writing.

One JSON object per line::

    {"image": "images/s000123.png", "caption": "a dog on the beach", "scene_id": "s000123", "split": "train"}

Rules (see docs/guide/data-format.md):

* ``image`` (required): path relative to the manifest's folder, or absolute.
* ``caption`` (required): a string with at least one non-space character.
* ``split`` (optional, default ``"train"``): one of :data:`SPLITS`.
* ``scene_id`` (optional): a string (an int is accepted and turned into one). Rows with the same
  scene show the same thing and are never used as each other's negatives. Default: the image
  path as written, so several captions of one image file group together.
* Any other keys are kept in ``PairRecord.meta``.
* Blank lines and lines whose first non-space character is ``#`` are ignored; line numbers in
  errors are physical lines of the file (1-based).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from personae.data.jsonl import json_type, load_json_object, numbered_lines, required_str
from personae.errors import DataError
from personae.files import write_text_atomic

__all__ = ["SPLITS", "RESERVED_KEYS", "PairRecord", "PairManifest", "read_pairs", "write_pairs"]

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
RESERVED_KEYS: tuple[str, ...] = ("image", "caption", "scene_id", "split")


@dataclass(frozen=True)
class PairRecord:
    """One image-caption row; ``image`` is resolved against the manifest's folder."""

    image: Path
    caption: str
    scene_id: str
    split: str = "train"
    meta: dict[str, Any] = field(default_factory=dict, hash=False)
    line: int = 0


class PairManifest:
    """The rows of one manifest file, plus the bad rows skipped with ``skip_bad=True``."""

    def __init__(
        self,
        path: str | PathLike[str],
        records: list[PairRecord],
        skipped: list[DataError] | None = None,
    ) -> None:
        self.path = Path(path)
        self.records = records
        self.skipped: list[DataError] = skipped if skipped is not None else []

    @property
    def root(self) -> Path:
        """The folder that relative image paths are resolved against."""
        return self.path.parent

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[PairRecord]:
        return iter(self.records)

    def __getitem__(self, index: int) -> PairRecord:
        return self.records[index]

    def filter(self, split: str) -> PairManifest:
        """A manifest holding only the rows of ``split`` (the skipped list is shared)."""
        _check_split_arg(split)
        return PairManifest(self.path, [r for r in self.records if r.split == split], self.skipped)

    def __repr__(self) -> str:
        return f"PairManifest({str(self.path)!r}, records={len(self)}, skipped={len(self.skipped)})"


def read_pairs(
    path: str | PathLike[str],
    *,
    split: str | None = None,
    skip_bad: bool = False,
    check_images: bool = True,
) -> PairManifest:
    """Read and validate a JSONL pair manifest.

    Every row is validated, whatever ``split`` selects. A bad row raises :class:`DataError`
    (``file:line: what is wrong``); with ``skip_bad=True`` it is left out, kept in
    ``.skipped`` and counted in one logged warning. ``check_images`` checks that each image file
    exists (it does not decode it).
    """
    path = Path(path)
    if split is not None:
        _check_split_arg(split)
    if not path.is_file():
        raise DataError("manifest file not found" if not path.exists() else "not a file", path)
    records: list[PairRecord] = []
    skipped: list[DataError] = []
    rows = 0
    for line_no, text in numbered_lines(path):
        rows += 1
        try:
            record = _parse_row(text, path, line_no, check_images)
        except DataError as err:
            if not skip_bad:
                raise
            skipped.append(err)
            continue
        if split is None or record.split == split:
            records.append(record)
    if skipped:
        logger.warning(
            "%s: skipped %d bad row(s) of %d; first: %s", path, len(skipped), rows, skipped[0]
        )
    return PairManifest(path, records, skipped)


def _check_split_arg(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")


def _parse_row(text: str | DataError, path: Path, line: int, check_images: bool) -> PairRecord:
    """Validate one row and build its record."""
    if isinstance(text, DataError):
        raise text
    row = load_json_object(text, path, line)
    image_text = required_str(row, "image", path, line)
    caption = required_str(row, "caption", path, line)
    split = row.get("split", "train")
    if split not in SPLITS:
        shown = split if isinstance(split, str) else json_type(split)
        raise DataError(
            f"field 'split' must be one of {', '.join(map(repr, SPLITS))}, got {shown!r}",
            path,
            line,
        )
    scene_id = _scene_id(row, image_text, path, line)
    image = Path(image_text)
    if not image.is_absolute():
        image = path.parent / image
    if check_images and not image.is_file():
        raise DataError(f"image file not found: {image_text} (looked for {image})", path, line)
    meta = {k: v for k, v in row.items() if k not in RESERVED_KEYS}
    return PairRecord(image, caption, scene_id, split, meta, line)


def _scene_id(row: dict[str, Any], image_text: str, path: Path, line: int) -> str:
    if "scene_id" not in row:
        return Path(image_text).as_posix()
    value = row["scene_id"]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        shown = "an empty string" if isinstance(value, str) else json_type(value)
        raise DataError(f"field 'scene_id' must be a non-empty string, got {shown}", path, line)
    return value


def write_pairs(path: str | PathLike[str], records: Iterable[PairRecord]) -> Path:
    """Write records as a JSONL manifest (atomically); returns the path written.

    Image paths under the manifest's folder are written relative to it (POSIX separators),
    others as absolute paths. ``meta`` keys are written after the reserved ones.
    """
    path = Path(path)
    root = Path(os.path.abspath(path.parent))
    lines = [json.dumps(_row(record, root), ensure_ascii=False) for record in records]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return path


def _row(record: PairRecord, root: Path) -> dict[str, Any]:
    clash = sorted(set(record.meta) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"record meta uses reserved key(s) {clash} (line {record.line})")
    if record.split not in SPLITS:
        raise ValueError(f"record split must be one of {SPLITS}, got {record.split!r}")
    image = Path(os.path.abspath(record.image))  # lexical: drops '..' and '.'
    try:
        image_text = image.relative_to(root).as_posix()
    except ValueError:
        image_text = str(image)
    row: dict[str, Any] = {"image": image_text, "caption": record.caption}
    row["scene_id"] = record.scene_id
    row["split"] = record.split
    row.update(record.meta)
    return row
