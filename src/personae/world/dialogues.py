"""Role-play conversations about scenes: questions, true in-character replies, and their files.

Each conversation is 1-4 turns about one scene with one character. A user turn asks one of
``QUESTION_TYPES`` (several phrasings each); the reply states the exact answer from the scene graph
in the character's voice (see ``styles.py``), and the turn keeps a ``target`` with the answer so
that ``personae.world.metrics`` can score any reply without a judge.

Character pools: train scenes get train characters only; val/test scenes get conversations with
both train (seen) and held-out characters, alternating, so evaluation covers both on unseen scenes.
Held-out characters also get ``characters/<id>.examples.jsonl``: k one-turn exchanges on TRAIN
scenes, the examples a user would give to adapt a model to a new character.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from personae.data.jsonl import read_records, write_records
from personae.world.catalog import OBJECTS
from personae.world.characters import CHARACTER_SPLITS, CHARACTERS_DIR, Character, characters_in
from personae.world.scene import Scene
from personae.world.styles import (
    compose_reply,
    count_content,
    describe_content,
    exists_content,
    expected_mood,
    feel_content,
    where_content,
    who_content,
)

QUESTION_TYPES = ("describe", "count", "exists", "where", "feel", "who")
TYPE_WEIGHTS = {"describe": 0.2, "count": 0.2, "exists": 0.2, "where": 0.15, "feel": 0.12,
                "who": 0.13}
SINGLE_USE = frozenset({"describe", "feel", "who"})  # asked at most once per conversation
QUESTIONS: dict[str, tuple[str, ...]] = {
    "describe": ("What do you see?", "Describe this picture.", "What is in this image?",
                 "Tell me what you see here.", "Can you describe the scene?"),
    "count": ("How many {plural} do you see?", "How many {plural} are there?",
              "Count the {plural} for me.", "How many {plural} are in the picture?"),
    "exists": ("Is there {a_name}?", "Do you see any {plural}?", "Can you spot {a_name} here?",
               "Is there {a_name} in the picture?"),
    "where": ("Where is the {name}?", "Where can I find the {name}?",
              "In which part of the picture is the {name}?", "Where's the {name}?"),
    "feel": ("How do you like this place?", "Do you like it here?",
             "How does this scene make you feel?", "What do you think of this place?"),
    "who": ("Who are you?", "Tell me about yourself.", "What's your name?",
            "Introduce yourself, please."),
}
MAX_TURNS = 4
ABSENT_COUNT_PROBABILITY = 0.25  # count questions about an object that is not there
SAME_CATEGORY_NEGATIVE = 0.5  # absent objects drawn from a present object's category
COPIES_FIRST = 0.5  # count questions ask about the object with copies this often, when there is one
FEEL_WEIGHT_NEUTRAL = 0.05  # feel is asked less where neither liked nor disliked things are
SIGN_OFF_PROBABILITY = 0.3  # sign-off on a middle turn that already has another marker
EXAMPLE_TYPES = ("who", "describe", "count", "exists", "where", "feel", "count", "exists",
                 "describe", "where")
DIALOGUES_FILE = "dialogues.jsonl"
SCENE_SPLITS = ("train", "val", "test")


@dataclass
class Turn:
    """One exchange: the user's question, the reference reply, the question type and the answer."""

    user: str
    reply: str
    type: str
    target: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"user": self.user, "reply": self.reply, "type": self.type, "target": self.target}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Turn:
        """Inverse of to_dict; raises ValueError on an unknown question type."""
        if data["type"] not in QUESTION_TYPES:
            raise ValueError(f"turn type must be one of {QUESTION_TYPES}, got {data['type']!r}")
        return cls(str(data["user"]), str(data["reply"]), str(data["type"]),
                   dict(data.get("target") or {}))


@dataclass
class Dialogue:
    """A conversation of 1-4 turns between the user and one character about one scene."""

    id: str
    image: str
    scene_id: str
    character: str
    split: str
    character_split: str
    turns: list[Turn]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (one line of dialogues.jsonl)."""
        return {"id": self.id, "image": self.image, "scene_id": self.scene_id,
                "character": self.character, "split": self.split,
                "character_split": self.character_split,
                "turns": [t.to_dict() for t in self.turns]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Dialogue:
        """Inverse of to_dict; raises KeyError/ValueError on a malformed record."""
        turns = [Turn.from_dict(t) for t in data["turns"]]
        if not 1 <= len(turns) <= MAX_TURNS:
            raise ValueError(f"a dialogue has 1..{MAX_TURNS} turns, got {len(turns)}")
        if data["character_split"] not in CHARACTER_SPLITS:
            raise ValueError(f"character_split must be one of {CHARACTER_SPLITS}")
        return cls(str(data["id"]), str(data["image"]), str(data["scene_id"]),
                   str(data["character"]), str(data["split"]), str(data["character_split"]),
                   turns)


# -- sampling -------------------------------------------------------------------------------------


def _pick(options: Sequence, rng: np.random.Generator):  # noqa: ANN202 - any element type
    return options[int(rng.integers(len(options)))]


@lru_cache(maxsize=1)
def _names_by_category() -> dict[str, tuple[str, ...]]:
    grouped: dict[str, list[str]] = {}
    for obj in OBJECTS.values():
        grouped.setdefault(obj.category, []).append(obj.name)
    return {category: tuple(names) for category, names in grouped.items()}


def absent_object(scene: Scene, rng: np.random.Generator) -> str:
    """An object not in the scene; half the time from the category of one that is."""
    by_category = _names_by_category()
    if rng.random() < SAME_CATEGORY_NEGATIVE:
        pool = by_category[_pick(scene.objects, rng).category]
    else:
        pool = tuple(OBJECTS)
    present = {p.name for p in scene.objects}
    while True:  # every category has far more objects than a scene holds
        name = _pick(pool, rng)
        if name not in present:
            return name


def applicable_types(scene: Scene) -> list[str]:
    """The question types that can be asked about this scene ('where' needs a single object)."""
    has_single = any(p.count == 1 for p in scene.objects)
    return [t for t in QUESTION_TYPES if t != "where" or has_single]


def _choose_object(scene: Scene, qtype: str, rng: np.random.Generator,
                   present: bool | None) -> str | None:
    """The object a count / exists / where question is about (None for other types)."""
    if qtype == "where":
        return _pick([p.name for p in scene.objects if p.count == 1], rng)
    if qtype not in ("count", "exists"):
        return None
    if present is None:
        absent_share = ABSENT_COUNT_PROBABILITY if qtype == "count" else 0.5
        present = rng.random() >= absent_share
    if not present:
        return absent_object(scene, rng)
    copies = [p.name for p in scene.objects if p.count > 1]
    if qtype == "count" and copies and rng.random() < COPIES_FIRST:
        return copies[0]
    return _pick(scene.objects, rng).name


def _question(qtype: str, name: str | None, rng: np.random.Generator) -> str:
    template = _pick(QUESTIONS[qtype], rng)
    if name is None:
        return template
    obj = OBJECTS[name]
    return template.format(name=obj.name, plural=obj.plural, a_name=f"{obj.article} {obj.name}")


def _target(qtype: str, scene: Scene, character: Character, name: str | None) -> dict[str, Any]:
    """The ground-truth answer a turn is scored against."""
    placed = scene.get(name) if name is not None else None
    if qtype == "count":
        return {"object": name, "count": placed.count if placed else 0}
    if qtype == "exists":
        return {"object": name, "exists": placed is not None}
    if qtype == "where":
        return {"object": name, "cell": list(placed.cells[0])}
    if qtype == "describe":
        return {"objects": {p.name: p.count for p in scene.objects}, "setting": scene.setting}
    if qtype == "feel":
        style = character.style
        return {"mood": expected_mood(scene, style.favourite, style.disliked),
                "favourite": style.favourite, "disliked": style.disliked}
    return character.facts()


def make_turn(character: Character, scene: Scene, qtype: str, rng: np.random.Generator, *,
              first: bool, last: bool, name: str | None = None,
              present: bool | None = None) -> Turn:
    """One question about ``scene`` and the character's true reply to it."""
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"question type must be one of {QUESTION_TYPES}, got {qtype!r}")
    if name is None:
        name = _choose_object(scene, qtype, rng, present)
    question = _question(qtype, name, rng)
    content = {
        "describe": lambda: describe_content(character, scene, rng),
        "count": lambda: count_content(character, scene, name, rng),
        "exists": lambda: exists_content(character, scene, name, rng),
        "where": lambda: where_content(character, scene, name, rng),
        "feel": lambda: feel_content(character, scene, rng),
        "who": lambda: who_content(character, rng),
    }[qtype]()
    greeting = _pick(character.style.greetings, rng) if first or qtype == "who" else None
    has_seeing = any(character.style.seeing in text for text, _ in content)
    sign_off = last or not (greeting or has_seeing) or rng.random() < SIGN_OFF_PROBABILITY
    reply = compose_reply(character, content, greeting=greeting, sign_off=sign_off)
    return Turn(question, reply, qtype, _target(qtype, scene, character, name))


def sample_dialogue(dialogue_id: str, scene: Scene, character: Character,
                    rng: np.random.Generator) -> Dialogue:
    """A 1-4 turn conversation; describe, feel and who are asked at most once."""
    n_turns = int(rng.integers(1, MAX_TURNS + 1))
    type_weights = dict(TYPE_WEIGHTS)
    if expected_mood(scene, character.style.favourite, character.style.disliked) == "neutral":
        type_weights["feel"] = FEEL_WEIGHT_NEUTRAL
    asked: set[tuple[str, str | None]] = set()
    turns: list[Turn] = []
    for _ in range(8 * MAX_TURNS):  # bounded: a repeated question is drawn again
        if len(turns) == n_turns:
            break
        types = [t for t in applicable_types(scene) if not (t in SINGLE_USE and (t, None) in asked)]
        weights = np.array([type_weights[t] for t in types])
        qtype = types[int(rng.choice(len(types), p=weights / weights.sum()))]
        name = _choose_object(scene, qtype, rng, None)
        if (qtype, name) in asked:
            continue
        asked.add((qtype, name))
        turns.append(make_turn(character, scene, qtype, rng, first=not turns,
                               last=len(turns) == n_turns - 1, name=name))
    if turns and len(turns) < n_turns:  # ran out of new questions: the last reply signs off
        last = turns[-1]
        turns[-1] = make_turn(character, scene, last.type, rng, first=len(turns) == 1,
                              last=True, name=last.target.get("object"))
    return Dialogue(dialogue_id, scene.image or "", scene.scene_id, character.id,
                    _scene_split(scene), character.split, turns)


def _scene_split(scene: Scene) -> str:
    if scene.split not in SCENE_SPLITS:
        raise ValueError(f"scene {scene.scene_id}: split must be one of {SCENE_SPLITS}, "
                         f"got {scene.split!r}")
    return scene.split


def generate_dialogues(scenes: Sequence[Scene],
                       characters: Mapping[str, Character] | None = None, *, seed: int = 0,
                       per_train_scene: int = 1, per_eval_scene: int = 2) -> Iterator[Dialogue]:
    """Conversations for every scene, deterministic from ``seed``.

    A train scene gets ``per_train_scene`` conversations with train characters; a val/test scene
    gets ``per_eval_scene``, the even-numbered with train characters and the odd-numbered with
    held-out ones (all train characters if there are no held-out ones).
    """
    if per_train_scene < 0 or per_eval_scene < 0:
        raise ValueError("per_train_scene and per_eval_scene must be >= 0")
    train_pool = characters_in("train", characters)
    heldout_pool = characters_in("heldout", characters) or train_pool
    if not train_pool:
        raise ValueError("dialogues need at least one train character")
    for index, scene in enumerate(scenes):
        rng = np.random.default_rng([seed, index, 0xD1A])  # scene i's talk is independent of N
        is_train = _scene_split(scene) == "train"
        for j in range(per_train_scene if is_train else per_eval_scene):
            pool = train_pool if is_train or j % 2 == 0 else heldout_pool
            character = _pick(pool, rng)
            yield sample_dialogue(f"{scene.scene_id}-c{j}", scene, character, rng)


def _example_scene(scenes: Sequence[Scene], qtype: str, rng: np.random.Generator) -> Scene:
    """A random scene on which ``qtype`` can be asked."""
    start = int(rng.integers(len(scenes)))
    for offset in range(len(scenes)):
        scene = scenes[(start + offset) % len(scenes)]
        if qtype in applicable_types(scene):
            return scene
    raise ValueError(f"no train scene allows a {qtype!r} question")


def heldout_examples(character: Character, scenes: Sequence[Scene], *, seed: int = 0,
                     k: int = len(EXAMPLE_TYPES)) -> list[Dialogue]:
    """k one-turn exchanges of ``character`` on TRAIN scenes (the adaptation examples).

    Image paths are relative to the characters/ folder that holds the examples file.
    """
    train_scenes = [s for s in scenes if s.split == "train"]
    if not train_scenes:
        raise ValueError("held-out examples need train scenes; the world has none")
    rng = np.random.default_rng([seed, zlib.crc32(character.id.encode()), 0xE7A])
    examples = []
    for j in range(k):
        qtype = EXAMPLE_TYPES[j % len(EXAMPLE_TYPES)]
        scene = _example_scene(train_scenes, qtype, rng)
        present = (j // len(EXAMPLE_TYPES) + j) % 2 == 1 if qtype in ("count", "exists") else None
        turn = make_turn(character, scene, qtype, rng, first=True, last=True, present=present)
        examples.append(Dialogue(f"{character.id}-ex{j:02d}", f"../{scene.image or ''}",
                                 scene.scene_id, character.id, "train", character.split, [turn]))
    return examples


# -- files ----------------------------------------------------------------------------------------


def examples_path(character_id: str) -> str:
    """Where a held-out character's examples live, relative to the world folder."""
    return f"{CHARACTERS_DIR}/{character_id}.examples.jsonl"


def write_dialogues(out_dir: Path | str, scenes: Sequence[Scene],
                    characters: Mapping[str, Character] | None = None, *, seed: int = 0,
                    per_train_scene: int = 1, per_eval_scene: int = 2,
                    examples: int = len(EXAMPLE_TYPES)) -> dict[str, int]:
    """Write dialogues.jsonl and each held-out character's examples; return counts."""
    out_dir = Path(out_dir)
    (out_dir / CHARACTERS_DIR).mkdir(parents=True, exist_ok=True)
    turns = 0

    def records() -> Iterator[dict[str, Any]]:
        nonlocal turns
        for dialogue in generate_dialogues(scenes, characters, seed=seed,
                                           per_train_scene=per_train_scene,
                                           per_eval_scene=per_eval_scene):
            turns += len(dialogue.turns)
            yield dialogue.to_dict()

    dialogues = write_records(out_dir / DIALOGUES_FILE, records())
    # no train scenes (an all-eval world) means no adaptation examples to draw
    has_train = any(s.split == "train" for s in scenes)
    heldout = characters_in("heldout", characters) if has_train else []
    for character in heldout:
        rows = heldout_examples(character, scenes, seed=seed, k=examples)
        write_records(out_dir / examples_path(character.id), [d.to_dict() for d in rows])
    return {"dialogues": dialogues, "turns": turns, "example_files": len(heldout)}


def load_dialogues(path: Path | str, split: str | None = None,
                   character_split: str | None = None) -> list[Dialogue]:
    """Read dialogues.jsonl (or a world folder holding one; or an examples file), filtered."""
    path = Path(path)
    if path.is_dir():
        path = path / DIALOGUES_FILE
    if split is not None and split not in SCENE_SPLITS:
        raise ValueError(f"split must be one of {SCENE_SPLITS}, got {split!r}")
    if character_split is not None and character_split not in CHARACTER_SPLITS:
        raise ValueError(f"character_split must be one of {CHARACTER_SPLITS}, "
                         f"got {character_split!r}")
    loaded = [d for d in read_records(path, Dialogue.from_dict, "dialogue")
              if (split is None or d.split == split)
              and (character_split is None or d.character_split == character_split)]
    return loaded


__all__ = [
    "DIALOGUES_FILE", "EXAMPLE_TYPES", "MAX_TURNS", "QUESTIONS", "QUESTION_TYPES", "Dialogue",
    "Turn", "absent_object", "applicable_types", "examples_path", "generate_dialogues",
    "heldout_examples", "load_dialogues", "make_turn", "sample_dialogue", "write_dialogues",
]
