"""Tests for the built-in scene world: catalog, settings, scene graphs, captions and the builder."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from personae.world import (
    CAPTION_TEMPLATES,
    OBJECTS,
    POSITION_PHRASES,
    RELATION_PHRASES,
    SETTINGS,
    SPLITS,
    Placed,
    Scene,
    SceneRenderer,
    build_world,
    caption_scene,
    caption_templates,
    categories,
    load_scenes,
    parse_mentions,
    relation_holds,
    sample_scene,
)
from personae.world.captions import applicable_templates
from personae.world.catalog import ASSETS_DIR, load_atlas
from personae.world.scene import BACKGROUND_VARIANTS

SIZE = 48
N_SCENES = 50
REQUIRED_CATEGORIES = {"animals", "food", "plants", "vehicles", "buildings", "weather and sky",
                       "tools and objects", "sports and toys"}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three small worlds: seed 0 twice (for determinism) and seed 1."""
    root = tmp_path_factory.mktemp("world")
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        build_world(root / name, seed=seed, scenes=N_SCENES, image_size=SIZE, progress=False)
        out[name] = root / name
    return out


def render_script():
    """tools/render_assets.py, the asset render script (a developer tool, not part of the package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / "render_assets.py"
    spec = importlib.util.spec_from_file_location("render_assets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- catalog --------------------------------------------------------------------------------------


def test_catalog_has_enough_objects_in_enough_categories() -> None:
    assert len(OBJECTS) >= 120
    cats = categories()
    assert REQUIRED_CATEGORIES <= set(cats) and len(cats) >= 8
    for category in cats:
        assert sum(o.category == category for o in OBJECTS.values()) >= 12, category
    assert sorted(o.index for o in OBJECTS.values()) == list(range(len(OBJECTS)))


def test_names_and_plurals_are_unique_and_unambiguous() -> None:
    objects = list(OBJECTS.values())
    forms = {o.name: {o.name, o.plural} for o in objects}
    assert len({o.name for o in objects}) == len(objects)
    assert len({o.plural for o in objects}) == len(objects)
    reserved = {"a", "an", "one", "two", "three", "and", "with", "left", "right", "top",
                "bottom", "middle", "centre", "row", "column", "above", "below", "under", "over"}
    function_words = {"a", "an", "the", "of", "at", "in", "on", "by", "among"}
    reserved |= {w for s in SETTINGS.values() for phrase in s.places + s.views
                 for w in phrase.split()} - function_words
    for obj in objects:
        assert not set(obj.name.split()) & reserved, obj.name
        for other in objects:
            if other is obj:
                continue
            for mine in forms[obj.name]:
                for theirs in forms[other.name]:
                    # no form of one object is a whole-word part of a form of another
                    assert not re.search(rf"\b{re.escape(mine)}\b", theirs), (mine, theirs)


def test_plurals_and_articles_are_correct_english() -> None:
    expected = {"mouse": "mice", "sheep": "sheep", "bus": "buses", "strawberry": "strawberries",
                "fish": "fish", "peach": "peaches", "loaf of bread": "loaves of bread",
                "pair of scissors": "pairs of scissors", "cactus": "cacti", "dog": "dogs"}
    for name, plural in expected.items():
        assert OBJECTS[name].plural == plural
    assert OBJECTS["owl"].counted(1) == "an owl"
    assert OBJECTS["hourglass"].counted(1) == "an hourglass"
    assert OBJECTS["yo-yo"].counted(1) == "a yo-yo" and OBJECTS["mouse"].counted(3) == "three mice"


def test_catalog_records_codepoints_and_unicode_names() -> None:
    for obj in OBJECTS.values():
        assert re.fullmatch(r"U\+[0-9A-F]{4,5}", obj.codepoint), obj
        char = chr(int(obj.codepoint[2:], 16))
        if unicodedata.name(char, None):  # this Python may know an older Unicode
            assert unicodedata.name(char) == obj.unicode_name
    assert OBJECTS["dog"].codepoint == "U+1F415"


def test_objects_json_matches_the_render_script_table() -> None:
    catalog_entries = render_script().catalog_entries  # no font needed for the table

    on_disk = json.loads((ASSETS_DIR / "objects.json").read_text(encoding="utf-8"))
    assert on_disk == catalog_entries()


def test_atlas_is_small_and_every_glyph_is_visible() -> None:
    assert (ASSETS_DIR / "emoji_48.png").stat().st_size < 500_000
    assert (ASSETS_DIR / "LICENSE-emoji.txt").is_file()
    atlas = load_atlas()
    assert atlas.shape == (len(OBJECTS), 48, 48, 4) and atlas.dtype == np.uint8
    visible = (atlas[..., 3] > 128).reshape(len(OBJECTS), -1).sum(axis=1)
    assert visible.min() > 200  # every glyph covers a good part of its cell


# -- settings -------------------------------------------------------------------------------------


def test_settings_render_any_size_deterministically() -> None:
    assert len(SETTINGS) >= 8
    required = {"beach", "forest", "night", "snow", "city", "desert", "meadow", "kitchen"}
    assert required <= set(SETTINGS)
    for setting in SETTINGS.values():
        for size in (24, 47, 64):
            image = setting.render(size, np.random.default_rng(3))
            assert image.shape == (size, size, 3) and image.dtype == np.uint8
        again = setting.render(64, np.random.default_rng(3))
        assert np.array_equal(again, setting.render(64, np.random.default_rng(3)))


def test_settings_have_distinct_colour_layouts() -> None:
    layouts = {}
    for name, setting in SETTINGS.items():
        image = setting.render(64, np.random.default_rng(0)).astype(np.float32)
        layouts[name] = image.reshape(4, 16, 4, 16, 3).mean(axis=(1, 3))  # 4x4 mean colours
    names = list(layouts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            distance = np.abs(layouts[a] - layouts[b]).mean()
            assert distance > 20, (a, b, distance)


# -- scene graphs ---------------------------------------------------------------------------------


def check_scene_rules(scene: Scene) -> None:
    assert 1 <= len(scene.objects) <= 4
    assert scene.setting in SETTINGS
    cells = [cell for p in scene.objects for cell in p.cells]
    assert len(cells) == len(set(cells))
    assert all(0 <= r < 3 and 0 <= c < 3 for r, c in cells)
    assert sum(p.count > 1 for p in scene.objects) <= 1
    for placed in scene.objects:
        assert 1 <= placed.count <= 3 and placed.count == len(placed.cells)
        assert OBJECTS[placed.name].category == placed.category


def test_sampled_scenes_obey_the_rules_and_cover_counts() -> None:
    rng = np.random.default_rng(0)
    scenes = [sample_scene(f"s{i}", rng) for i in range(400)]
    for scene in scenes:
        check_scene_rules(scene)
    assert {len(s.objects) for s in scenes} == {1, 2, 3, 4}
    assert {p.count for s in scenes for p in s.objects} == {1, 2, 3}


def test_scene_round_trips_and_rejects_bad_graphs() -> None:
    scene = sample_scene("s1", np.random.default_rng(5))
    scene.split, scene.image = "train", "images/s1.png"
    data = json.loads(json.dumps(scene.to_dict()))
    assert Scene.from_dict(data) == scene
    dog, cat = ("dog", "animals"), ("cat", "animals")
    bad = [
        [],  # no objects
        [Placed(*dog, 1, [(0, 0)]), Placed(*cat, 1, [(0, 0)])],  # shared cell
        [Placed(*dog, 4, [(0, 0), (0, 1), (0, 2), (1, 0)])],  # too many copies
        [Placed(*dog, 2, [(0, 0)])],  # count disagrees with cells
        [Placed(*dog, 1, [(3, 0)])],  # off the grid
        [Placed(*dog, 2, [(0, 0), (0, 1)]), Placed(*cat, 2, [(1, 0), (1, 1)])],  # two with copies
    ]
    for objects in bad:
        with pytest.raises(ValueError, match="scene 'x'"):
            Scene("x", "beach", objects)


def test_relations_compare_every_copy() -> None:
    dogs = Placed("dog", "animals", 2, [(0, 0), (2, 1)])
    cat = Placed("cat", "animals", 1, [(1, 2)])
    assert relation_holds(dogs, cat, "left of") and relation_holds(cat, dogs, "right of")
    assert not relation_holds(dogs, cat, "above") and not relation_holds(cat, dogs, "below")


# -- rendering ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [SIZE, 50])  # 50: not a multiple of 3, the grid is centred
def test_glyphs_are_visible_in_their_cells_and_nowhere_else(size: int) -> None:
    renderer = SceneRenderer(size, seed=0)
    scene = Scene("v", "meadow", [Placed("dog", "animals", 2, [(0, 0), (2, 2)]),
                                  Placed("red apple", "food", 1, [(1, 1)])])
    image = renderer.render(scene, variant=0).astype(np.int16)
    background = renderer.backgrounds["meadow"][0].astype(np.int16)
    assert image.shape == (size, size, 3)
    touched = np.zeros((size, size), bool)
    for cell in [(0, 0), (2, 2), (1, 1)]:
        top, left, bottom, right = renderer.cell_box(cell)
        diff = np.abs(image[top:bottom, left:right] - background[top:bottom, left:right]).sum(-1)
        assert (diff > 30).mean() > 0.3, cell  # a third of the cell is visibly glyph
        touched[top:bottom, left:right] = True
    assert np.array_equal(image[~touched], background[~touched])


# -- captions -------------------------------------------------------------------------------------

_FORMS = "|".join(sorted((re.escape(f) for o in OBJECTS.values() for f in (o.name, o.plural)),
                         key=len, reverse=True))
_COUNTED = rf"(?:a|an|one|two|three) (?:{_FORMS})"


def alternatives(phrases: object) -> str:
    """A regex alternation, longest phrase first so 'to the left of' wins over 'left of'."""
    return "|".join(sorted(map(re.escape, phrases), key=len, reverse=True))


RELATION_RE = re.compile(rf"\b({_COUNTED}) ({alternatives(RELATION_PHRASES)}) ({_COUNTED})\b")
POSITION_RE = re.compile(rf"\b({_COUNTED}) ({alternatives(POSITION_PHRASES)})\b")


def only(mentions: dict[str, int | None]) -> str:
    assert len(mentions) == 1, mentions
    return next(iter(mentions))


def check_caption(caption: str, scene: Scene) -> None:
    """Fail unless every claim the caption makes is true of the scene graph."""
    assert caption == caption.lower() and caption.strip() == caption
    mentioned = parse_mentions(caption)
    assert mentioned, caption
    for name, count in mentioned.items():
        placed = scene.get(name)
        assert placed is not None and count == placed.count, (caption, scene)
    for setting in SETTINGS.values():
        phrases = setting.places + setting.views
        said = any(re.search(rf"\b{re.escape(p)}\b", caption) for p in phrases)
        assert said == (setting.name == scene.setting), (caption, setting.name)
    for a, phrase, b in RELATION_RE.findall(caption):
        first, second = scene.get(only(parse_mentions(a))), scene.get(only(parse_mentions(b)))
        assert relation_holds(first, second, RELATION_PHRASES[phrase]), caption
    for obj, phrase in POSITION_RE.findall(caption):
        placed = scene.get(only(parse_mentions(obj)))
        assert set(placed.cells) <= POSITION_PHRASES[phrase], (caption, placed.cells)


def test_every_template_gives_true_captions() -> None:
    rng = np.random.default_rng(11)
    used = set()
    for i in range(150):
        scene = sample_scene(f"s{i}", rng)
        for template in applicable_templates(scene):
            check_caption(caption_scene(scene, rng, template=template), scene)
            used.add(template)
    assert used == set(CAPTION_TEMPLATES)
    assert len(caption_templates()) == len(CAPTION_TEMPLATES) >= 8


def test_captions_are_deterministic_and_varied() -> None:
    scene = sample_scene("s0", np.random.default_rng(2))
    first = [caption_scene(scene, np.random.default_rng(k)) for k in range(30)]
    assert first == [caption_scene(scene, np.random.default_rng(k)) for k in range(30)]
    assert len(set(first)) >= 5


def test_inapplicable_template_is_refused() -> None:
    scene = Scene("s", "beach", [Placed("dog", "animals", 1, [(0, 0)])])
    with pytest.raises(ValueError, match="count"):
        caption_scene(scene, np.random.default_rng(0), template="count")


# -- the builder ----------------------------------------------------------------------------------


def test_build_writes_the_documented_files(worlds: dict[str, Path]) -> None:
    root = worlds["a"]
    written = sorted(p.name for p in root.iterdir())
    assert written == ["characters", "characters.jsonl", "dialogues.jsonl", "images", "pairs.jsonl",
                       "scenes.jsonl", "world.json"]
    pairs, scenes = read_jsonl(root / "pairs.jsonl"), read_jsonl(root / "scenes.jsonl")
    assert len(pairs) == len(scenes) == N_SCENES
    assert [p["scene_id"] for p in pairs] == [s["scene_id"] for s in scenes]
    for pair, scene in zip(pairs, scenes):
        assert set(pair) == {"image", "caption", "scene_id", "split"}
        assert pair["image"] == scene["image"] == f"images/{pair['scene_id']}.png"
        assert pair["split"] == scene["split"] in SPLITS
        with Image.open(root / pair["image"]) as image:
            assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    world = json.loads((root / "world.json").read_text())
    assert world["seed"] == 0 and world["scenes"] == N_SCENES and world["image_size"] == SIZE
    assert world["objects"] == list(OBJECTS) and world["settings"] == list(SETTINGS)


def test_build_is_deterministic(worlds: dict[str, Path]) -> None:
    a, b, c = worlds["a"], worlds["b"], worlds["c"]
    for name in ("pairs.jsonl", "scenes.jsonl", "world.json", "images/s000007.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "pairs.jsonl").read_bytes() != (c / "pairs.jsonl").read_bytes()
    assert (a / "images/s000007.png").read_bytes() != (c / "images/s000007.png").read_bytes()


# sha256 over the relative path and bytes of every file but the PNGs of worlds["a"] (seed 0, 50 scenes,
# 48 px). Recorded when card writing moved to data.cards: the same bytes as the world built before,
# except that the cards no longer carry the optional `"character_book": null`. A change here means the
# world's data changed: every figure measured on a world moves with it.
TEXT_FILES_SHA256 = "76ac56231bcfb6a80a757b9dcca0e573c34754a45f809c38584a2248387e21a6"


def test_build_writes_the_recorded_text_files(worlds: dict[str, Path]) -> None:
    root, digest = worlds["a"], hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".png")
    assert len(files) == 5 + 40 + 8  # index files, 40 cards, the held-out characters' example files
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    assert digest.hexdigest() == TEXT_FILES_SHA256


def test_built_scenes_and_captions_are_true(worlds: dict[str, Path]) -> None:
    scenes = {s.scene_id: s for s in load_scenes(worlds["a"])}
    for scene in scenes.values():
        check_scene_rules(scene)
    for pair in read_jsonl(worlds["a"] / "pairs.jsonl"):
        check_caption(pair["caption"], scenes[pair["scene_id"]])


def test_built_image_is_the_rendered_scene_graph(worlds: dict[str, Path]) -> None:
    scene = load_scenes(worlds["a"])[3]
    rng = np.random.default_rng([0, 3])  # the builder's per-scene generator
    assert sample_scene(scene.scene_id, rng).objects == scene.objects
    expected = SceneRenderer(SIZE, seed=0).render(scene, int(rng.integers(BACKGROUND_VARIANTS)))
    with Image.open(worlds["a"] / scene.image) as image:
        assert np.array_equal(np.asarray(image), expected)


def test_split_proportions(worlds: dict[str, Path]) -> None:
    scenes = load_scenes(worlds["a"])
    counts = {name: sum(s.split == name for s in scenes) for name in SPLITS}
    for name, fraction in zip(SPLITS, (0.9, 0.05, 0.05)):
        assert abs(counts[name] - fraction * N_SCENES) <= 1, counts
    assert counts == json.loads((worlds["a"] / "world.json").read_text())["splits"]
    assert len(load_scenes(worlds["a"], split="val")) == counts["val"]


@pytest.mark.parametrize("kwargs, argument", [
    ({"scenes": 0}, "scenes"), ({"image_size": 16}, "image_size"),
    ({"splits": (0.5, 0.5)}, "splits"), ({"splits": (0.9, 0.2, -0.1)}, "splits"),
])
def test_bad_arguments_name_the_argument(tmp_path: Path, kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        build_world(tmp_path, progress=False, **kwargs)
    assert not any(tmp_path.iterdir())  # nothing written before the check


def test_load_scenes_reports_file_and_line(tmp_path: Path) -> None:
    good = sample_scene("s0", np.random.default_rng(0)).to_dict()
    path = tmp_path / "scenes.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "objects": []}) + "\n")
    with pytest.raises(ValueError, match=r"scenes\.jsonl:2"):
        load_scenes(path)


def test_render_script_reproduces_the_committed_asset_pack(tmp_path: Path) -> None:
    """The committed atlas is exactly what the script makes from the font (.ci/run installs it)."""
    render_assets = render_script()
    if not render_assets.DEFAULT_FONT.is_file():
        pytest.fail(f"the emoji font is missing: apt-get install fonts-noto-color-emoji ({render_assets.DEFAULT_FONT})")
    render_assets.main(["--out", str(tmp_path)])
    for name in (render_assets.ATLAS_FILE, render_assets.OBJECTS_FILE):
        assert (tmp_path / name).read_bytes() == (render_assets.ASSETS_DIR / name).read_bytes(), name
