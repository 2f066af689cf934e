"""The scene world as a data kind: its held-out characters, exact metrics and persona swap.

``world.json`` marks a scene-world folder; :class:`SceneWorld` is registered with
:func:`personae.data.kinds.register_data_kind` when ``personae.world`` is imported, so
:func:`personae.data.kinds.open_data` hands it to training and evaluation, which never name the
world's modules.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from personae.data.dialogues import DialogueRecord
from personae.data.kinds import DataKind, register_data_kind
from personae.errors import DataError
from personae.world.build import WORLD_FILE, load_scenes
from personae.world.characters import Character, load_characters
from personae.world.metrics import METRICS, aggregate, score_reply, world_word_kinds
from personae.world.persona_swap import PersonaSwap
from personae.world.scene import Scene

SUMMARY_KEYS = ("scenes", "image_size", "grid", "splits", "dialogues", "seed")  # of world.json, for reports


class SceneScorer:
    """The exact role-play metrics of ``personae.world.metrics``, against a split's scene graphs."""

    metrics = METRICS
    content_kinds = ("object names", "numbers", "yes/no", "positions")

    def __init__(self, scenes: Mapping[str, Scene], characters: Mapping[str, Character]) -> None:
        self.scenes, self.characters = dict(scenes), dict(characters)

    def score(self, record: DialogueRecord, turn: int, reply: str) -> dict[str, float | None]:
        """Every metric for REPLY to turn TURN of RECORD (None where a metric does not apply)."""
        reference = record.turns[turn]
        world_turn = {"user": reference.user, "reply": reference.reply, **reference.meta}
        return score_reply(reply, world_turn, self.scenes[record.scene_id], self.characters[record.character],
                           self.characters)

    def aggregate(self, rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Means overall, per question type and per character split."""
        return aggregate(rows)


@register_data_kind
class SceneWorld(DataKind):
    """A folder written by ``build_world``: scenes, characters with checkable styles, dialogues."""

    name = "scene-world"
    marker = WORLD_FILE
    metrics = METRICS
    content_kinds = ("object names", "numbers", "yes/no", "positions")

    def __init__(self, root: Path | str) -> None:
        super().__init__(root)
        self._scenes: dict[str, Scene] | None = None  # read on first use

    def characters(self, split: str) -> list[str]:
        """Sorted ids of the world's characters of SPLIT (train / heldout), from its cards."""
        return sorted(load_characters(self.root, split=split))

    def reply_scorer(self, split: str) -> SceneScorer:
        """Exact metrics against the scene graphs of SPLIT (train / val / test)."""
        scenes = {scene.scene_id: scene for scene in load_scenes(self.root, split=split)}
        return SceneScorer(scenes, load_characters(self.root))

    def summary(self) -> dict[str, Any]:
        """The sizes and seed recorded in world.json."""
        info = json.loads((self.root / WORLD_FILE).read_text(encoding="utf-8"))
        return {key: info[key] for key in SUMMARY_KEYS if key in info}

    def word_kinds(self) -> dict[str, tuple[str, ...]]:
        """The world's vocabulary by kind: object names, numbers, yes/no, positions, setting, persona words."""
        return world_word_kinds(load_characters(self.root))

    def image_objects(self, record: DialogueRecord) -> list[str]:
        """The object names of RECORD's scene graph (what a caption of its image names)."""
        if self._scenes is None:
            self._scenes = {scene.scene_id: scene for scene in load_scenes(self.root)}
        scene = self._scenes.get(record.scene_id or "")
        if scene is None:
            raise DataError(f"conversation {record.id!r}: scene {record.scene_id!r} is not in the world's scenes",
                            self.root, line=record.line)
        return [placed.name for placed in scene.objects]

    def persona_swap(self, seed: int, setting: str) -> PersonaSwap:
        """Fresh markers for the world's characters, drawn with SEED."""
        return PersonaSwap(load_characters(self.root), seed)


__all__ = ["SceneScorer", "SceneWorld"]
