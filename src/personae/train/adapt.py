"""`personae adapt` on files: read a card and k example conversations, adapt the run, save the adapter.

The adapting itself is :func:`personae.meta.adapt.adapt_to_character` (in memory, no files). This
wrapper loads the run, reads the card and the examples, and writes `RUN/adapters/<id>.safetensors`
(only the adapted tensors, named as in the model, e.g. `decoder.blocks.0.attn.qkv.lora_B`, plus
their metadata); the card is copied to `RUN/characters/`, so `personae chat RUN --character <id or
name>` finds both.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from personae.data.cards import CharacterCard, load_card
from personae.data.dialogues import DialogueRecord, read_dialogues
from personae.errors import DataError, PersonaeError
from personae.meta.adapt import AdaptSpec, adapt_to_character, learned_rates
from personae.models.adapter_files import save_verified_adapter
from personae.models.io import load_model

ADAPTERS_DIR = "adapters"


def read_examples(path: Path, character_id: str, card: CharacterCard, k: int) -> list[DialogueRecord]:
    """The first k example conversations of a file; they must be this character's, with or without images."""
    path = Path(path)
    if k < 1:
        raise PersonaeError(f"k must be >= 1 example conversations, got {k}")
    records = read_dialogues(path)
    if not records:
        raise DataError("the example file holds no conversation", path)
    accepted = {character_id.lower(), card.name.strip().lower()}
    for record in records:
        if record.character.strip().lower() not in accepted:
            raise DataError(f"conversation of character {record.character!r}, but the card is {card.name!r} "
                            f"(write its id {character_id!r} or name in 'character')", path, record.line)
    with_image = {r.image is not None for r in records[:k]}
    if len(with_image) > 1:
        first = next(r for r in records[:k] if r.image is None)
        raise DataError("some examples have an image and some do not: use one kind in the first k rows",
                        path, first.line)
    if len(records) < k:
        raise DataError(f"{len(records)} example conversation(s), fewer than k = {k} (lower -k)", path)
    return records[:k]


def adapter_path(run: Path, character_id: str) -> Path:
    """Where a character's adapter lives in a run: RUN/adapters/<id>.safetensors."""
    return Path(run) / ADAPTERS_DIR / f"{character_id}.safetensors"


def adapt_character(run: Path, card_path: Path, examples_path: Path, *, k: int = 5, steps: int = 10,
                    lr: float | None = None, inner_params: str | None = None, progress: bool = True,
                    device: str | torch.device = "cpu", copy_card: bool = True) -> Path:
    """Adapt RUN to the character of CARD from the first k conversations of EXAMPLES; the adapter's path.

    Writes RUN/adapters/<id>.safetensors (id: the card file's stem) and copies the card to
    RUN/characters/ (unless `copy_card` is False). `inner_params` chooses what adapts
    (auto | all | head | lora), `lr` the inner rate (default: the run's learned or meta.inner_lr).
    """
    run, card_path = Path(run), Path(card_path)
    if steps < 0:
        raise PersonaeError(f"steps must be >= 0, got {steps}")
    card = load_card(card_path)
    character_id = card_path.stem
    records = read_examples(Path(examples_path), character_id, card, k)
    model, cfg, tokenizer = load_model(run, device)
    spec = AdaptSpec.of(cfg, inner_params, lr)
    bar = tqdm(total=steps, desc=f"adapting {character_id}", unit="step", disable=not progress)
    adapter = adapt_to_character(model, cfg, tokenizer, card, records, character_id=character_id, steps=steps,
                                 spec=spec, learned_lrs=None if lr is not None else learned_rates(run),
                                 on_progress=lambda fraction, message: bar.update(round(fraction * steps) - bar.n))
    bar.set_postfix(support_loss=f"{adapter.support_loss:.3f}")
    bar.close()
    path = save_verified_adapter(adapter_path(run, character_id), adapter.tensors, adapter.metadata)
    target = run / "characters" / card_path.name
    if copy_card and target.resolve() != card_path.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(card_path, target)
    return path
