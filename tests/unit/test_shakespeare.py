"""The Shakespeare track: plays parse into speeches, exchanges and a role-play set in the usual formats."""

import json

import pytest

from personae.data.cards import load_card
from personae.data.dialogues import read_dialogues
from personae.data.shakespeare import Speech, build_shakespeare, exchanges, parse_play, play_files


@pytest.fixture(scope="module")
def hamlet():
    path = next(p for p in play_files() if p.stem == "hamlet")
    return parse_play(path)


def test_plays_parse_into_speeches(hamlet):
    assert len(play_files()) == 38
    speakers = {s.speaker for s in hamlet}
    assert {"Hamlet", "Horatio", "Ophelia", "Ghost"} <= speakers
    assert all(s.text and "**" not in s.text and len(s.text) <= 404 for s in hamlet)
    assert sum(s.speaker == "Hamlet" for s in hamlet) > 300


def test_exchanges_stay_inside_a_scene_and_change_speaker(hamlet):
    assert len(exchanges(hamlet)["hamlet-hamlet"]) > 250
    speeches = [Speech("Play", 1, "A", "a1"), Speech("Play", 1, "B", "b1"), Speech("Play", 1, "B", "b2"),
                Speech("Play", 2, "A", "a2"), Speech("Play", 2, "B", "b3")]
    assert dict(exchanges(speeches)) == {"play-b": [("a1", "b1"), ("a2", "b3")]}


def test_build_writes_the_role_play_formats(tmp_path):
    counts = build_shakespeare(tmp_path, min_speeches=150, heldout=3, examples=5)
    assert counts["heldout"] == 3 and counts["characters"] > 3
    records = read_dialogues(tmp_path / "dialogues.jsonl")
    held = {r.character for r in records if r.character_split == "heldout"}
    assert len(held) == 3 and all(r.image is None for r in records)
    for character in held:
        examples = read_dialogues(tmp_path / "characters" / f"{character}.examples.jsonl")
        assert len(examples) == 5
        assert load_card(tmp_path / "characters" / f"{character}.json").extensions["personae"]["split"] == "heldout"
    assert json.loads((tmp_path / "shakespeare.json").read_text()) == counts
