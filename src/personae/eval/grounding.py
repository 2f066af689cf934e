"""What the image is worth to a run: reply-token loss with the true, a shuffled and a blank image.

For each test conversation the reference replies are scored teacher-forced three times: with the
conversation's own image, with another test scene's image (a fixed-seed shuffle that never gives a
conversation its own scene) and with a blank one (uniform grey). The loss is split by question type
and, where the data kind knows its vocabulary (:meth:`personae.data.kinds.DataKind.word_kinds`:
object names, numbers, yes/no, positions, setting, persona words), by the kind of the reply token;
every other reply token (function words, the end of reply) is "other". A plain folder gets the
by-question-type part and the "all tokens" row.

With the true image it also reads the attention the decoder really uses
(:meth:`personae.models.decoder.Decoder.forward_with_attention`): the mass that each position
predicting a reply token puts on the image prefix, per layer and head, next to the mass a uniform
spread over the visible keys would put there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from personae.data.dialogues import DialogueRecord, load_character_cards, read_dialogues
from personae.data.hf_tokenizer import prompt_builder
from personae.data.image_cache import ImageCache
from personae.data.images import normalize_pixels
from personae.data.kinds import DIALOGUES_FILE, open_data
from personae.data.labels import IGNORE_INDEX, labelled_spans
from personae.data.prompt import Turn
from personae.data.tokenizer import Tokenizer, pad_ids
from personae.data.word_kinds import OTHER, WordKinds
from personae.errors import DataError
from personae.models.model import PersonaeModel

IMAGES = ("true", "shuffled", "blank")  # the three images each conversation's replies are scored with
ALL = "all tokens"
UNTYPED = "untyped"  # the question type of a turn whose data says none
BLANK_GREY = 128  # the blank image's value in every channel (uint8)


@dataclass
class ScoredTokens:
    """One conversation assembled for scoring: its ids and, per reply token, target, kind and question type."""

    record: int
    ids: list[int]
    targets: list[int]  # labels: the reply tokens, IGNORE_INDEX elsewhere
    kinds: list[str | None]  # per position: the kind of the reply token there (None: not a reply token)
    types: list[str | None]  # per position: the question type of the turn it answers


def assemble(records: Sequence[DialogueRecord], cards: Mapping[str, Any], tokenizer: Tokenizer, budget: int,
             words: WordKinds, include_examples: bool) -> list[ScoredTokens]:
    """Each conversation as one training-style sequence, its reply tokens tagged by kind and question type."""
    builder = prompt_builder(tokenizer)
    out = []
    for r, record in enumerate(records):
        prompt = builder.build(cards[record.character], [Turn(t.user, t.reply) for t in record.turns],
                               max_tokens=budget, include_examples=include_examples)
        kinds: list[str | None] = [None] * len(prompt.ids)
        types: list[str | None] = [None] * len(prompt.ids)
        spans = labelled_spans(prompt.labels)
        kept = record.turns[len(record.turns) - len(spans):]  # truncation drops the oldest turns
        for (start, end), turn in zip(spans, kept):
            reply = tokenizer.encode(turn.reply, add_cls=False, add_eos=False, parse_special=False)
            if prompt.labels[start : end - 1] != reply:
                raise DataError(f"conversation {record.id!r}: a labelled reply span does not match its reply")
            kinds[start:end] = [*words.of_tokens(tokenizer, reply), OTHER]  # the end-of-reply token is "other"
            types[start:end] = [str(turn.meta.get("type") or UNTYPED)] * (end - start)
        out.append(ScoredTokens(r, prompt.ids, prompt.labels, kinds, types))
    return out


def shuffled_images(records: Sequence[DialogueRecord], seed: int) -> list[int]:
    """For each record, the index of a record about another scene (or image): the scenes in a seeded cycle."""
    scenes = sorted({_scene_of(r) for r in records})
    if len(scenes) < 2:
        raise DataError("a shuffled image needs conversations about at least two scenes; raise --limit")
    order = torch.randperm(len(scenes), generator=torch.Generator().manual_seed(seed)).tolist()
    following = {scenes[order[i]]: scenes[order[(i + 1) % len(order)]] for i in range(len(order))}
    first = {}
    for i, record in enumerate(records):
        first.setdefault(_scene_of(record), i)
    return [first[following[_scene_of(r)]] for r in records]


def _scene_of(record: DialogueRecord) -> str:
    """What the conversation looks at: its scene id, else its image file."""
    return record.scene_id or str(record.image)


class _Totals:
    """Running sums of the loss per (image, group) and of the prefix attention per kind."""

    def __init__(self) -> None:
        self.loss: dict[tuple[str, str, str], float] = {}  # (image, type, kind) -> summed nats
        self.count: dict[tuple[str, str], int] = {}  # (type, kind) -> tokens
        self.mass: dict[str, torch.Tensor] = {}  # kind -> (L, H) summed prefix mass
        self.uniform: dict[str, float] = {}  # kind -> summed uniform mass
        self.queries: dict[str, int] = {}

    def add_loss(self, image: str, losses: torch.Tensor, types: list[str], kinds: list[str]) -> None:
        for value, qtype, kind in zip(losses.tolist(), types, kinds):
            key = (image, qtype, kind)
            self.loss[key] = self.loss.get(key, 0.0) + value
            if image == IMAGES[0]:
                self.count[(qtype, kind)] = self.count.get((qtype, kind), 0) + 1

    def add_attention(self, kind: str, mass: torch.Tensor, uniform: float) -> None:
        self.mass[kind] = self.mass.get(kind, torch.zeros_like(mass)) + mass
        self.uniform[kind] = self.uniform.get(kind, 0.0) + uniform
        self.queries[kind] = self.queries.get(kind, 0) + 1


@torch.no_grad()
def _score_batch(model: PersonaeModel, items: Sequence[ScoredTokens], pixels: dict[str, torch.Tensor],
                 pad_id: int, totals: _Totals) -> None:
    """The three passes over one batch: reply-token losses for every image, attention for the true one
    (when the decoder can give its weights: ``forward_with_attention``)."""
    decoder = model.require_decoder()
    device = next(model.parameters()).device
    ids, _ = pad_ids([torch.tensor(item.ids) for item in items], pad_id)
    targets, _ = pad_ids([torch.tensor(item.targets) for item in items], IGNORE_INDEX)
    ids, targets = ids.to(device), targets[:, 1:].to(device)  # position t predicts token t + 1
    chosen = targets != IGNORE_INDEX
    where = chosen.nonzero().tolist()
    kinds = [items[b].kinds[t + 1] for b, t in where]
    types = [items[b].types[t + 1] for b, t in where]
    prefix, weights = model.image_prefix_length(), None
    for image in IMAGES:
        images = pixels[image].to(device)
        if image == IMAGES[0] and hasattr(decoder, "forward_with_attention"):
            hidden, weights = decoder.forward_with_attention(model.embed_prompt(ids, images))
            hidden = hidden[:, prefix:]
        else:
            hidden = model.lm_hidden(images, ids)
        logits = model.lm_head(hidden[:, :-1][chosen])
        totals.add_loss(image, F.cross_entropy(logits, targets[chosen], reduction="none"), types, kinds)
    if weights is None:
        return
    onto_prefix = torch.stack([w[..., :prefix].sum(-1) for w in weights], dim=1)  # (B, L, H, T_full)
    for (b, t), kind in zip(where, kinds):
        query = prefix + t  # the full-sequence position whose output predicts the reply token
        totals.add_attention(kind, onto_prefix[b, :, :, query].cpu(), prefix / (query + 1))


def _loss_row(totals: _Totals, keys: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """{"n": tokens, "true": mean nats, "shuffled": ..., "blank": ...} over the (type, kind) keys."""
    n = sum(totals.count.get(key, 0) for key in keys)
    row: dict[str, Any] = {"n": n}
    for image in IMAGES:
        row[image] = sum(totals.loss.get((image, *key), 0.0) for key in keys) / n if n else None
    return row


def _summary(totals: _Totals, kinds: Sequence[str]) -> dict[str, Any]:
    """The loss table (all, by kind, by type, by type and kind) and the attention by kind."""
    keys = list(totals.count)
    types = list(dict.fromkeys(qtype for qtype, _ in keys))
    loss: dict[str, Any] = {"all": _loss_row(totals, keys), "by_type": {
        qtype: _loss_row(totals, [k for k in keys if k[0] == qtype]) for qtype in types}}
    if kinds:
        loss["by_kind"] = {kind: _loss_row(totals, [k for k in keys if k[1] == kind]) for kind in kinds}
        loss["by_type_and_kind"] = {qtype: {kind: _loss_row(totals, [(qtype, kind)]) for kind in kinds
                                            if totals.count.get((qtype, kind))} for qtype in types}
    groups = {ALL: list(totals.queries), **{kind: [kind] for kind in kinds}} if totals.queries else {}
    attention = {}  # empty when the decoder gives no attention weights
    for name, members in groups.items():
        n = sum(totals.queries.get(m, 0) for m in members)
        mass = torch.stack([totals.mass[m] for m in members if m in totals.mass]).sum(0) if n else None
        attention[name] = {"n": n, "uniform": sum(totals.uniform.get(m, 0.0) for m in members) / n if n else None,
                           "mass": (mass / n).tolist() if n else None}  # [layer][head]
    return {"loss": loss, "attention": attention}


def evaluate_grounding(model: PersonaeModel, tokenizer: Tokenizer, data_dir: Path, *, split: str = "test",
                       limit: int | None = 32, batch_size: int = 8, seed: int = 0, include_examples: bool = False,
                       progress: bool = True) -> dict[str, Any]:
    """Reply-token loss with the true / shuffled / blank image and the attention on the image prefix.

    LIMIT bounds the conversations of each character split (seen and held-out), None: all of them.
    """
    model.eval()
    kind = open_data(data_dir)
    records = read_dialogues(kind.root / DIALOGUES_FILE, split=split)
    if not records or records[0].image is None:
        raise DataError(f"the {split} conversations have no images: nothing for the grounding diagnosis to vary",
                        kind.root / DIALOGUES_FILE)
    if limit is not None:  # keep the seen / held-out balance, as evaluate_roleplay does
        records = [r for s in ("train", "heldout") for r in [x for x in records if x.character_split == s][:limit]]
    words = WordKinds(kind.word_kinds())
    items = assemble(records, load_character_cards(kind.root / "characters"), tokenizer,
                     model.text_budget(0, with_image=True), words, include_examples)
    images = ImageCache([r.image for r in records], model.cfg.vision.image_size, progress=False)
    shuffle = shuffled_images(records, seed)
    totals = _Totals()
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    for batch in tqdm(batches, desc="grounding", disable=not progress, unit="batch"):
        true = torch.stack([images[item.record] for item in batch])
        pixels = {"true": normalize_pixels(true),
                  "shuffled": normalize_pixels(torch.stack([images[shuffle[item.record]] for item in batch])),
                  "blank": normalize_pixels(torch.full_like(true, BLANK_GREY))}
        _score_batch(model, batch, pixels, tokenizer.pad_id, totals)
    kinds = [*words.names, OTHER] if words.names else []
    return {"split": split, "conversations": len(records), "seed": seed, "prefix_positions": model.image_prefix_length(),
            "images": {"true": "the conversation's own", "shuffled": "another test scene's (fixed seed)",
                       "blank": f"uniform grey ({BLANK_GREY})"}, "kinds": kinds, **_summary(totals, kinds)}


def save_grounding(result: dict[str, Any], path: Path) -> Path:
    """Write RESULT as JSON to PATH (folders made); returns PATH."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path


def _cell(value: float | None, digits: int = 2) -> str:
    return f"{value:>9.{digits}f}" if value is not None else f"{'-':>9}"


def format_grounding_table(result: dict[str, Any]) -> str:
    """The loss per kind and question type (true / shuffled / blank) and the prefix attention per kind."""
    loss = result["loss"]
    lines = [f"reply-token loss (nats) on {result['conversations']} {result['split']} conversations",
             f"{'':<16}{'tokens':>8}" + "".join(f"{image:>9}" for image in IMAGES)]
    rows = [(ALL, loss["all"]), *loss.get("by_kind", {}).items(),
            *((f"type {qtype}", row) for qtype, row in loss["by_type"].items())]
    for name, row in rows:
        lines.append(f"{name:<16}{row['n']:>8}" + "".join(_cell(row[image]) for image in IMAGES))
    if not result["attention"]:
        return "\n".join([*lines, "", "attention: this decoder gives no attention weights"])
    title = f"attention on the {result['prefix_positions']} image positions from answer positions (true image)"
    lines += ["", title, f"{'':<16}{'tokens':>8}{'mean':>9}{'top head':>9}{'uniform':>9}"]
    for name, row in result["attention"].items():
        heads = [h for layer in (row["mass"] or []) for h in layer]
        mean, top = (sum(heads) / len(heads), max(heads)) if heads else (None, None)
        lines.append(f"{name:<16}{row['n']:>8}{_cell(mean, 3)}{_cell(top, 3)}{_cell(row['uniform'], 3)}")
    return "\n".join(lines)


def worth_line(result: dict[str, Any], kind: str = "object names") -> str:
    """One summary line: KIND's loss with the true / shuffled / blank image (all tokens if KIND is absent)."""
    by_kind = result["loss"].get("by_kind", {})
    name, row = (kind, by_kind[kind]) if kind in by_kind else (ALL, result["loss"]["all"])
    values = " / ".join(f"{row[image]:.2f}" if row[image] is not None else "-" for image in IMAGES)
    return f"image worth: {name} {values} nats (true / shuffled / blank)"


__all__ = ["IMAGES", "WordKinds", "evaluate_grounding", "format_grounding_table", "save_grounding",
           "shuffled_images", "worth_line"]
