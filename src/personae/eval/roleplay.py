"""Role-play evaluation: generate every test reply, score it exactly where the data kind can, and fluency.

Each turn of each test conversation is answered by the model with the reference history before it
(teacher-forced history), greedy, and scored by the data kind's reply scorer (the scene world's
exact metrics; see :mod:`personae.data.kinds`); fluency is the perplexity of the reference replies
under the model, for any data. Results are split by seen (train) and held-out characters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from personae.data.cards import CharacterCard
from personae.data.dialogues import DialogueRecord, load_character_cards, read_dialogues
from personae.data.hf_tokenizer import prompt_builder
from personae.data.image_cache import ImageCache
from personae.data.images import normalize_pixels
from personae.data.kinds import ReplyScorer, open_data
from personae.data.labels import IGNORE_INDEX
from personae.data.prompt import Turn
from personae.data.roleplay import RolePlayDataset, collate_roleplay
from personae.data.tokenizer import Tokenizer
from personae.models.generation import SamplingParams, generate
from personae.models.model import PersonaeModel

CHARACTER_SPLITS = ("train", "heldout")


@dataclass
class PendingReply:
    """One turn to answer: which conversation, which turn, and its prompt ids."""

    record: int
    turn: int
    ids: list[int]


def pending_replies(records: Sequence[DialogueRecord], cards: dict[str, CharacterCard], tokenizer: Tokenizer,
                    budget: int, include_examples: bool) -> list[PendingReply]:
    """A generation prompt for every turn, with the reference replies as history."""
    builder = prompt_builder(tokenizer)
    pending = []
    for r, record in enumerate(records):
        for t in range(len(record.turns)):
            turns = [Turn(x.user, x.reply) for x in record.turns[:t]] + [Turn(record.turns[t].user)]
            prompt = builder.build(cards[record.character], turns, max_tokens=budget, include_examples=include_examples)
            pending.append(PendingReply(r, t, prompt.ids))
    return pending


@torch.no_grad()
def generate_all(model: PersonaeModel, tokenizer: Tokenizer, records: Sequence[DialogueRecord],
                 pending: list[PendingReply], images: ImageCache | None, params: SamplingParams, *,
                 batch_size: int = 32, progress: bool = True) -> dict[tuple[int, int], str]:
    """Greedy (or sampled) replies for every pending turn, batched by similar prompt length."""
    device = next(model.parameters()).device
    order = sorted(range(len(pending)), key=lambda i: len(pending[i].ids))
    replies: dict[tuple[int, int], str] = {}
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generating replies", disable=not progress, unit="batch"):
        items = [pending[i] for i in batch]
        pixels = None
        if images is not None:
            pixels = normalize_pixels(torch.stack([images[p.record] for p in items])).to(device)
        for item, out in zip(items, generate(model, tokenizer, [p.ids for p in items], pixels, params)):
            replies[(item.record, item.turn)] = out.text.strip()
    return replies


@torch.no_grad()
def reference_perplexity(model: PersonaeModel, dataset: RolePlayDataset, tokenizer: Tokenizer,
                         batch_size: int = 32) -> float:
    """exp(mean negative log-likelihood) of the reference reply tokens (fluency)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate_roleplay([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))],
                                 tokenizer.pad_id)
        hidden = model.lm_hidden(batch["pixel_values"].to(device) if "pixel_values" in batch else None,
                                 batch["input_ids"].to(device))
        targets = batch["labels"][:, 1:].to(device)
        chosen = targets != IGNORE_INDEX
        logits = model.lm_head(hidden[:, :-1][chosen])
        total += float(torch.nn.functional.cross_entropy(logits, targets[chosen], reduction="sum"))
        count += int(chosen.sum())
    return math.exp(total / max(1, count))


def score_rows(records: Sequence[DialogueRecord], replies: dict[tuple[int, int], str],
               scorer: ReplyScorer) -> list[dict[str, Any]]:
    """One row per answered turn: what was asked, the reference, the reply and the scorer's metrics."""
    rows = []
    for r, record in enumerate(records):
        for t, turn in enumerate(record.turns):
            scores = scorer.score(record, t, replies[(r, t)])
            rows.append({"dialogue": record.id, "turn": t, "type": turn.meta.get("type"),
                         "character": record.character, "character_split": record.character_split,
                         "user": turn.user, "reference": turn.reply, "reply": replies[(r, t)], **scores})
    return rows


def _answer_and_score(model: PersonaeModel, tokenizer: Tokenizer, records: Sequence[DialogueRecord],
                      cards: dict[str, CharacterCard], scorer: ReplyScorer, *, batch_size: int, max_new_tokens: int,
                      include_examples: bool, max_repeats: int, progress: bool) -> list[dict[str, Any]]:
    """Greedy replies to every turn of RECORDS, each scored by SCORER."""
    with_image = records[0].image is not None
    images = (ImageCache([r.image for r in records], model.cfg.vision.image_size, progress=progress)
              if with_image else None)
    pending = pending_replies(records, cards, tokenizer, model.text_budget(max_new_tokens, with_image),
                              include_examples)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, max_repeats=max_repeats)
    replies = generate_all(model, tokenizer, records, pending, images, params, batch_size=batch_size,
                           progress=progress)
    return score_rows(records, replies, scorer)


def evaluate_roleplay(model: PersonaeModel, tokenizer: Tokenizer, data_dir: Path, *, split: str = "test",
                      limit: int | None = None, batch_size: int = 32, max_new_tokens: int = 64,
                      include_examples: bool = False, max_repeats: int = 0, progress: bool = True) -> dict[str, Any]:
    """Score the model's replies on a split of DATA_DIR, seen vs held-out characters.

    The exact metrics come from the folder's data kind (the scene world has them); a kind without
    a reply scorer gets fluency only (no replies are generated).
    """
    model.eval()
    kind = open_data(data_dir)
    records = read_dialogues(kind.root / "dialogues.jsonl", split=split)
    if limit is not None:  # keep the seen/held-out balance: take from each character split
        records = [r for s in CHARACTER_SPLITS for r in [x for x in records if x.character_split == s][:limit]]
    cards = load_character_cards(kind.root / "characters")
    scorer = kind.reply_scorer(split)
    rows = [] if scorer is None else _answer_and_score(
        model, tokenizer, records, cards, scorer, batch_size=batch_size, max_new_tokens=max_new_tokens,
        include_examples=include_examples, max_repeats=max_repeats, progress=progress)
    with_image = records[0].image is not None
    result: dict[str, Any] = {"split": split, "conversations": len(records),
                              "turns": sum(len(r.turns) for r in records), "metrics": {}, "fluency_perplexity": {}}
    for character_split in CHARACTER_SPLITS:
        chosen = [r for r in records if r.character_split == character_split]
        if not chosen:
            continue
        if scorer is not None:
            result["metrics"][character_split] = scorer.aggregate(
                x for x in rows if x["character_split"] == character_split)
        dataset = RolePlayDataset(chosen, cards, tokenizer, image_size=model.cfg.vision.image_size,
                                  max_tokens=model.text_budget(0, with_image),
                                  include_examples=include_examples, progress=False)
        result["fluency_perplexity"][character_split] = reference_perplexity(model, dataset, tokenizer, batch_size)
    result["samples"] = [r for s in CHARACTER_SPLITS for r in [x for x in rows if x["character_split"] == s][:20]]
    return result


def format_roleplay_table(result: dict[str, Any]) -> str:
    """Per question type x metric, one block per character split, plus fluency (alone for data without metrics)."""
    short = {"response_accuracy": "accuracy", "image_text_relevance": "relevance", "instruction_adherence": "adherence",
             "persona_consistency": "persona", "knowledge_consistency": "knowledge"}
    lines = []
    for split, perplexity in result["fluency_perplexity"].items():
        name = "seen (train) characters" if split == "train" else "held-out characters"
        block = result["metrics"].get(split)
        if block is None:
            lines += [f"{name}: fluency perplexity {perplexity:.2f} (no exact metrics for this data)", ""]
            continue
        # the scene world's metrics by their short names; another kind's by its own (cut to the column)
        columns = ({m: label for m, label in short.items() if m in block["overall"]}
                   or {m: m[:10] for m in block["overall"] if m != "n"})
        lines.append(f"{name}: {block['overall']['n']} turns, fluency perplexity {perplexity:.2f}")
        lines.append(f"{'type':<10}{'n':>6}" + "".join(f"{label:>11}" for label in columns.values()))
        for label, row in [("overall", block["overall"])] + list(block.get("by_type", {}).items()):
            cells = "".join(f"{row[m]:>11.3f}" if row.get(m) is not None else f"{'-':>11}" for m in columns)
            lines.append(f"{label:<10}{row['n']:>6}" + cells)
        lines.append("")
    return "\n".join(lines).rstrip()


__all__ = ["evaluate_roleplay", "format_roleplay_table", "generate_all", "reference_perplexity", "score_rows"]
