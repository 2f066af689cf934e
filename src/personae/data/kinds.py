"""Data kinds: the one interface through which training and evaluation reach a role-play data folder.

Every role-play folder has the same files (``dialogues.jsonl``, ``characters/<id>.json`` cards,
``characters/<id>.examples.jsonl``, images; see ``docs/world.md``), and fine-tuning, meta-training
and the fluency / loss evaluations need nothing else. What a data set may know *beyond* those
files is what a :class:`DataKind` says:

* ``characters(split)``: the ids of its train or held-out characters;
* ``metrics`` and ``reply_scorer(split)``: exact metrics that score a generated reply against the
  reference turn and whatever else the data set knows (the scene world checks replies against
  its scene graphs); ``None`` when it has none, and evaluation then reports fluency and loss only;
* ``summary()``: what a report shows about it (the scene world: scenes, image size, splits, seed);
* ``word_kinds()``: kinds of reply words (object names, numbers, ...) and their phrases, by which
  ``personae eval grounding`` splits the reply loss; empty when the data set knows none;
* ``persona_swap(seed, setting)``: a :class:`~personae.data.marker_swap.MarkerSwap` that draws
  fresh markers for a character (``finetune.persona_swap`` / ``meta.persona_swap``), when the
  data set knows which words are its characters' markers.

:func:`open_data` picks the kind of a folder by its marker file (``world.json`` marks the built-in
scene world, registered by ``personae.world``); a folder without one is a plain
:class:`DataKind`, which fine-tunes, meta-trains and evaluates with the generic metrics.

To plug in your own data set with exact metrics, subclass and register it::

    from personae.data.kinds import DataKind, register_data_kind

    @register_data_kind
    class MyKind(DataKind):
        name = "my-kind"
        marker = "my-kind.json"          # a file your builder writes into the folder
        metrics = ("exact_match",)

        def reply_scorer(self, split):
            return MyScorer(self.root, split)   # has .metrics, .score(record, turn, reply), .aggregate(rows)

Import that module before training or evaluating (e.g. in your script) and ``open_data`` finds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

from personae.data.dialogues import CHARACTER_SPLITS, DialogueRecord, read_dialogues
from personae.data.marker_swap import MarkerSwap
from personae.errors import DataError

DIALOGUES_FILE = "dialogues.jsonl"


class ReplyScorer(Protocol):
    """Exact metrics for generated replies: one row of scores per reply, then their means."""

    metrics: tuple[str, ...]  # the metric names score() returns, in report order

    def score(self, record: DialogueRecord, turn: int, reply: str) -> dict[str, float | None]:
        """Every metric for REPLY, the answer to turn TURN of RECORD (None where one does not apply)."""
        ...

    def aggregate(self, rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Means of scored rows: at least {"overall": {"n": rows, metric: mean, ...}, "by_type": {...}}."""
        ...


class DataKind:
    """A role-play data folder of the plain kind: no exact metrics, no persona swap (subclass for more)."""

    name: ClassVar[str] = "role-play folder"  # how messages and the registry call the kind
    marker: ClassVar[str | None] = None  # the file whose presence in a folder marks the kind
    metrics: ClassVar[tuple[str, ...]] = ()  # the names of the exact metrics reply_scorer gives
    # the word kinds (of word_kinds) that carry a reply's answer, what finetune.content_weight weighs
    content_kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @classmethod
    def marks(cls, root: Path | str) -> bool:
        """Whether ROOT holds this kind's marker file."""
        return cls.marker is not None and (Path(root) / cls.marker).is_file()

    def characters(self, split: str) -> list[str]:
        """Sorted ids of the characters of SPLIT (train / heldout): those whose conversations say so."""
        _check_split(split)
        records = read_dialogues(self.root / DIALOGUES_FILE, character_split=split, check_images=False)
        return sorted({record.character for record in records})

    def reply_scorer(self, split: str) -> ReplyScorer | None:
        """Exact metrics for replies on the conversations of SPLIT (train / val / test); None: fluency only."""
        return None

    def persona_swap(self, seed: int, setting: str) -> MarkerSwap:
        """Fresh markers for the characters (drawn with SEED); SETTING, the config key asking, names the error."""
        raise DataError(f"{setting} needs a scene world (a data kind that knows its characters' markers); this "
                        f"folder is a {self.name}: turn {setting} off", self.root)

    def summary(self) -> dict[str, Any]:
        """What a report shows about the data set (sizes, seed, ...); nothing for a plain folder."""
        return {}

    def word_kinds(self) -> dict[str, tuple[str, ...]]:
        """Kinds of reply words (e.g. "object names" -> the phrases that name objects), for the grounding
        diagnosis's loss by token kind; empty for a plain folder (it gets the by-question-type part only)."""
        return {}

    def image_objects(self, record: DialogueRecord) -> list[str]:
        """Names of the things in RECORD's image (for finetune.align_weight): a plain folder's conversation
        lists them in an optional "objects" key of its row (e.g. from a caption or a detector); none: []."""
        names = record.meta.get("objects", [])
        if not isinstance(names, list) or not all(isinstance(name, str) and name.strip() for name in names):
            raise DataError(f"conversation {record.id!r}: \"objects\" must be a list of non-empty names",
                            self.root / DIALOGUES_FILE, line=record.line)
        return names

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"


def _check_split(split: str) -> None:
    if split not in CHARACTER_SPLITS:
        raise ValueError(f"character split must be one of {CHARACTER_SPLITS}, got {split!r}")


DATA_KINDS: dict[str, type[DataKind]] = {}


def register_data_kind(kind: type[DataKind]) -> type[DataKind]:
    """Add KIND to DATA_KINDS under kind.name (usable as a class decorator); it needs a marker file."""
    if not kind.marker:
        raise ValueError(f"data kind {kind.name!r} needs a marker file name, so open_data can recognise it")
    known = DATA_KINDS.get(kind.name)
    if known is not None and known is not kind:
        raise ValueError(f"data kind {kind.name!r} is already registered (by {known.__module__}.{known.__qualname__})")
    DATA_KINDS[kind.name] = kind
    return kind


def open_data(root: Path | str) -> DataKind:
    """The kind of the data folder ROOT: the registered kind whose marker it holds, else a plain DataKind."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("data folder not found" if not root.exists() else "not a folder", root)
    marked = [kind for kind in DATA_KINDS.values() if kind.marks(root)]
    if len(marked) > 1:
        names = ", ".join(f"{kind.name} ({kind.marker})" for kind in marked)
        raise DataError(f"the folder holds the marker files of several data kinds: {names}", root)
    return marked[0](root) if marked else DataKind(root)


__all__ = ["CHARACTER_SPLITS", "DATA_KINDS", "DataKind", "ReplyScorer", "open_data", "register_data_kind"]
