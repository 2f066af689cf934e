"""The built-in "scene world": emoji objects on procedural backgrounds, with true captions.

Importing it registers :class:`SceneWorld`, the data kind of a folder holding ``world.json``, with
``personae.data.kinds``: training and evaluation reach the world only through that interface
(``open_data(folder)``), as they reach a user's own data set.

Public API::

    build_world(out_dir, *, seed=0, scenes=10000, image_size=64, splits=(0.9, 0.05, 0.05),
                progress=True, characters=True) -> WorldSummary
    load_scenes(path, split=None) -> list[Scene]
    Scene, Placed, sample_scene(scene_id, rng), SceneRenderer(image_size), render_scene(scene)
    caption_scene(scene, rng) -> str, caption_templates(), parse_mentions(text)
    OBJECTS (name -> WorldObject, loaded lazily), SETTINGS (name -> Setting)
    CHARACTERS (id -> Character), Character, Style, Quirk, characters_in(split),
    character_card(c) -> CharacterCard, write_characters(dir), load_characters(dir, split=None)
    Dialogue, Turn, generate_dialogues(scenes, seed=0), heldout_examples(c, scenes),
    write_dialogues(dir, scenes), load_dialogues(path, split=None, character_split=None)
    SceneWorld (the data kind: characters(split), reply_scorer(split), persona_swap(seed, setting)),
    SceneScorer, METRICS (the exact metrics' names), WORLD_FILE ("world.json", the marker)
"""

from personae.world.build import SPLITS, WORLD_FILE, WorldSummary, assign_splits, build_world, load_scenes
from personae.world.captions import (
                                       CAPTION_TEMPLATES,
                                       POSITION_PHRASES,
                                       RELATION_PHRASES,
                                       caption_scene,
                                       caption_templates,
                                       parse_mentions,
                                       position_phrases_for,
                                       true_relations,
)
from personae.world.cards import character_card, write_characters
from personae.world.catalog import OBJECTS, WorldObject, categories, number_word
from personae.world.characters import CHARACTERS, Character, Quirk, Style, characters_in, load_characters
from personae.world.dialogues import (
                                       QUESTION_TYPES,
                                       Dialogue,
                                       Turn,
                                       generate_dialogues,
                                       heldout_examples,
                                       load_dialogues,
                                       write_dialogues,
)
from personae.world.kind import SceneScorer, SceneWorld
from personae.world.metrics import METRICS
from personae.world.scene import (
                                       CELL_NAMES,
                                       COLUMN_NAMES,
                                       ROW_NAMES,
                                       Placed,
                                       Scene,
                                       SceneRenderer,
                                       relation_holds,
                                       render_scene,
                                       sample_scene,
)
from personae.world.settings import SETTINGS, Setting

__all__ = [
    "CAPTION_TEMPLATES", "CELL_NAMES", "CHARACTERS", "COLUMN_NAMES", "METRICS", "OBJECTS",
    "POSITION_PHRASES", "QUESTION_TYPES", "RELATION_PHRASES", "ROW_NAMES", "SETTINGS", "SPLITS",
    "WORLD_FILE", "Character", "Dialogue", "Placed", "Quirk", "Scene", "SceneRenderer", "SceneScorer",
    "SceneWorld", "Setting", "Style",
    "Turn", "WorldObject", "WorldSummary", "assign_splits", "build_world", "caption_scene",
    "caption_templates", "categories", "character_card", "characters_in", "generate_dialogues",
    "heldout_examples", "load_characters", "load_dialogues", "load_scenes", "number_word",
    "parse_mentions", "position_phrases_for", "relation_holds", "render_scene", "sample_scene",
    "true_relations", "write_characters", "write_dialogues",
]
