"""Role-play fine-tuning stage: the decoder learns to answer in character about the image."""

from __future__ import annotations

import copy
import shutil
from functools import partial
from pathlib import Path

import torch

from personae.config import Config, load_config
from personae.data.dialogues import load_character_cards, read_dialogues, require_cards
from personae.data.hf_tokenizer import HFChatTokenizer
from personae.data.kinds import open_data
from personae.data.marker_swap import swap_conversations
from personae.data.roleplay import RolePlayDataset, collate_roleplay, first_pieces
from personae.data.tokenizer import Tokenizer
from personae.data.word_kinds import ContentWeighting, WordKinds
from personae.errors import PersonaeError
from personae.models.generation_config import recommended_generation, write_generation_config
from personae.models.io import CONFIG_FILE, CheckpointError, load_model, require_file
from personae.models.model import PersonaeModel
from personae.tasks import RolePlayTask
from personae.train.distributed import init_distributed
from personae.train.pretrain import wrap_ddp
from personae.train.trainer import Trainer, TrainerState


def run_config(run: Path) -> Config:
    """The config a run was saved with (RUN/config.json)."""
    return load_config(require_file(Path(run), CONFIG_FILE))


def model_with_decoder(run: Path, cfg: Config | None = None) -> tuple[PersonaeModel, Config, Tokenizer]:
    """Load a run and give it a decoder (seeded from the text tower when finetune.decoder_from_text says so).

    The settings are a copy of `cfg` (default: the run's own config), so the caller's is not changed.
    """
    pretrained, saved, tokenizer = load_model(run)
    cfg = copy.deepcopy(saved if cfg is None else cfg)
    if cfg.model.decoder.kind == "hf" and not isinstance(tokenizer, HFChatTokenizer):
        # a Hugging Face decoder reads and writes with its own tokenizer and chat template; the
        # run's caption tokenizer goes along (the fine-tuned run saves both)
        tokenizer = HFChatTokenizer(cfg.model.decoder.path, text_tokenizer=tokenizer)
    if pretrained.decoder is not None:
        return pretrained, cfg, tokenizer
    cfg.model.decoder.enabled = True
    torch.manual_seed(cfg.finetune.train.seed)
    model = PersonaeModel(cfg.model)
    missing, unexpected = model.load_state_dict(pretrained.state_dict(), strict=False)
    if unexpected or any(not key.startswith("decoder.") for key in missing):
        raise CheckpointError(f"{run}: pretrained weights do not fit the role-play model ({missing[:3]}, {unexpected[:3]})")
    if cfg.finetune.decoder_from_text:
        model.init_decoder_from_text()
    return model, cfg, tokenizer


def run_finetune(run: Path, data_dir: Path, out_dir: Path, cfg: Config | None = None, *, resume: bool = False,
                 progress: bool = True, stop_at: int | None = None) -> TrainerState:
    """Fine-tune RUN on the train conversations of the train characters in DATA_DIR; write OUT_DIR.

    `cfg` holds the settings (default: RUN's own config); its model section must describe RUN's model.
    """
    dist = init_distributed()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if Path(run).resolve() == out_dir.resolve():
        raise PersonaeError("the fine-tuned run needs its own --out folder (it would overwrite its start)")
    model, cfg, tokenizer = model_with_decoder(run, cfg)
    model = model.to(dist.device)
    model.lock_parts(cfg.model)  # this stage's model.*.locked, on a loaded decoder too
    records = read_dialogues(data_dir / "dialogues.jsonl", split="train", character_split="train")
    cards = load_character_cards(data_dir / "characters")
    require_cards(records, cards, data_dir / "dialogues.jsonl")
    variants = _persona_swapped(cfg, data_dir, records, cards)
    dataset = RolePlayDataset(records, cards, tokenizer, image_size=cfg.model.vision.image_size,
                              max_tokens=model.text_budget(0, records[0].image is not None),
                              include_examples=cfg.finetune.include_examples, progress=progress,
                              variants=variants, image_words=_image_words(cfg, data_dir, records, tokenizer),
                              content=_content_weighting(cfg, data_dir))
    if variants and progress and dist.is_primary:
        print(f"persona swap: {len(variants) - dataset.fallbacks} of {len(records)} conversations speak with fresh "
              f"markers ({dataset.fallbacks} too long once swapped kept their own)")
    copy_cards(data_dir / "characters", out_dir / "characters", {r.character for r in records})
    if dist.is_primary:
        write_generation_config(out_dir, recommended_generation(cfg))
    task = wrap_ddp(RolePlayTask(model, cfg.finetune), dist)
    trainer = Trainer(task, model, dataset, partial(collate_roleplay, pad_id=tokenizer.pad_id), cfg, tokenizer,
                      out_dir, dist, stage="finetune", progress=progress, train_cfg=cfg.finetune.train)
    return trainer.fit(resume=resume, stop_at=stop_at)


def _image_words(cfg: Config, data_dir: Path, records: list, tokenizer: Tokenizer) -> list[list[int]] | None:
    """finetune.align_weight: the first word piece of each thing in each conversation's image (None: off)."""
    if cfg.finetune.align_weight <= 0:
        return None
    if records[0].image is None:
        raise PersonaeError("finetune.align_weight aligns image regions with words, but these conversations "
                            "have no images: set it to 0")
    kind = open_data(data_dir)
    return [first_pieces(tokenizer, kind.image_objects(record)) for record in records]


def _content_weighting(cfg: Config, data_dir: Path) -> ContentWeighting | None:
    """finetune.content_weight: how the reply loss weighs the data kind's content words (None: a plain mean)."""
    if cfg.finetune.content_weight == 1.0:
        return None
    if cfg.finetune.content_weight <= 0:
        raise PersonaeError(f"finetune.content_weight must be > 0, got {cfg.finetune.content_weight}")
    kind = open_data(data_dir)
    if not kind.content_kinds:
        raise PersonaeError(f"finetune.content_weight weighs the content words a data kind names; this folder is a "
                            f"{kind.name}, which names none: leave it at 1")
    return ContentWeighting(WordKinds(kind.word_kinds()), frozenset(kind.content_kinds), cfg.finetune.content_weight)


def _persona_swapped(cfg: Config, data_dir: Path, records: list, cards: dict) -> dict:
    """finetune.persona_swap: that fraction of the conversations rewritten with fresh markers (index -> variant)."""
    if not cfg.finetune.persona_swap:
        return {}
    swap = open_data(data_dir).persona_swap(cfg.finetune.train.seed, "finetune.persona_swap")
    return swap_conversations(records, cards, swap, cfg.finetune.persona_swap, cfg.finetune.train.seed)


def copy_cards(source: Path, target: Path, names: set[str]) -> None:
    """The run keeps the cards of the characters it was trained on, so chat finds them by name."""
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.stem in names and path.suffix in (".json", ".png"):
            shutil.copy2(path, target / path.name)
