"""Tests for the role-play dialogues: pools per split, true targets, files and determinism."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from personae.world import build_world, load_scenes
from personae.world.build import assign_splits, scene_id_for
from personae.world.characters import CHARACTERS, characters_in
from personae.world.dialogues import (
    EXAMPLE_TYPES,
    QUESTION_TYPES,
    Dialogue,
    generate_dialogues,
    heldout_examples,
    load_dialogues,
    make_turn,
)
from personae.world.scene import Placed, Scene, sample_scene

N_SCENES = 60
HELDOUT = characters_in("heldout")


def make_scenes(n: int, seed: int = 0) -> list[Scene]:
    """Scenes as build_world draws them, without images."""
    splits = assign_splits(n, (0.9, 0.05, 0.05), seed)
    scenes = []
    for index in range(n):
        scene = sample_scene(scene_id_for(index, n), np.random.default_rng([seed, index]))
        scene.split, scene.image = splits[index], f"images/{scene.scene_id}.png"
        scenes.append(scene)
    return scenes


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small worlds: seed 0 twice (determinism) and seed 1."""
    root = tmp_path_factory.mktemp("talk")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        build_world(root / name, seed=seed, scenes=N_SCENES, image_size=24, progress=False)
    return {name: root / name for name in "abc"}


@pytest.fixture(scope="module")
def many() -> tuple[list[Scene], list[Dialogue]]:
    """1,000 in-memory scenes and their dialogues, for statistics."""
    scenes = make_scenes(1000)
    return scenes, list(generate_dialogues(scenes, seed=0))


def test_build_writes_dialogues_cards_and_examples(worlds: dict[str, Path]) -> None:
    root = worlds["a"]
    assert {p.name for p in root.iterdir()} >= {"characters", "characters.jsonl",
                                                 "dialogues.jsonl"}
    world = json.loads((root / "world.json").read_text())
    assert world["files"]["dialogues"] == "dialogues.jsonl"
    dialogues = load_dialogues(root)
    assert world["dialogues"]["dialogues"] == len(dialogues)
    assert world["dialogues"]["turns"] == sum(len(d.turns) for d in dialogues)
    for dialogue in dialogues:
        assert (root / dialogue.image).is_file() and 1 <= len(dialogue.turns) <= 4
    for character in HELDOUT:
        rows = load_dialogues(root / "characters" / f"{character.id}.examples.jsonl")
        assert len(rows) == 10 and [r.turns[0].type for r in rows] == list(EXAMPLE_TYPES)
        for row in rows:
            assert row.split == "train" and len(row.turns) == 1
            assert (root / "characters" / row.image).is_file()  # relative to characters/
    assert not (root / "characters" / "gizmotron.examples.jsonl").exists()


def test_every_scene_gets_conversations_from_the_right_pool(worlds: dict[str, Path]) -> None:
    scenes = {s.scene_id: s for s in load_scenes(worlds["a"])}
    dialogues = load_dialogues(worlds["a"])
    by_scene: dict[str, list[Dialogue]] = {}
    for dialogue in dialogues:
        by_scene.setdefault(dialogue.scene_id, []).append(dialogue)
        assert dialogue.split == scenes[dialogue.scene_id].split
        assert dialogue.character_split == CHARACTERS[dialogue.character].split
    assert set(by_scene) == set(scenes)
    for scene_id, talks in by_scene.items():
        pools = [d.character_split for d in talks]
        expected = ["train"] if scenes[scene_id].split == "train" else ["train", "heldout"]
        assert pools == expected, scene_id
    assert [d.id for d in by_scene["s000000"]][0] == "s000000-c0"


def test_heldout_markers_never_appear_in_training_dialogues(worlds: dict[str, Path]) -> None:
    markers = [m.lower() for c in HELDOUT for m in (*c.style.markers(), c.name)]
    text = "\n".join(
        f"{t.user}\n{t.reply}" for d in load_dialogues(worlds["a"])
        if d.split == "train" or d.character_split == "train" for t in d.turns).lower()
    assert text and not [m for m in markers if m in text]
    heldout_text = "\n".join(t.reply for d in load_dialogues(worlds["a"], character_split="heldout")
                             for t in d.turns).lower()
    assert any(m in heldout_text for m in markers)  # they do occur where they should


def test_targets_are_true_of_the_scene(many: tuple[list[Scene], list[Dialogue]]) -> None:
    scenes, dialogues = many
    by_id = {s.scene_id: s for s in scenes}
    for dialogue in dialogues:
        scene = by_id[dialogue.scene_id]
        for turn in dialogue.turns:
            target = turn.target
            placed = scene.get(target.get("object", ""))
            if turn.type == "count":
                assert target["count"] == (placed.count if placed else 0)
            elif turn.type == "exists":
                assert target["exists"] == (placed is not None)
            elif turn.type == "where":
                assert placed is not None and placed.cells == [tuple(target["cell"])]
            elif turn.type == "describe":
                assert target["objects"] == {p.name: p.count for p in scene.objects}
            elif turn.type == "who":
                assert target == CHARACTERS[dialogue.character].facts()


def test_question_mix_is_balanced(many: tuple[list[Scene], list[Dialogue]]) -> None:
    _, dialogues = many
    turns = [t for d in dialogues for t in d.turns]
    types = Counter(t.type for t in turns)
    assert set(types) == set(QUESTION_TYPES) and min(types.values()) > 0.07 * len(turns)
    exists = [t.target["exists"] for t in turns if t.type == "exists"]
    assert 0.4 < sum(exists) / len(exists) < 0.6
    counts = Counter(t.target["count"] for t in turns if t.type == "count")
    assert {0, 1, 2, 3} <= set(counts) and 0.15 < counts[0] / sum(counts.values()) < 0.4
    moods = Counter(t.target["mood"] for t in turns if t.type == "feel")
    assert set(moods) == {"joy", "dislike", "mixed", "neutral"}
    phrasings = {t.user for t in turns if t.type in ("describe", "feel", "who")}
    assert len(phrasings) >= 12
    assert Counter(len(d.turns) for d in dialogues).keys() == {1, 2, 3, 4}
    for dialogue in dialogues:  # describe, feel and who at most once per conversation
        asked = Counter(t.type for t in dialogue.turns)
        assert all(asked[t] <= 1 for t in ("describe", "feel", "who"))


def test_generation_is_deterministic(worlds: dict[str, Path]) -> None:
    a, b, c = worlds["a"], worlds["b"], worlds["c"]
    for name in ("dialogues.jsonl", "characters.jsonl", "characters/tumblewick.json",
                 "characters/tumblewick.examples.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "dialogues.jsonl").read_bytes() != (c / "dialogues.jsonl").read_bytes()
    scenes = make_scenes(30)
    first = [d.to_dict() for d in generate_dialogues(scenes, seed=3)]
    assert first == [d.to_dict() for d in generate_dialogues(scenes, seed=3)]


def test_conversation_counts_per_scene_are_parameters() -> None:
    scenes = make_scenes(100)
    evals = sum(s.split != "train" for s in scenes)
    dialogues = list(generate_dialogues(scenes, per_train_scene=2, per_eval_scene=4))
    assert len(dialogues) == 2 * (100 - evals) + 4 * evals
    with pytest.raises(ValueError, match=">= 0"):
        list(generate_dialogues(scenes, per_train_scene=-1))
    scenes[0].split = None
    with pytest.raises(ValueError, match="split"):
        list(generate_dialogues(scenes))


def test_make_turn_and_examples_errors() -> None:
    scene = Scene("s1", "beach", [Placed("dog", "animals", 2, [(0, 0), (2, 2)])], split="train",
                  image="images/s1.png")
    character = CHARACTERS["captain-saltbeard"]
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="question type"):
        make_turn(character, scene, "sing", rng, first=True, last=True)
    with pytest.raises(ValueError, match="exactly once"):
        make_turn(character, scene, "where", rng, first=True, last=True, name="dog")
    turn = make_turn(character, scene, "exists", rng, first=True, last=True, name="cat")
    assert turn.target == {"object": "cat", "exists": False} and "No" in turn.reply
    with pytest.raises(ValueError, match="train scenes"):
        heldout_examples(HELDOUT[0], [Scene("s2", "beach", scene.objects, split="test")])
    with pytest.raises(ValueError, match="where"):
        heldout_examples(HELDOUT[0], [scene])  # no object is present once


def test_load_dialogues_filters_and_names_bad_lines(worlds: dict[str, Path],
                                                    tmp_path: Path) -> None:
    all_rows = load_dialogues(worlds["a"])
    test_rows = load_dialogues(worlds["a"], split="test", character_split="heldout")
    assert test_rows and all(d.split == "test" and d.character_split == "heldout"
                             for d in test_rows)
    assert len(test_rows) < len(all_rows)
    bad = tmp_path / "dialogues.jsonl"
    lines = (worlds["a"] / "dialogues.jsonl").read_text().splitlines()[:2]
    bad.write_text(lines[0] + "\n" + lines[1].replace('"type": "', '"type": "x') + "\n")
    with pytest.raises(ValueError, match=r"dialogues.jsonl:2"):
        load_dialogues(bad)
    with pytest.raises(ValueError, match="split"):
        load_dialogues(worlds["a"], split="dev")
