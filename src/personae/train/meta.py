"""Meta-training stage: MAML and friends over the training characters, driven by the ordinary Trainer.

A task is one character: its support set is `meta.support` of its train conversations, its query
set `meta.query` others. Each outer step draws `meta.meta_batch` characters; the episodes are a
pure function of `(meta.train.seed, micro-step)`, so a resumed run draws exactly what it would
have drawn. The loss is the role-play reply loss in its dense form (so that `torch.func.vmap` can
batch the tasks), and the outer optimiser, schedule, logs and checkpoints are the Trainer's with
`meta.train` as their settings.

LoRA-MAML adds LoRA adapters to the decoder (rank `meta.lora_rank`) when the model has none, and
records them in `model.lora_rank` / `model.lora_alpha` so that loading the run rebuilds them. With
Meta-SGD (`meta.learn_inner_lr`) the learned inner rates are saved as `meta_lrs.safetensors`.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from personae.config import Config
from personae.data.dialogues import DialogueRecord, load_character_cards, read_dialogues, require_cards
from personae.data.episodes import EpisodeCollator, EpisodeSampler, pad_values
from personae.data.kinds import open_data
from personae.data.marker_swap import SwappedEpisodeCollator
from personae.data.roleplay import RolePlayDataset
from personae.errors import PersonaeError
from personae.meta import MetaLearner, build_meta
from personae.meta.adapt import HEAD, META_LRS_FILE, learned_rates
from personae.models.generation_config import recommended_generation, write_generation_config
from personae.models.lora import add_decoder_lora, lora_settings, parse_targets
from personae.models.model import PersonaeModel
from personae.tasks import dense_roleplay_task
from personae.train.distributed import init_distributed
from personae.train.finetune import copy_cards, model_with_decoder
from personae.train.trainer import Trainer, TrainerState

log = logging.getLogger(__name__)


class MetaStep(nn.Module):
    """The Trainer's task for meta-training: a meta-batch of (support, query) batches -> the meta-loss."""

    def __init__(self, learner: MetaLearner) -> None:
        super().__init__()
        self.learner = learner

    def forward(self, tasks: list, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return {"loss": self.learner.meta_loss(tasks)}


def adapts_lora(cfg: Config) -> bool:
    """Whether the run's meta algorithm adapts LoRA parameters (lora-maml, or maml/fomaml with inner_params=lora)."""
    return cfg.meta.algo == "lora-maml" or cfg.meta.inner_params == "lora"


def ensure_lora(model: PersonaeModel, cfg: Config, seed: int) -> bool:
    """Give the decoder LoRA adapters (meta.lora_rank, meta.lora_alpha, model.lora_targets) unless it has them.

    The adapters are recorded in cfg.model so that the saved run is rebuilt with them. B starts at
    zero, so adding them leaves the model's outputs unchanged; A is drawn with `seed`. True if added.
    """
    if lora_settings(model) is not None:
        return False
    add_decoder_lora(model, cfg.meta.lora_rank, cfg.meta.lora_alpha, seed=seed,
                     targets=parse_targets(cfg.model.lora_targets) or None)  # the run's, or the decoder's own
    cfg.model.lora_rank, cfg.model.lora_alpha = cfg.meta.lora_rank, cfg.meta.lora_alpha
    return True


def build_learner(model: PersonaeModel, cfg: Config, pad_id: int) -> MetaLearner:
    """The meta-learner of cfg.meta around the dense role-play task of `model`."""
    return build_meta(dense_roleplay_task(model, cfg.finetune), cfg.meta, head=HEAD, pad_values=pad_values(pad_id))


def episode_pool(records: list[DialogueRecord], needed: int) -> list[DialogueRecord]:
    """The conversations of the characters with at least `needed` of them (the others cannot form a task)."""
    counts = Counter(r.character for r in records)
    short = sorted(name for name, count in counts.items() if count < needed)
    if short:
        log.warning("meta-training leaves out %d character(s) with fewer than support + query = %d train "
                    "conversations: %s", len(short), needed, ", ".join(short[:8]))
    return [r for r in records if counts[r.character] >= needed]


def multitask_config(cfg: Config) -> Config:
    """Ordinary fine-tuning with the meta-training budget of CFG: the baseline meta-learning must beat.

    The same number of outer steps, each over the same number of train conversations (meta_batch
    tasks x (support + query)), with the same peak rate, warm-up and schedule. CFG is not changed.
    """
    meta, baseline = cfg.meta, copy.deepcopy(cfg)
    train = baseline.finetune.train
    train.steps, train.batch_size = meta.train.steps, meta.meta_batch * (meta.support + meta.query)
    train.lr, train.warmup_steps, train.seed = meta.train.lr, meta.train.warmup_steps, meta.train.seed
    return baseline


def _episode_batches(cfg: Config, data_dir: Path, sampler: EpisodeSampler, dataset: RolePlayDataset,
                     cards: dict, pad_id: int, max_tokens: int) -> Callable[[int], list]:
    """micro-step -> the meta-batch of (support, query) batches: plain, or persona-swapped (meta.persona_swap)."""
    n = cfg.meta.meta_batch
    if not cfg.meta.persona_swap:
        collator = EpisodeCollator(dataset, pad_id)
        return lambda micro_step: collator.meta_batch(sampler.meta_batch(micro_step, n))
    swap = open_data(data_dir).persona_swap(cfg.meta.train.seed, "meta.persona_swap")
    swapped = SwappedEpisodeCollator(dataset, pad_id, swap, cards, max_tokens=max_tokens,
                                     include_examples=cfg.finetune.include_examples)
    return lambda micro_step: swapped.meta_batch(sampler.meta_batch(micro_step, n), key=micro_step)


def _start_from_learned_rates(learner: MetaLearner, run: Path) -> None:
    """Meta-SGD rates start from RUN's own (a meta-trained run continued), else from meta.inner_lr.

    A resumed run then overwrites them with its checkpoint's.
    """
    rates = learned_rates(run) if learner.cfg.learn_inner_lr else None
    if rates is None:
        return
    try:
        learner.load_inner_lr_tensors(rates)
    except KeyError:
        log.warning("%s holds inner rates for other parameters than this run adapts; they start from "
                    "meta.inner_lr=%g instead", run / META_LRS_FILE, learner.cfg.inner_lr)
        return
    log.info("inner rates start from %s", run / META_LRS_FILE)


def run_meta_train(run: Path, data_dir: Path, out_dir: Path, cfg: Config | None = None, *, resume: bool = False,
                   progress: bool = True, stop_at: int | None = None) -> TrainerState:
    """Meta-train RUN (fine-tuned or pretrained) over the train characters of DATA_DIR; write OUT_DIR.

    `cfg` holds the settings (default: RUN's own config); its model section must describe RUN's model.
    """
    dist = init_distributed()
    if dist.distributed:
        raise PersonaeError("meta-training runs in one process for now (its second-order gradients have not "
                            "been checked under DDP); run it without torchrun")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if Path(run).resolve() == out_dir.resolve():
        raise PersonaeError("the meta-trained run needs its own --out folder (it would overwrite its start)")
    model, cfg, tokenizer = model_with_decoder(run, cfg)
    if adapts_lora(cfg):
        ensure_lora(model, cfg, cfg.meta.train.seed)
    model = model.to(dist.device)
    records = read_dialogues(data_dir / "dialogues.jsonl", split="train", character_split="train")
    cards = load_character_cards(data_dir / "characters")
    require_cards(records, cards, data_dir / "dialogues.jsonl")
    records = episode_pool(records, cfg.meta.support + cfg.meta.query)
    sampler = EpisodeSampler(records, k=cfg.meta.support, q=cfg.meta.query, seed=cfg.meta.train.seed)
    dataset = RolePlayDataset(records, cards, tokenizer, image_size=cfg.model.vision.image_size,
                              max_tokens=model.text_budget(0, records[0].image is not None),
                              include_examples=cfg.finetune.include_examples, progress=progress)
    episodes = _episode_batches(cfg, data_dir, sampler, dataset, cards, tokenizer.pad_id,
                                model.text_budget(0, records[0].image is not None))
    learner = build_learner(model, cfg, tokenizer.pad_id)
    _start_from_learned_rates(learner, Path(run))
    copy_cards(data_dir / "characters", out_dir / "characters", {r.character for r in records})
    write_generation_config(out_dir, recommended_generation(cfg))

    aux = {META_LRS_FILE.removesuffix(".safetensors"): learner.inner_lrs} if cfg.meta.learn_inner_lr else None
    trainer = Trainer(MetaStep(learner), model, None, None, cfg, tokenizer, out_dir, dist, stage="meta",
                      progress=progress, train_cfg=cfg.meta.train, batch_fn=episodes,
                      batch_items=cfg.meta.meta_batch, aux=aux)
    return trainer.fit(resume=resume, stop_at=stop_at)
