"""Template captions that are true of a scene graph, and the phrase tables to parse them back."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import numpy as np

from personae.world.catalog import NUMBER_WORDS, OBJECTS
from personae.world.scene import (
    CELL_NAMES,
    COLUMN_NAMES,
    GRID,
    RELATIONS,
    ROW_NAMES,
    Cell,
    Placed,
    Scene,
    relation_holds,
)
from personae.world.settings import SETTINGS

# Caption patterns by name; each {slot} is filled by _Slots below. A pattern is used only when
# the scene has what its slots need (a true relation, an object with copies, ...).
CAPTION_TEMPLATES: dict[str, str] = {
    "list": "{objects} {place}",
    "place_first": "{place}: {objects}",
    "there_is": "there {be} {objects} {place}",
    "photo": "{photo} {objects} {place}",
    "view": "{view} with {objects}",
    "photo_view": "{photo} {view} with {objects}",
    "relation": "{place}: {a} {relation} {b}",
    "relation_inline": "{a} {relation} {b} {place}",
    "count": "{counted} {place}",
    "count_rest": "{counted} {place}, together with {rest}",
    "position": "{photo} {view} with {positioned}",
    "position_place": "{place}: {positioned}",
}
PHOTO_WORDS = ("a photo of", "a picture of", "an image of", "a drawing of")
ONE_WORD_PROBABILITY = 0.15  # how often a single object is "one dog" rather than "a dog"

# phrase -> relation name understood by scene.relation_holds
RELATION_PHRASES: dict[str, str] = {
    "to the left of": "left of", "left of": "left of",
    "to the right of": "right of", "right of": "right of",
    "above": "above", "over": "above",
    "below": "below", "under": "below", "beneath": "below",
}


def _position_phrases() -> dict[str, frozenset[Cell]]:
    """Every position phrase and the region of cells it names."""
    regions: dict[str, frozenset[Cell]] = {}
    for (row, col), name in CELL_NAMES.items():
        if (row, col) == (1, 1):
            regions["in the centre"] = regions["in the middle"] = frozenset({(1, 1)})
            continue
        regions[f"at the {name}"] = frozenset({(row, col)})
        if row != 1 and col != 1:
            regions[f"in the {name} corner"] = frozenset({(row, col)})
    for row, name in enumerate(ROW_NAMES):
        regions[f"in the {name} row"] = frozenset((row, c) for c in range(GRID))
    for col, name in enumerate(COLUMN_NAMES):
        regions[f"in the {name} column"] = frozenset((r, col) for r in range(GRID))
    return regions


# phrase -> the cells it names; an object is "there" when all its copies lie in the region
POSITION_PHRASES: dict[str, frozenset[Cell]] = _position_phrases()


def caption_templates() -> list[str]:
    """All caption patterns, e.g. '{objects} {place}'."""
    return list(CAPTION_TEMPLATES.values())


def position_phrases_for(placed: Placed) -> list[str]:
    """The tightest true position phrases for an object (one cell, else its row or column)."""
    cells = frozenset(placed.cells)
    fitting = [p for p, region in POSITION_PHRASES.items() if cells <= region]
    if not fitting:
        return []
    tightest = min(len(POSITION_PHRASES[p]) for p in fitting)
    return [p for p in fitting if len(POSITION_PHRASES[p]) == tightest]


def true_relations(scene: Scene) -> list[tuple[Placed, str, Placed]]:
    """Every (a, relation, b) between two different objects of the scene that holds."""
    return [
        (a, relation, b)
        for a in scene.objects for b in scene.objects if a is not b
        for relation in RELATIONS
        if relation_holds(a, b, relation)
    ]


class _Slots(dict):
    """Fills template slots on first use, so the rng is consumed in the pattern's slot order."""

    def __init__(self, scene: Scene, rng: np.random.Generator) -> None:
        super().__init__()
        self.scene, self.rng = scene, rng
        self.setting = SETTINGS[scene.setting]

    def __missing__(self, key: str) -> str:
        value = getattr(self, f"slot_{key}")()
        self[key] = value
        return value

    def pick(self, options: Any) -> Any:
        return options[int(self.rng.integers(len(options)))]

    def counted(self, placed: Placed) -> str:
        one = "one" if self.rng.random() < ONE_WORD_PROBABILITY else None
        return OBJECTS[placed.name].counted(placed.count, one=one)

    def order(self) -> list[Placed]:
        if "_order" not in self.__dict__:
            shuffled = self.rng.permutation(len(self.scene.objects))
            self._order = [self.scene.objects[i] for i in shuffled]
        return self._order

    def slot_objects(self) -> str:
        return join_words([self.counted(p) for p in self.order()])

    def slot_be(self) -> str:
        return "is" if self.order()[0].count == 1 else "are"

    def slot_place(self) -> str:
        return self.pick(self.setting.places)

    def slot_view(self) -> str:
        return self.pick(self.setting.views)

    def slot_photo(self) -> str:
        return self.pick(PHOTO_WORDS)

    def triple(self) -> tuple[Placed, str, Placed]:
        if "_triple" not in self.__dict__:
            self._triple = self.pick(true_relations(self.scene))
        return self._triple

    def slot_a(self) -> str:
        return self.counted(self.triple()[0])

    def slot_relation(self) -> str:
        relation = self.triple()[1]
        return self.pick([p for p, r in RELATION_PHRASES.items() if r == relation])

    def slot_b(self) -> str:
        return self.counted(self.triple()[2])

    def slot_counted(self) -> str:
        return self.counted(max(self.scene.objects, key=lambda p: p.count))

    def slot_rest(self) -> str:
        many = max(self.scene.objects, key=lambda p: p.count)
        return join_words([self.counted(p) for p in self.order() if p is not many])

    def slot_positioned(self) -> str:
        placeable = [p for p in self.order() if position_phrases_for(p)]
        chosen = placeable[: 1 + int(self.rng.integers(min(2, len(placeable))))]
        return join_words([f"{self.counted(p)} {self.pick(position_phrases_for(p))}"
                           for p in chosen])


def join_words(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def applicable_templates(scene: Scene) -> list[str]:
    """Names of the templates whose slots this scene can fill truthfully."""
    has_copies = any(p.count > 1 for p in scene.objects)
    has_relation = bool(true_relations(scene))
    has_position = any(position_phrases_for(p) for p in scene.objects)
    needs = {
        "relation": has_relation, "relation_inline": has_relation,
        "count": has_copies, "count_rest": has_copies and len(scene.objects) > 1,
        "position": has_position, "position_place": has_position,
    }
    return [name for name in CAPTION_TEMPLATES if needs.get(name, True)]


def caption_scene(scene: Scene, rng: np.random.Generator, template: str | None = None) -> str:
    """A lower-case caption, true of the scene, from a template chosen with ``rng`` (or given)."""
    usable = applicable_templates(scene)
    if template is None:
        template = usable[int(rng.integers(len(usable)))]
    elif template not in usable:
        raise ValueError(
            f"template {template!r} does not apply to {scene.scene_id}; usable: {usable}")
    return CAPTION_TEMPLATES[template].format_map(_Slots(scene, rng))


@lru_cache(maxsize=1)
def _mention_pattern() -> re.Pattern[str]:
    forms = sorted({f for o in OBJECTS.values() for f in (o.name, o.plural)}, key=len, reverse=True)
    counts = "|".join(["a", "an", *NUMBER_WORDS])
    names = "|".join(re.escape(f) for f in forms)
    return re.compile(rf"\b(?:({counts})\s+)?({names})\b")


def parse_mentions(text: str) -> dict[str, int | None]:
    """Catalog objects named in ``text`` -> the count before them ('two dogs' -> 2), else None."""
    by_form = {f: o for o in OBJECTS.values() for f in (o.name, o.plural)}
    found: dict[str, int | None] = {}
    for match in _mention_pattern().finditer(text.lower()):
        word, form = match.group(1), match.group(2)
        count = None if word is None else 1 if word in ("a", "an") else NUMBER_WORDS.index(word)
        found[by_form[form].name] = count
    return found


__all__ = [
    "CAPTION_TEMPLATES", "POSITION_PHRASES", "RELATION_PHRASES", "applicable_templates",
    "caption_scene", "caption_templates", "join_words", "parse_mentions",
    "position_phrases_for", "true_relations",
]
