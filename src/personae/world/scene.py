"""Scene graphs (a setting plus objects on a 3x3 grid): sampling, validation and rendering."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from personae.world.catalog import OBJECTS, glyphs_at
from personae.world.settings import SETTINGS

GRID = 3
ROW_NAMES = ("top", "middle", "bottom")
COLUMN_NAMES = ("left", "centre", "right")
CELL_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top centre", (0, 2): "top right",
    (1, 0): "middle left", (1, 1): "centre", (1, 2): "middle right",
    (2, 0): "bottom left", (2, 1): "bottom centre", (2, 2): "bottom right",
}
MAX_OBJECTS = 4
MAX_COPIES = 3
COUNTING_PROBABILITY = 0.4  # share of scenes where one object appears 2 or 3 times
MIN_IMAGE_SIZE = 24
BACKGROUND_VARIANTS = 8  # pre-drawn backgrounds per setting and build

Cell = tuple[int, int]
RELATIONS = ("left of", "right of", "above", "below")


@dataclass
class Placed:
    """One object of a scene: its name, category, how many copies, and the cell of each copy."""

    name: str
    category: str
    count: int
    cells: list[Cell]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form; cells become [row, col] lists."""
        return {"name": self.name, "category": self.category, "count": self.count,
                "cells": [[r, c] for r, c in self.cells]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Placed:
        """Inverse of to_dict."""
        cells = [(int(r), int(c)) for r, c in data["cells"]]
        return cls(str(data["name"]), str(data["category"]), int(data["count"]), cells)


@dataclass
class Scene:
    """A scene graph: a setting and 1-4 distinct objects, at most one of them with 2-3 copies."""

    scene_id: str
    setting: str
    objects: list[Placed]
    split: str | None = None  # set by the builder: train / val / test
    image: str | None = None  # image path relative to the manifest folder
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown keys, kept

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError unless the scene obeys the world's rules."""
        where = f"scene {self.scene_id!r}"
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"{where}: needs 1..{MAX_OBJECTS} objects, has {len(self.objects)}")
        if len({p.name for p in self.objects}) != len(self.objects):
            raise ValueError(f"{where}: object names repeat")
        if sum(p.count > 1 for p in self.objects) > 1:
            raise ValueError(f"{where}: only one object may have copies")
        cells = [cell for p in self.objects for cell in p.cells]
        if len(set(cells)) != len(cells):
            raise ValueError(f"{where}: two copies share a cell")
        for p in self.objects:
            if not 1 <= p.count <= MAX_COPIES or p.count != len(p.cells):
                raise ValueError(f"{where}: {p.name} has count {p.count} and {len(p.cells)} cells")
            if any(not (0 <= r < GRID and 0 <= c < GRID) for r, c in p.cells):
                raise ValueError(f"{where}: {p.name} has a cell outside the 3x3 grid")

    def get(self, name: str) -> Placed | None:
        """The placed object called ``name``, or None."""
        return next((p for p in self.objects if p.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (split and image only when set)."""
        data: dict[str, Any] = {"scene_id": self.scene_id, "setting": self.setting,
                                "objects": [p.to_dict() for p in self.objects]}
        if self.split is not None:
            data["split"] = self.split
        if self.image is not None:
            data["image"] = self.image
        return {**data, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        """Inverse of to_dict; raises KeyError/ValueError on a malformed record."""
        known = {"scene_id", "setting", "objects", "split", "image"}
        return cls(
            scene_id=str(data["scene_id"]), setting=str(data["setting"]),
            objects=[Placed.from_dict(p) for p in data["objects"]],
            split=data.get("split"), image=data.get("image"),
            extra={k: v for k, v in data.items() if k not in known},
        )


def relation_holds(a: Placed, b: Placed, relation: str) -> bool:
    """Whether every copy of ``a`` is 'left of' / 'right of' / 'above' / 'below' all of ``b``."""
    rows_a, cols_a = [r for r, _ in a.cells], [c for _, c in a.cells]
    rows_b, cols_b = [r for r, _ in b.cells], [c for _, c in b.cells]
    if relation == "left of":
        return max(cols_a) < min(cols_b)
    if relation == "right of":
        return min(cols_a) > max(cols_b)
    if relation == "above":
        return max(rows_a) < min(rows_b)
    if relation == "below":
        return min(rows_a) > max(rows_b)
    raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")


def sample_scene(scene_id: str, rng: np.random.Generator, *,
                 object_names: Sequence[str] | None = None,
                 setting_names: Sequence[str] | None = None) -> Scene:
    """Draw a random scene: a setting and 1-4 distinct objects (maybe 2-3 copies of one)."""
    object_names = list(object_names if object_names is not None else OBJECTS)
    setting_names = list(setting_names if setting_names is not None else SETTINGS)
    setting = setting_names[int(rng.integers(len(setting_names)))]
    k = int(rng.integers(1, MAX_OBJECTS + 1))
    picked = rng.choice(len(object_names), size=k, replace=False)
    counts = [1] * k
    if rng.random() < COUNTING_PROBABILITY:
        counts[int(rng.integers(k))] = int(rng.integers(2, MAX_COPIES + 1))
    free = [divmod(int(i), GRID) for i in rng.permutation(GRID * GRID)]
    placed = []
    for index, count in zip(picked, counts):
        name = object_names[int(index)]
        cells, free = sorted(free[:count]), free[count:]
        placed.append(Placed(name, OBJECTS[name].category, count, cells))
    return Scene(scene_id, setting, placed)


class SceneRenderer:
    """Renders scenes at one image size: backgrounds pre-drawn and glyphs pre-scaled once."""

    def __init__(self, image_size: int = 64, *, seed: int = 0,
                 variants: int = BACKGROUND_VARIANTS) -> None:
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
        self.image_size = image_size
        self.cell_size = image_size // GRID
        self.margin = (image_size - GRID * self.cell_size) // 2  # centres the grid if S % 3 != 0
        self.glyph_size = self.cell_size - 2 * max(1, self.cell_size // 12)
        self.glyph_rgb, self.glyph_alpha = glyphs_at(self.glyph_size)  # (N, g, g, 3), (N, g, g, 1)
        self.glyph_rgb = self.glyph_rgb * 255.0
        # one generator per (setting, variant): variant v looks the same however many are drawn
        self.backgrounds = {
            name: np.stack([
                setting.render(image_size, np.random.default_rng([seed, image_size, i, v]))
                for v in range(variants)
            ])
            for i, (name, setting) in enumerate(SETTINGS.items())
        }  # setting -> (V, S, S, 3) uint8

    def cell_box(self, cell: Cell) -> tuple[int, int, int, int]:
        """The glyph's pixel box (top, left, bottom, right) for a grid cell."""
        pad = (self.cell_size - self.glyph_size) // 2
        top = self.margin + cell[0] * self.cell_size + pad
        left = self.margin + cell[1] * self.cell_size + pad
        return top, left, top + self.glyph_size, left + self.glyph_size

    def render(self, scene: Scene, variant: int = 0) -> np.ndarray:
        """The scene as an (S, S, 3) uint8 image on background ``variant`` of its setting."""
        backgrounds = self.backgrounds[scene.setting]
        image = backgrounds[variant % len(backgrounds)].astype(np.float32)
        for placed in scene.objects:
            index = OBJECTS[placed.name].index
            rgb, alpha = self.glyph_rgb[index], self.glyph_alpha[index]
            for cell in placed.cells:
                top, left, bottom, right = self.cell_box(cell)
                region = image[top:bottom, left:right]
                # Porter-Duff "over" with premultiplied glyph colour
                image[top:bottom, left:right] = rgb + region * (1.0 - alpha)
        return (image + 0.5).astype(np.uint8)


def render_scene(scene: Scene, image_size: int = 64, *, seed: int = 0,
                 variant: int = 0) -> np.ndarray:
    """Render one scene (convenience; build a SceneRenderer to render many)."""
    return SceneRenderer(image_size, seed=seed, variants=max(1, variant + 1)).render(scene, variant)
