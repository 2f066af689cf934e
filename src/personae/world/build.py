"""Build the scene world on disk: images/, scenes.jsonl, pairs.jsonl and world.json."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from personae.data.jsonl import read_records, write_records
from personae.world.captions import caption_scene, caption_templates
from personae.world.cards import write_characters
from personae.world.catalog import OBJECTS, categories
from personae.world.characters import CHARACTERS_FILE
from personae.world.dialogues import DIALOGUES_FILE, write_dialogues
from personae.world.scene import BACKGROUND_VARIANTS, MIN_IMAGE_SIZE, Scene, SceneRenderer, sample_scene
from personae.world.settings import SETTINGS

WORLD_VERSION = 1
SPLITS = ("train", "val", "test")
SCENES_FILE = "scenes.jsonl"
PAIRS_FILE = "pairs.jsonl"
WORLD_FILE = "world.json"
IMAGES_DIR = "images"
PNG_COMPRESS_LEVEL = 6  # fixed so that the PNG bytes are reproducible


@dataclass(frozen=True)
class WorldSummary:
    """What build_world wrote: where, from which seed, scenes per split, and how long it took."""

    out_dir: Path
    seed: int
    scenes: int
    image_size: int
    split_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    characters: int = 0  # 0 when built with characters=False
    dialogues: int = 0


def _check_arguments(scenes: int, image_size: int, splits: Sequence[float]) -> None:
    """Raise ValueError naming the first bad argument."""
    if isinstance(scenes, bool) or not isinstance(scenes, int) or scenes < 1:
        raise ValueError(f"scenes must be an integer >= 1, got {scenes!r}")
    if (isinstance(image_size, bool) or not isinstance(image_size, int)
            or image_size < MIN_IMAGE_SIZE):
        raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    if len(splits) != len(SPLITS) or any(f < 0 for f in splits) or abs(sum(splits) - 1) > 1e-6:
        raise ValueError(
            f"splits must be {len(SPLITS)} fractions {SPLITS} >= 0 summing to 1, got {splits!r}")


def assign_splits(scenes: int, fractions: Sequence[float], seed: int) -> list[str]:
    """A split name per scene: exact rounded counts for val/test, train takes the rest, shuffled."""
    sizes = [round(f * scenes) for f in fractions[1:]]
    sizes = [scenes - sum(sizes), *sizes]
    if sizes[0] < 0:
        raise ValueError(f"splits {fractions!r} leave no room for train with {scenes} scenes")
    names = np.repeat(np.array(SPLITS), sizes)
    order = np.random.default_rng([seed, scenes, 0x5B11]).permutation(scenes)
    return [str(s) for s in names[order]]


def scene_id_for(index: int, scenes: int) -> str:
    """'s000123': zero-padded to at least 6 digits, so ids sort like indices."""
    return f"s{index:0{max(6, len(str(scenes - 1)))}d}"


def _world_record(seed: int, scenes: int, image_size: int, fractions: Sequence[float],
                  split_counts: dict[str, int], talk: dict[str, int] | None = None) -> dict:
    """The contents of world.json (nothing time- or machine-dependent, so it is reproducible)."""
    files = {"images": f"{IMAGES_DIR}/", "scenes": SCENES_FILE, "pairs": PAIRS_FILE}
    if talk is not None:
        files |= {"characters": CHARACTERS_FILE, "dialogues": DIALOGUES_FILE}
    return {
        "name": "personae scene world", "version": WORLD_VERSION, "seed": seed,
        "scenes": scenes, "image_size": image_size, "grid": [3, 3],
        "split_fractions": list(fractions), "splits": split_counts,
        "files": files, **({"dialogues": talk} if talk is not None else {}),
        "objects": list(OBJECTS), "categories": categories(), "settings": list(SETTINGS),
        "caption_templates": caption_templates(),
        "glyphs": "Noto Color Emoji (SIL OFL 1.1 / Apache-2.0), see assets/LICENSE-emoji.txt",
    }


def build_world(out_dir: Path | str, *, seed: int = 0, scenes: int = 10000, image_size: int = 64,
                splits: Sequence[float] = (0.9, 0.05, 0.05), progress: bool = True,
                characters: bool = True) -> WorldSummary:
    """Generate ``scenes`` scenes deterministically from ``seed`` and write them to ``out_dir``.

    With ``characters`` it also writes the character cards and the role-play dialogues.
    """
    _check_arguments(scenes, image_size, splits)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    renderer = SceneRenderer(image_size, seed=seed)
    split_of = assign_splits(scenes, splits, seed)
    scene_records, pair_records, built = [], [], []
    for index in tqdm(range(scenes), disable=not progress, desc="scene world", unit="scene"):
        # one generator per scene: scene i is the same whatever the number of scenes
        rng = np.random.default_rng([seed, index])
        scene = sample_scene(scene_id_for(index, scenes), rng)
        variant = int(rng.integers(BACKGROUND_VARIANTS))
        caption = caption_scene(scene, rng)
        scene.split, scene.image = split_of[index], f"{IMAGES_DIR}/{scene.scene_id}.png"
        Image.fromarray(renderer.render(scene, variant)).save(
            out_dir / scene.image, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        scene_records.append(scene.to_dict())
        built.append(scene)
        pair_records.append({"image": scene.image, "caption": caption,
                             "scene_id": scene.scene_id, "split": scene.split})
    write_records(out_dir / SCENES_FILE, scene_records)
    write_records(out_dir / PAIRS_FILE, pair_records)
    split_counts = {name: split_of.count(name) for name in SPLITS}
    talk = None
    if characters:
        cards = write_characters(out_dir)
        talk = {"characters": len(cards), **write_dialogues(out_dir, built, seed=seed)}
    world = _world_record(seed, scenes, image_size, list(splits), split_counts, talk)
    (out_dir / WORLD_FILE).write_text(json.dumps(world, indent=2) + "\n", encoding="utf-8")
    return WorldSummary(out_dir, seed, scenes, image_size, split_counts,
                        time.perf_counter() - start, talk["characters"] if talk else 0,
                        talk["dialogues"] if talk else 0)


def load_scenes(path: Path | str, split: str | None = None) -> list[Scene]:
    """Read scene graphs from scenes.jsonl (or a world folder holding one), optionally one split."""
    path = Path(path)
    if path.is_dir():
        path = path / SCENES_FILE
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    loaded = [s for s in read_records(path, Scene.from_dict, "scene record") if split is None or s.split == split]
    return loaded
