"""The scene-world object catalog and its glyph atlas, read lazily from the committed asset pack."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
ATLAS_FILE = "emoji_48.png"
OBJECTS_FILE = "objects.json"
GLYPH_PX = 48


@dataclass(frozen=True)
class WorldObject:
    """One catalog object: its names, category, emoji code point and place in the atlas."""

    name: str
    plural: str
    article: str
    category: str
    codepoint: str
    unicode_name: str
    index: int

    def counted(self, count: int, *, one: str | None = None) -> str:
        """The object with its count in words: 'a dog', 'an owl', 'two mice', 'three sheep'."""
        if count == 1:
            return f"{one or self.article} {self.name}"
        return f"{number_word(count)} {self.plural}"


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def number_word(count: int) -> str:
    """'two' for 2; counts in this world never exceed nine (a 3x3 grid)."""
    if not 0 <= count < len(NUMBER_WORDS):
        raise ValueError(f"count must be in 0..9, got {count}")
    return NUMBER_WORDS[count]


class _Catalog(Mapping[str, WorldObject]):
    """A read-only name -> WorldObject mapping that loads objects.json on first use."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._objects: dict[str, WorldObject] | None = None

    def _load(self) -> dict[str, WorldObject]:
        if self._objects is None:
            rows = json.loads(self._path.read_text(encoding="utf-8"))
            objects = [WorldObject(**row) for row in rows]
            self._objects = {obj.name: obj for obj in sorted(objects, key=lambda o: o.index)}
        return self._objects

    def __getitem__(self, name: str) -> WorldObject:
        objects = self._load()
        if name not in objects:
            raise KeyError(f"unknown world object {name!r}")
        return objects[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __repr__(self) -> str:
        return f"<scene-world catalog: {self._path}>"


OBJECTS: Mapping[str, WorldObject] = _Catalog(ASSETS_DIR / OBJECTS_FILE)


def categories() -> list[str]:
    """The object categories, in catalog order."""
    return list(dict.fromkeys(obj.category for obj in OBJECTS.values()))


@lru_cache(maxsize=1)
def load_atlas() -> np.ndarray:
    """All glyphs as one (N, 48, 48, 4) uint8 RGBA array, indexed by WorldObject.index."""
    with Image.open(ASSETS_DIR / ATLAS_FILE) as image:
        atlas = np.asarray(image.convert("RGBA"))
    columns = atlas.shape[1] // GLYPH_PX
    glyphs = [
        atlas[r * GLYPH_PX:(r + 1) * GLYPH_PX, c * GLYPH_PX:(c + 1) * GLYPH_PX]
        for r, c in (divmod(i, columns) for i in range(len(OBJECTS)))
    ]
    return np.stack(glyphs)


@lru_cache(maxsize=8)
def glyphs_at(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every glyph resized to size x size: premultiplied RGB (N, s, s, 3), alpha (N, s, s, 1).

    Both float32 in [0, 1]; premultiplied so that compositing is one multiply-add.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    resized = [
        np.asarray(Image.fromarray(glyph).resize((size, size), Image.Resampling.LANCZOS))
        for glyph in load_atlas()
    ]
    rgba = np.stack(resized).astype(np.float32) / 255.0  # (N, s, s, 4)
    alpha = rgba[..., 3:]
    return rgba[..., :3] * alpha, alpha
