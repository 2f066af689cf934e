"""Exact, judge-free role-play metrics: replies are parsed and checked against the scene graph.

Named after the MMRole-Eval dimensions but computed from ground truth. Every function is pure
(text in, number out), case-insensitive (so an all-capitals quirk parses like plain text), and
returns ``None`` where a metric does not apply to the turn. Fluency (perplexity) needs a model and
is computed elsewhere.

* **response accuracy** (count / exists / where / feel; 1.0 or 0.0):
  count -- the first "<count> <object>" for the asked object ("two dogs", "a dog", "3 dogs",
  "no dogs", "zero dogs"; "not ... any/a single dog" reads as 0) must equal the scene's count;
  exists -- the first yes word (yes, yeah, yep) or no word (no, nope) must match presence (with
  neither, a counted mention answers: "two dogs" is yes, "no dogs" no; a reply with neither a
  yes/no word nor a counted mention is wrong); where -- the first position phrase
  ("top left", "upper left", "centre", "middle", "top row", "left column", ...) must name exactly
  the tightest true region of the object: its cell for an object present once, its row or column
  for copies in a line; feel -- the mood read from cue words (joy: love, wonderful, favourite,
  ...; dislike: do not like, dislike, hate, ...; both: mixed; neither but a neutral cue such as
  "either way" or "ordinary": neutral) must equal the mood the scene calls for given the
  character's favourite and disliked categories (the turn's target names them).
* **image-text relevance** (describe): precision, recall and F1 of the catalog objects named in the
  reply (``parse_mentions``) against the objects present; ``image_text_relevance`` is the F1.
* **instruction adherence** (every type; 1.0 or 0.0): the reply has the *form* of an answer to the
  question asked: count -- a number (word or digit) or a parsed count; exists -- a yes or no word;
  where -- a position phrase; describe -- at least one catalog object; feel -- a mood cue;
  who -- a self-introduction ("I am", "I'm", "my name is", "call me").
* **persona consistency** (every type): the mean of three checks, so 0, 1/3, 2/3 or 1:
  (a) at least one of the character's own greetings, seeing phrase or sign-off appears;
  (b) its quirk holds: capitals -- letters present and none lower case; lowercase -- no capital;
  prefix -- the reply starts with it; tag -- every sentence ends with it; title -- it appears;
  (c) no marker (greeting, seeing phrase, sign-off, quirk text) of any other character appears.
  Markers match case-insensitively at word boundaries.
* **knowledge consistency** (who): the mean of three checks: the character's name appears, its
  role appears, and no other character's name appears.

``score_reply`` returns all of them for one reply; ``aggregate`` averages rows overall, per question
type and per character split (seen ``train`` vs ``heldout``), skipping ``None``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from personae.world.captions import POSITION_PHRASES, parse_mentions, position_phrases_for
from personae.world.catalog import NUMBER_WORDS, OBJECTS
from personae.world.characters import Character, as_character_map
from personae.world.dialogues import QUESTION_TYPES, Dialogue, Turn
from personae.world.scene import COLUMN_NAMES, ROW_NAMES, Cell, Scene
from personae.world.settings import SETTINGS
from personae.world.styles import (
    NEGATIVE_CUES,
    NEUTRAL_CUES,
    NO_WORDS,
    POSITIVE_CUES,
    SELF_INTRO_CUES,
    YES_WORDS,
    expected_mood,
)

METRICS = ("response_accuracy", "image_text_relevance", "relevance_precision",
           "relevance_recall", "instruction_adherence", "persona_consistency",
           "knowledge_consistency")
ACCURACY_TYPES = ("count", "exists", "where", "feel")
_B, _E = r"(?<![a-z0-9])", r"(?![a-z0-9])"  # word boundaries that allow punctuation in markers


def _normalise(text: str) -> str:
    """Lower case, straight apostrophes, 'center' as 'centre', 'top-left' as 'top left'."""
    text = text.lower().replace("\u2019", "'").replace("center", "centre")
    return re.sub(r"(?<=[a-z])-(?=(?:left|right|centre|middle)\b)", " ", text)


def _words_pattern(phrases: Iterable[str]) -> re.Pattern[str]:
    ordered = sorted(set(phrases), key=len, reverse=True)
    return re.compile(_B + "(" + "|".join(re.escape(p) for p in ordered) + ")" + _E)


def _as_turn(turn: Turn | Mapping[str, Any]) -> Turn:
    return turn if isinstance(turn, Turn) else Turn.from_dict({"user": "", "reply": "", **turn})


def _target_object(turn: Turn) -> str:
    name = turn.target.get("object")
    if name not in OBJECTS:
        raise ValueError(f"a {turn.type} turn needs target['object'] naming a catalog object, "
                         f"got {name!r}")
    return str(name)


# -- parsers --------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _count_patterns(name: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    obj = OBJECTS[name]
    forms = "|".join(re.escape(f) for f in sorted({obj.name, obj.plural}, key=len, reverse=True))
    numbers = "|".join(["a", "an", "no", *NUMBER_WORDS, r"\d+"])
    counted = re.compile(rf"\b({numbers})\s+(?:{forms})\b")
    negated = re.compile(rf"(?:\bnot|n't|\bnever)\b[^.!?]*?\b(?:any|a single)\s+(?:{forms})\b|"
                         rf"n't\s+(?:see|spot|find)\s+(?:{forms})\b")
    return counted, negated


def parse_count(reply: str, name: str) -> int | None:
    """The count the reply gives for object ``name`` ('two dogs' -> 2, 'no dogs' -> 0), or None."""
    text = _normalise(reply)
    counted, negated = _count_patterns(name)
    match = counted.search(text)
    negation = negated.search(text)
    if negation and (match is None or negation.start() < match.start()):
        return 0
    if match is None:
        return None
    word = match.group(1)
    if word in ("a", "an"):
        return 1
    if word == "no":
        return 0
    return int(word) if word.isdigit() else NUMBER_WORDS.index(word)


_YES_NO = _words_pattern((*YES_WORDS, *NO_WORDS))


def parse_yes_no(reply: str) -> bool | None:
    """True / False from the first yes or no word, or None if there is neither."""
    match = _YES_NO.search(_normalise(reply))
    return None if match is None else match.group(1) in YES_WORDS


def _position_regions() -> dict[str, frozenset[Cell]]:
    """Bare position words -> the cells they name ('top left', 'upper left', 'left column')."""
    rows = {"top": 0, "upper": 0, "middle": 1, "bottom": 2, "lower": 2}
    cols = {"left": 0, "centre": 1, "right": 2}
    regions: dict[str, frozenset[Cell]] = {"centre": frozenset({(1, 1)}),
                                           "middle": frozenset({(1, 1)})}
    for row_word, row in rows.items():
        for col_word, col in cols.items():
            if (row, col) != (1, 1):
                regions[f"{row_word} {col_word}"] = frozenset({(row, col)})
        regions[f"{row_word} row"] = frozenset((row, c) for c in range(3))
    for col_word, col in cols.items():
        regions[f"{col_word} column"] = frozenset((r, col) for r in range(3))
    regions["middle column"] = regions["centre column"]
    assert set(ROW_NAMES) <= set(rows) and set(COLUMN_NAMES) <= set(cols)
    return regions


POSITION_REGIONS: dict[str, frozenset[Cell]] = _position_regions()
_POSITION = _words_pattern(POSITION_REGIONS)


def parse_position(reply: str) -> frozenset[Cell] | None:
    """The cells named by the first position phrase of the reply, or None."""
    match = _POSITION.search(_normalise(reply))
    return None if match is None else POSITION_REGIONS[match.group(1)]


_MOOD_CUES = {mood: _words_pattern(cues) for mood, cues in
              (("joy", POSITIVE_CUES), ("dislike", NEGATIVE_CUES), ("neutral", NEUTRAL_CUES))}


def parse_mood(reply: str) -> str | None:
    """joy / dislike / mixed / neutral from cue words, or None if the reply expresses no feeling."""
    text = _normalise(reply)
    found = {mood for mood, pattern in _MOOD_CUES.items() if pattern.search(text)}
    if {"joy", "dislike"} <= found:
        return "mixed"
    for mood in ("joy", "dislike", "neutral"):
        if mood in found:
            return mood
    return None


# -- metrics --------------------------------------------------------------------------------------


def _where_correct(reply: str, scene: Scene, name: str) -> float | None:
    placed = scene.get(name)
    if placed is None:
        return None  # no true position to compare with
    region = parse_position(reply)
    tight = position_phrases_for(placed)  # empty when the copies are scattered
    if region is None or not tight or not set(placed.cells) <= region:
        return 0.0
    return float(len(region) == len(POSITION_PHRASES[tight[0]]))


def response_accuracy(reply: str, turn: Turn | Mapping[str, Any], scene: Scene) -> float | None:
    """1.0 if the answer parsed from the reply matches the scene graph, else 0.0; None if n/a."""
    turn = _as_turn(turn)
    if turn.type == "count":
        name = _target_object(turn)
        placed = scene.get(name)
        return float(parse_count(reply, name) == (placed.count if placed else 0))
    if turn.type == "exists":
        name = _target_object(turn)
        said = parse_yes_no(reply)
        if said is None:  # no yes/no word: a counted mention answers; a reply with neither is wrong, not "no"
            count = parse_count(reply, name)
            if count is None:
                return 0.0
            said = count >= 1
        return float(said == (scene.get(name) is not None))
    if turn.type == "where":
        return _where_correct(reply, scene, _target_object(turn))
    if turn.type == "feel":
        favourite, disliked = turn.target.get("favourite"), turn.target.get("disliked")
        if not favourite or not disliked:
            raise ValueError("a feel turn needs target['favourite'] and target['disliked']")
        return float(parse_mood(reply) == expected_mood(scene, favourite, disliked))
    return None


@dataclass(frozen=True)
class Relevance:
    """Objects named in a describe reply vs. objects present."""

    precision: float
    recall: float
    f1: float


def relevance_scores(reply: str, scene: Scene) -> Relevance:
    """Precision, recall and F1 of the catalog objects the reply names."""
    named = set(parse_mentions(_normalise(reply)))
    present = {p.name for p in scene.objects}
    hits = len(named & present)
    precision = hits / len(named) if named else 0.0
    recall = hits / len(present)
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return Relevance(precision, recall, f1)


def image_text_relevance(reply: str, scene: Scene, *,
                         turn: Turn | Mapping[str, Any] | None = None) -> float | None:
    """F1 of objects named vs present; None when ``turn`` is given and is not a describe turn."""
    if turn is not None and _as_turn(turn).type != "describe":
        return None
    return relevance_scores(reply, scene).f1


_NUMBER = _words_pattern((*NUMBER_WORDS, "none"))
_DIGIT = re.compile(r"\d")
_SELF_INTRO = _words_pattern(SELF_INTRO_CUES)


def instruction_adherence(reply: str, turn: Turn | Mapping[str, Any]) -> float:
    """1.0 if the reply has the form of an answer to the kind of question asked, else 0.0."""
    turn = _as_turn(turn)
    text = _normalise(reply)
    if turn.type == "count":
        ok = (parse_count(reply, _target_object(turn)) is not None
              or bool(_NUMBER.search(text) or _DIGIT.search(text)))
    elif turn.type == "exists":
        ok = parse_yes_no(reply) is not None
    elif turn.type == "where":
        ok = parse_position(reply) is not None
    elif turn.type == "describe":
        ok = bool(parse_mentions(text))
    elif turn.type == "feel":
        ok = parse_mood(reply) is not None
    else:
        ok = bool(_SELF_INTRO.search(text))
    return float(ok)


@lru_cache(maxsize=16)
def _marker_index(cast: tuple[Character, ...]) -> tuple[re.Pattern[str], dict[str, set[str]]]:
    """One regex over every character's markers, and marker -> the ids that own it."""
    owners: dict[str, set[str]] = {}
    for character in cast:
        for marker in character.style.markers():
            owners.setdefault(_normalise(marker), set()).add(character.id)
    return _words_pattern(owners), owners


def _own_markers_present(text: str, character: Character) -> bool:
    style = character.style
    return any(re.search(_B + re.escape(_normalise(m)) + _E, text)
               for m in (*style.greetings, style.seeing, style.sign_off))


def quirk_holds(reply: str, character: Character) -> bool:
    """Whether the reply obeys the character's quirk (see the module docstring)."""
    quirk, stripped = character.style.quirk, reply.strip()
    if quirk.kind == "capitals":
        return any(c.isalpha() for c in stripped) and not any(c.islower() for c in stripped)
    if quirk.kind == "lowercase":
        return not any(c.isupper() for c in stripped)
    text, marker = _normalise(stripped), _normalise(quirk.text)
    if quirk.kind == "prefix":
        return text.startswith(marker)
    if quirk.kind == "title":
        return re.search(_B + re.escape(marker) + _E, text) is not None
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip(" .!?")]
    return bool(sentences) and all(s.rstrip(" .!?").endswith(marker) for s in sentences)


def foreign_markers(reply: str, character: Character,
                    all_characters: Mapping[str, Character] | Sequence[Character]) -> list[str]:
    """The markers of other characters found in the reply."""
    pattern, owners = _marker_index(tuple(as_character_map(all_characters).values()))
    found = (m.group(1) for m in pattern.finditer(_normalise(reply)))
    return [marker for marker in found if owners[marker] - {character.id}]


def persona_consistency(reply: str, character: Character,
                        all_characters: Mapping[str, Character] | Sequence[Character]) -> float:
    """Mean of: own greeting/seeing/sign-off present, quirk holds, no other character's marker."""
    checks = (_own_markers_present(_normalise(reply), character),
              quirk_holds(reply, character),
              not foreign_markers(reply, character, all_characters))
    return sum(checks) / len(checks)


def knowledge_consistency(reply: str, character: Character,
                          all_characters: Mapping[str, Character] | Sequence[Character] | None
                          = None, *, turn: Turn | Mapping[str, Any] | None = None) -> float | None:
    """Mean of: own name present, own role present, no other character's name; None if not 'who'."""
    if turn is not None and _as_turn(turn).type != "who":
        return None
    text = _normalise(reply)

    def named(phrase: str) -> bool:
        return re.search(_B + re.escape(_normalise(phrase)) + _E, text) is not None

    others = [c.name for c in as_character_map(all_characters).values() if c.id != character.id]
    checks = (named(character.name), named(character.role), not any(map(named, others)))
    return sum(checks) / len(checks)


def score_reply(reply: str, turn: Turn | Mapping[str, Any], scene: Scene, character: Character,
                all_characters: Mapping[str, Character] | Sequence[Character]
                ) -> dict[str, float | None]:
    """Every metric for one reply (None where a metric does not apply to the question type)."""
    turn = _as_turn(turn)
    relevance = relevance_scores(reply, scene) if turn.type == "describe" else None
    return {
        "response_accuracy": response_accuracy(reply, turn, scene),
        "image_text_relevance": relevance.f1 if relevance else None,
        "relevance_precision": relevance.precision if relevance else None,
        "relevance_recall": relevance.recall if relevance else None,
        "instruction_adherence": instruction_adherence(reply, turn),
        "persona_consistency": persona_consistency(reply, character, all_characters),
        "knowledge_consistency": knowledge_consistency(reply, character, all_characters,
                                                       turn=turn),
    }


def score_dialogue(dialogue: Dialogue, scene: Scene,
                   all_characters: Mapping[str, Character] | Sequence[Character],
                   replies: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Score each turn's reply (the references, or ``replies``), one row per turn for aggregate."""
    characters = as_character_map(all_characters)
    if dialogue.scene_id != scene.scene_id:
        raise ValueError(f"dialogue {dialogue.id} is about {dialogue.scene_id}, "
                         f"got scene {scene.scene_id}")
    if replies is not None and len(replies) != len(dialogue.turns):
        raise ValueError(f"dialogue {dialogue.id} has {len(dialogue.turns)} turns, "
                         f"got {len(replies)} replies")
    character = characters[dialogue.character]
    rows = []
    for index, turn in enumerate(dialogue.turns):
        reply = turn.reply if replies is None else replies[index]
        scores = score_reply(reply, turn, scene, character, characters)
        rows.append({"dialogue": dialogue.id, "turn": index, "type": turn.type,
                     "character": character.id, "character_split": character.split, **scores})
    return rows


def _means(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(rows)}
    for metric in METRICS:
        values = [row[metric] for row in rows if row.get(metric) is not None]
        out[metric] = sum(values) / len(values) if values else None
    return out


def aggregate(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Means per metric: overall, per question type and per character split (None skipped)."""
    rows = list(rows)
    by_type = {t: [r for r in rows if r.get("type") == t] for t in QUESTION_TYPES}
    splits = {s: [r for r in rows if r.get("character_split") == s] for s in ("train", "heldout")}
    return {
        "overall": _means(rows),
        "by_type": {t: _means(group) for t, group in by_type.items() if group},
        "by_character_split": {s: _means(group) for s, group in splits.items() if group},
    }


# words of a setting's phrases that name no setting ("on the beach" -> beach)
_SETTING_STOPWORDS = frozenset({"a", "an", "the", "on", "in", "at", "by", "of", "under", "among", "scene"})


def world_word_kinds(characters: Mapping[str, Character] | Sequence[Character]) -> dict[str, tuple[str, ...]]:
    """Reply words by kind, from the world's vocabulary: object names (singular and plural), numbers,
    yes/no words, position words, setting words and persona words (the cast's markers, names, roles).

    A word in two kinds belongs to the earlier one (e.g. "bottom" is a position, not a setting word).
    """
    positions = set(POSITION_REGIONS) | {w for phrase in POSITION_REGIONS for w in phrase.split()}
    kinds: dict[str, set[str]] = {
        "object names": {form for obj in OBJECTS.values() for form in (obj.name, obj.plural)},
        "numbers": {*NUMBER_WORDS, *(str(d) for d in range(10))},
        "yes/no": {*YES_WORDS, *NO_WORDS},
        "positions": positions | {"center", "corner"},
        "setting": {word for setting in SETTINGS.values() for phrase in (*setting.places, *setting.views)
                    for word in phrase.split() if word not in _SETTING_STOPWORDS},
        "persona words": {_normalise(phrase) for c in as_character_map(characters).values()
                          for phrase in (*c.style.markers(), c.name, c.role)},
    }
    owned: set[str] = set()
    out = {}
    for kind, words in kinds.items():
        out[kind] = tuple(sorted(words - owned))
        owned |= words
    return out


__all__ = [
    "ACCURACY_TYPES", "METRICS", "POSITION_REGIONS", "Relevance", "aggregate", "foreign_markers",
    "image_text_relevance", "instruction_adherence", "knowledge_consistency", "parse_count",
    "parse_mood", "parse_position", "parse_yes_no", "persona_consistency", "quirk_holds",
    "relevance_scores", "response_accuracy", "score_dialogue", "score_reply", "world_word_kinds",
]
