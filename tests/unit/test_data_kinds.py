"""Data kinds: open_data recognises a scene world by world.json, a plain folder stays generic, own kinds plug in."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from personae.data.dialogues import read_dialogues
from personae.data.kinds import DATA_KINDS, DataKind, open_data, register_data_kind
from personae.data.marker_swap import swap_record
from personae.errors import DataError
from personae.world import METRICS, SceneWorld, load_characters, load_scenes
from personae.world.metrics import aggregate, score_reply


@pytest.fixture(scope="module")
def plain_folder(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small world's files without world.json: what a user's own role-play folder looks like."""
    folder = tmp_path_factory.mktemp("plain") / "data"
    shutil.copytree(small_world, folder, ignore=shutil.ignore_patterns("world.json"))
    return folder


def test_a_scene_world_opens_as_its_kind(small_world: Path) -> None:
    kind = open_data(small_world)
    assert isinstance(kind, SceneWorld) and DATA_KINDS["scene-world"] is SceneWorld
    assert kind.metrics == METRICS
    summary = kind.summary()
    assert summary["scenes"] == 300 and summary["image_size"] == 32 and summary["seed"] == 0
    assert sum(summary["splits"].values()) == 300 and summary["dialogues"]["characters"] == 40
    assert kind.characters("heldout") == sorted(load_characters(small_world, split="heldout"))
    assert len(kind.characters("train")) == 32 and len(kind.characters("heldout")) == 8
    with pytest.raises(ValueError, match="train"):
        kind.characters("test")


def test_the_scene_scorer_is_the_worlds_exact_metrics(small_world: Path) -> None:
    scorer = open_data(small_world).reply_scorer("test")
    records = read_dialogues(small_world / "dialogues.jsonl", split="test")
    scenes = {s.scene_id: s for s in load_scenes(small_world, split="test")}
    characters = load_characters(small_world)
    rows = []
    for record in records[:12]:
        for index, turn in enumerate(record.turns):
            reply = "Ahoy, matey! I see two dogs." if index % 2 else turn.reply
            expected = score_reply(reply, {"user": turn.user, "reply": turn.reply, **turn.meta},
                                   scenes[record.scene_id], characters[record.character], characters)
            scores = scorer.score(record, index, reply)
            assert scores == expected
            rows.append({"type": turn.meta["type"], "character_split": record.character_split, **scores})
    assert scorer.aggregate(rows) == aggregate(rows) and scorer.aggregate(rows)["overall"]["n"] == len(rows)


def test_the_world_swaps_markers_of_its_own_characters(small_world: Path) -> None:
    swap = open_data(small_world).persona_swap(seed=0, setting="meta.persona_swap")
    record = read_dialogues(small_world / "dialogues.jsonl", split="train", character_split="train")[0]
    mapping = swap.mapping(record.character, 0)
    markers = load_characters(small_world)[record.character].style.markers()
    assert set(mapping) == set(markers) and mapping == swap.mapping(record.character, 0)
    assert swap_record(record, mapping).turns[0].reply != record.turns[0].reply


def test_a_folder_without_world_json_is_a_plain_role_play_folder(plain_folder: Path, small_world: Path) -> None:
    kind = open_data(plain_folder)
    assert type(kind) is DataKind and kind.metrics == () and kind.summary() == {}
    assert kind.reply_scorer("test") is None
    records = read_dialogues(plain_folder / "dialogues.jsonl", character_split="heldout")
    assert kind.characters("heldout") == sorted({r.character for r in records})
    assert set(kind.characters("heldout")) <= set(open_data(small_world).characters("heldout"))
    with pytest.raises(DataError, match=r"finetune.persona_swap needs a scene world.*role-play folder"):
        kind.persona_swap(0, "finetune.persona_swap")


def test_open_data_names_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data folder not found"):
        open_data(tmp_path / "nowhere")


class _Quiz(DataKind):
    """A user's own kind: one exact metric, marked by quiz.json."""

    name = "quiz"
    marker = "quiz.json"
    metrics = ("exact_match",)


def test_an_own_kind_plugs_in_by_its_marker(plain_folder: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DATA_KINDS, "quiz", _Quiz)  # the registry is restored after the test
    folder = tmp_path / "quiz"
    folder.mkdir()
    (folder / "quiz.json").write_text("{}")
    assert register_data_kind(_Quiz) is _Quiz  # registering the same class again is harmless
    assert isinstance(open_data(folder), _Quiz) and type(open_data(plain_folder)) is DataKind
    (folder / "world.json").write_text("{}")
    with pytest.raises(DataError, match=r"several data kinds: .*scene-world \(world.json\).*quiz \(quiz.json\)"):
        open_data(folder)


def test_a_kind_needs_a_marker_and_its_own_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DATA_KINDS, "quiz", _Quiz)

    class Unmarked(DataKind):
        name = "unmarked"

    class Impostor(DataKind):
        name, marker = "quiz", "other.json"

    with pytest.raises(ValueError, match="needs a marker file"):
        register_data_kind(Unmarked)
    with pytest.raises(ValueError, match="'quiz' is already registered"):
        register_data_kind(Impostor)


SOURCE = Path(__file__).resolve().parents[2] / "src" / "personae"


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement of a source file."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, id(node) in top_level))
    return found


def test_generic_code_reaches_the_world_only_through_its_package() -> None:
    """Outside personae.world, nothing names a world module; data/ (upstream of the world) not even the package."""
    for path in sorted(SOURCE.rglob("*.py")):
        package = path.relative_to(SOURCE).parts[0]
        if package == "world":
            continue
        for module, _ in _imports(path):
            assert not module.startswith("personae.world."), (path, module)
            assert not (package == "data" and module.startswith("personae.world")), (path, module)


def test_world_modules_import_at_the_top_only() -> None:
    """No deferred (or TYPE_CHECKING-only) import in the world, so none can hide a cycle."""
    for path in sorted((SOURCE / "world").glob("*.py")):
        late = [module for module, top in _imports(path) if not top]
        assert late == [], (path, late)
