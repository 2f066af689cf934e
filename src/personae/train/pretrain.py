"""Pretraining stage: ITC + ITM + MLM on image-text pairs, driven by the Trainer."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
from torch import nn

from personae.config import Config
from personae.data.dialogues import load_character_cards, read_dialogues
from personae.data.manifest import read_pairs
from personae.data.pairs import PairDataset, collate_pairs
from personae.data.tokenizer import Tokenizer, train_tokenizer
from personae.models.model import PersonaeModel
from personae.tasks import PretrainTask
from personae.train.checkpoint import latest_checkpoint
from personae.train.distributed import DistInfo, init_distributed
from personae.train.trainer import Trainer, TrainerState

log = logging.getLogger(__name__)


def training_texts(data_dir: Path, captions: list[str]) -> list[str]:
    """The text a tokenizer may learn from: train captions and, when the folder has role-play data,
    the train conversations and the cards of the train characters (never held-out ones)."""
    texts = list(captions)
    dialogues_path = Path(data_dir) / "dialogues.jsonl"
    if dialogues_path.exists():
        records = read_dialogues(dialogues_path, split="train", character_split="train", check_images=False)
        texts += [text for r in records for t in r.turns for text in (t.user, t.reply)]
        cards = load_character_cards(Path(data_dir) / "characters")
        for name in sorted({r.character for r in records} & set(cards)):
            texts += [value for value in cards[name].prompt_fields().values() if value]
    return texts


def prepare_tokenizer(texts: list[str], cfg: Config, tokenizer_dir: Path | None) -> Tokenizer:
    """Use an existing tokenizer folder/file, the Hugging Face text tower's own, or train a byte-level BPE.

    A Hugging Face text tower (model.text.kind hf) reads captions with its folder's tokenizer, so
    its embeddings and MLM mask token are the ones it was trained with.
    """
    if tokenizer_dir is None and cfg.model.text.kind == "hf":
        tokenizer_dir = Path(cfg.model.text.path)
    if tokenizer_dir is not None:
        path = Path(tokenizer_dir)
        return Tokenizer.from_file(path) if path.is_file() else Tokenizer.from_pretrained_dir(path)
    return train_tokenizer(texts, vocab_size=cfg.pretrain.tokenizer_vocab)


def wrap_ddp(task: nn.Module, dist: DistInfo) -> nn.Module:
    """DistributedDataParallel around the task when there are several processes, else the task."""
    if not dist.distributed:
        return task
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(task, device_ids=device_ids)


def run_pretrain(data_dir: Path, out_dir: Path, cfg: Config, *, resume: bool = False,
                 tokenizer_dir: Path | None = None, skip_bad: bool = False, progress: bool = True,
                 stop_at: int | None = None) -> TrainerState:
    """Pretrain on the train split of DATA_DIR/pairs.jsonl; write the run to OUT_DIR."""
    dist = init_distributed()
    manifest = read_pairs(Path(data_dir) / "pairs.jsonl", skip_bad=skip_bad).filter("train")
    checkpoint = latest_checkpoint(out_dir) if resume else None
    if checkpoint is not None:  # the resumed run keeps the vocabulary it started with
        tokenizer_dir = checkpoint / "tokenizer.json"
    tokenizer = prepare_tokenizer(training_texts(data_dir, [r.caption for r in manifest]), cfg, tokenizer_dir)
    cfg.model.text.vocab_size = tokenizer.vocab_size
    torch.manual_seed(cfg.train.seed)
    model = PersonaeModel(cfg.model).to(dist.device)
    dataset = PairDataset(manifest, tokenizer, image_size=cfg.model.vision.image_size,
                          max_text_len=cfg.model.text.max_len, progress=progress)
    task = wrap_ddp(PretrainTask(model, tokenizer, cfg.pretrain, dist.rank, dist.world_size), dist)
    trainer = Trainer(task, model, dataset, partial(collate_pairs, pad_id=tokenizer.pad_id), cfg,
                      tokenizer, out_dir, dist, stage="pretrain", progress=progress)
    return trainer.fit(resume=resume, stop_at=stop_at)
