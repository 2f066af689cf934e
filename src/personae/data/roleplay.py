"""Role-play training examples: conversations assembled into prompts with reply-only labels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from personae.data.cards import CharacterCard
from personae.data.dialogues import DialogueRecord
from personae.data.hf_tokenizer import prompt_builder
from personae.data.image_cache import ImageCache
from personae.data.images import normalize_pixels
from personae.data.labels import IGNORE_INDEX
from personae.data.prompt import Prompt, PromptTooLong, Turn
from personae.data.tokenizer import Tokenizer, pad_ids
from personae.data.word_kinds import ContentWeighting
from personae.errors import DataError


class RolePlayDataset(Dataset):
    """One item per conversation: the whole exchange as one sequence, every reply carrying the loss.

    `max_tokens` is the text budget (the decoder's positions minus the image prefix); long
    conversations lose their oldest turns, then the card is cut (lorebook, examples, description
    tail: the rules of `personae.data.prompt`). `variants` replaces some
    conversations (by index) with another (record, card), e.g. a persona swap; a variant whose
    definition does not fit the budget falls back to the plain conversation (`fallbacks` counts them).
    `content` weighs the reply tokens of content kinds (`label_weights` in a batch).
    `image_words` gives each conversation the token ids its image's things are named by (the targets
    of the region-word alignment loss, `align_ids` in a batch).
    """

    def __init__(self, records: Sequence[DialogueRecord], cards: Mapping[str, CharacterCard], tokenizer: Tokenizer,
                 *, image_size: int, max_tokens: int, include_examples: bool = True, progress: bool = True,
                 variants: Mapping[int, tuple[DialogueRecord, CharacterCard]] | None = None,
                 image_words: Sequence[Sequence[int]] | None = None,
                 content: ContentWeighting | None = None) -> None:
        if not records:
            raise DataError("no conversations to train on (check the split and character filters)")
        with_image = {r.image is not None for r in records}
        if len(with_image) > 1:
            first = next(r for r in records if r.image is None)
            raise DataError("some conversations have an image and some do not; use one kind per data set "
                            f"(conversation {first.id!r} has none)", line=first.line)
        if image_words is not None and len(image_words) != len(records):
            raise ValueError(f"image_words has {len(image_words)} entries for {len(records)} conversations")
        self.records, self.tokenizer = list(records), tokenizer
        self.image_words = None if image_words is None else [list(words) for words in image_words]
        builder = prompt_builder(tokenizer)

        def assemble(record: DialogueRecord, card: CharacterCard) -> Prompt:
            return builder.build(card, [Turn(t.user, t.reply) for t in record.turns], max_tokens=max_tokens,
                                 include_examples=include_examples)

        self.examples: list[tuple[list[int], list[int]]] = []
        self.weights: list[list[float]] | None = None if content is None else []
        self.fallbacks = 0
        variants = variants or {}
        for index, record in enumerate(tqdm(self.records, desc="assembling prompts",
                                            disable=not progress or len(records) < 2000)):
            prompt = None
            if index in variants:
                try:
                    prompt = assemble(*variants[index])
                except PromptTooLong:
                    self.fallbacks += 1
            prompt = prompt or assemble(record, cards[record.character])
            self.examples.append((prompt.ids, prompt.labels))
            if self.weights is not None:
                self.weights.append(content.label_weights(tokenizer, prompt.labels))
        self.images = None
        if records[0].image is not None:
            self.images = ImageCache([r.image for r in self.records], image_size,
                                     progress=progress)

    def __len__(self) -> int:
        return len(self.examples)

    def lengths(self) -> list[int]:
        """Tokens of each example's prompt (what `train.group_by_length` sorts by)."""
        return [len(ids) for ids, _ in self.examples]

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids, labels = self.examples[index]
        item: dict[str, Any] = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "index": index}
        if self.images is not None:
            item["image"] = self.images[index]
        if self.weights is not None:
            item["label_weights"] = torch.tensor(self.weights[index])
        if self.image_words is not None:
            item["align_ids"] = torch.tensor(self.image_words[index], dtype=torch.long)
        return item


def first_pieces(tokenizer: Tokenizer, names: Sequence[str]) -> list[int]:
    """The first word piece of each name as it reads mid-sentence (" backpack"), once each, in order."""
    pieces: list[int] = []
    for name in names:
        text = " " + name.strip()
        ids = tokenizer.encode(text, add_cls=False) if isinstance(tokenizer, Tokenizer) else tokenizer.encode(text)
        if ids and ids[0] not in pieces:
            pieces.append(ids[0])
    return pieces


def collate_roleplay(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ids (pad_id), labels and align_ids (IGNORE_INDEX); stack and normalise images when present."""
    input_ids, attention_mask = pad_ids([item["input_ids"] for item in items], pad_id)
    labels, _ = pad_ids([item["labels"] for item in items], IGNORE_INDEX)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
             "index": torch.tensor([item["index"] for item in items])}
    if "label_weights" in items[0]:
        batch["label_weights"] = torch.nn.utils.rnn.pad_sequence([item["label_weights"] for item in items],
                                                                 batch_first=True)  # padding weighs 0
    if "align_ids" in items[0]:
        batch["align_ids"], _ = pad_ids([item["align_ids"] for item in items], IGNORE_INDEX)
    if "image" in items[0]:
        batch["pixel_values"] = normalize_pixels(torch.stack([item["image"] for item in items]))
    return batch
