"""Adapt a run to a new character from its card and k example conversations: `personae adapt`.

The inner loop is the meta-learning one (SGD, or Adam when `meta.inner_optimizer` says so, on the
dense reply loss, `torch.func`, no module copy), run for `steps` steps on one support batch of the
first k example conversations.
Which parameters adapt follows the run's meta settings (:class:`AdaptSpec`):

* `meta.adapt` when it is set, else the algorithm's own: LoRA adapters for `lora-maml`, the final
  LayerNorm `decoder.ln_f` for `anil`, every parameter for `maml` / `fomaml` / `reptile`.
* A run that has no LoRA layers but adapts LoRA (a fine-tuned run: the config's default algorithm
  is `lora-maml`) gets fresh adapters first (rank `meta.lora_rank`, A drawn with `meta.train.seed`,
  B = 0, so they start as a no-op); the adapter file then holds A and B and records the rank, and
  loading it adds the same adapters before copying them in.
* The inner rate is `meta.inner_lr`, or the learned Meta-SGD rates (`meta_lrs.safetensors`) when
  the run has them, or the `lr` given.

The result, `RUN/adapters/<character>.safetensors`, holds only the adapted tensors (named as in the
model, e.g. `decoder.blocks.0.attn.qkv.lora_B`); the card is copied to `RUN/characters/`, so
`personae chat RUN --character <id or name>` finds both.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from personae.config import Config
from personae.data.cards import CharacterCard, load_card
from personae.data.dialogues import DialogueRecord, read_dialogues
from personae.data.roleplay import RolePlayDataset, collate_roleplay
from personae.data.tokenizer import Tokenizer
from personae.errors import DataError, PersonaeError
from personae.meta import inner_trajectory, module_loss, select_names
from personae.meta.maml import ADAPT_CHOICES
from personae.models.io import load_model
from personae.models.lora import add_lora, apply_adapter, lora_settings, save_adapter
from personae.models.model import PersonaeModel
from personae.tasks import dense_roleplay_task
from personae.train.meta import HEAD, learned_rates

ADAPTERS_DIR = "adapters"
TASK_PREFIX = "model."  # RolePlayTask holds the model as .model; adapter files use the model's own names
ALGO_ADAPTS = {"lora-maml": "lora", "anil": "head"}  # every other algorithm adapts all parameters


@dataclass(frozen=True)
class AdaptSpec:
    """How a run adapts to a character: which parameters, at what inner rate, with what fresh LoRA."""

    mode: str  # all | head | lora
    lr: float
    lora_rank: int
    lora_alpha: float
    seed: int = 0
    optimizer: str = "sgd"  # the inner loop's update: sgd | adam (meta.inner_optimizer)

    @classmethod
    def of(cls, cfg: Config, mode: str | None = None, lr: float | None = None) -> AdaptSpec:
        """The run's own settings (see the module docstring); `mode` / `lr` override them."""
        if mode in (None, "auto"):
            mode = cfg.meta.adapt if cfg.meta.adapt != "auto" else ALGO_ADAPTS.get(cfg.meta.algo, "all")
        if mode not in ADAPT_CHOICES:
            raise PersonaeError(f"unknown adaptation parameters {mode!r}; choose one of auto, {', '.join(ADAPT_CHOICES)}")
        if lr is not None and lr <= 0:
            raise PersonaeError(f"the adaptation rate must be > 0, got {lr}")
        rank = cfg.model.lora_rank or cfg.meta.lora_rank
        alpha = cfg.model.lora_alpha if cfg.model.lora_rank else cfg.meta.lora_alpha
        return cls(mode, cfg.meta.inner_lr if lr is None else lr, rank, alpha, cfg.meta.train.seed,
                   cfg.meta.inner_optimizer)


class Adaptation:
    """A model ready to adapt: its dense reply loss, the names the inner loop adapts, and their rate.

    `added_lora` says whether fresh adapters were put on the model (it had none). The model is
    switched to eval mode (no dropout while adapting) and is not modified by `steps`.
    """

    def __init__(self, model: PersonaeModel, cfg: Config, spec: AdaptSpec,
                 learned_lrs: Mapping[str, torch.Tensor] | None = None) -> None:
        self.model, self.spec = model.eval(), spec
        self.added_lora = False
        if spec.mode == "lora" and lora_settings(model) is None:
            torch.manual_seed(spec.seed)
            add_lora(model, targets=("decoder",), rank=spec.lora_rank, alpha=spec.lora_alpha)
            self.added_lora = True
        self.task = dense_roleplay_task(model, cfg.finetune)
        self.loss_fn = module_loss(self.task)
        self.names = select_names(self.task, spec.mode, HEAD)
        self.lr: float | dict[str, torch.Tensor] = spec.lr
        if learned_lrs is not None and set(learned_lrs) == set(self.names):
            device = next(model.parameters()).device
            self.lr = {name: value.to(device) for name, value in learned_lrs.items()}

    def params(self) -> dict[str, torch.Tensor]:
        """Every parameter of the task module by name (detached: adaptation keeps no graph to them)."""
        return {name: p.detach() for name, p in self.task.named_parameters()}

    def steps(self, support: Mapping[str, torch.Tensor], steps: int) -> Iterator[dict[str, torch.Tensor]]:
        """The fast weights (adapted names only) after 0, 1, ..., `steps` inner steps."""
        yield from inner_trajectory(self.params(), self.names, lambda p: self.loss_fn(p, support), steps=steps,
                                    lr=self.lr, create_graph=False, optimizer=self.spec.optimizer)

    @torch.no_grad()
    def loss(self, fast: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> float:
        """The mean reply loss (per token) on a batch with the fast weights in place."""
        return float(self.loss_fn({**self.params(), **fast}, batch))

    def model_tensors(self, fast: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fast weights named as in the model (what adapter files and apply_adapter use)."""
        return {name.removeprefix(TASK_PREFIX): value for name, value in fast.items()}

    def adapted_model(self, fast: Mapping[str, torch.Tensor]) -> PersonaeModel:
        """A copy of the model with the fast weights copied in (for generation)."""
        model = copy.deepcopy(self.model)
        apply_adapter(model, self.model_tensors(fast))
        return model.eval()


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


def support_batch(records: list[DialogueRecord], card: CharacterCard, model: PersonaeModel, cfg: Config,
                  tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """One role-play batch of the example conversations, prompts assembled as in training."""
    cards = {r.character: card for r in records}
    dataset = RolePlayDataset(records, cards, tokenizer, image_size=cfg.model.vision.image_size,
                              max_tokens=model.text_budget(0, records[0].image is not None),
                              include_examples=cfg.finetune.include_examples, progress=False)
    batch = collate_roleplay([dataset[i] for i in range(len(dataset))], tokenizer.pad_id)
    device = next(model.parameters()).device
    return {key: value.to(device) for key, value in batch.items()}


def adapter_path(run: Path, character_id: str) -> Path:
    """Where a character's adapter lives in a run: RUN/adapters/<id>.safetensors."""
    return Path(run) / ADAPTERS_DIR / f"{character_id}.safetensors"


def adapt_character(run: Path, card_path: Path, examples_path: Path, *, k: int = 5, steps: int = 10,
                    lr: float | None = None, params: str | None = None, progress: bool = True,
                    device: str | torch.device = "cpu",
                    on_progress: Callable[[float, str], None] | None = None, copy_card: bool = True) -> Path:
    """Adapt RUN to the character of CARD from the first k conversations of EXAMPLES; the adapter's path.

    Writes RUN/adapters/<id>.safetensors (id: the card file's stem) and copies the card to
    RUN/characters/ (unless `copy_card` is False: the server keeps its cards where they are).
    `params` chooses what adapts (auto | all | head | lora), `lr` the inner rate.
    """
    run, card_path = Path(run), Path(card_path)
    if steps < 0:
        raise PersonaeError(f"steps must be >= 0, got {steps}")
    card = load_card(card_path)
    character_id = card_path.stem
    records = read_examples(Path(examples_path), character_id, card, k)
    model, cfg, tokenizer = load_model(run, device)
    if model.decoder is None:
        raise PersonaeError(f"{run} has no role-play decoder: fine-tune (or meta-train) it before adapting")
    spec = AdaptSpec.of(cfg, params, lr)
    adaptation = Adaptation(model, cfg, spec, None if lr is not None else learned_rates(run))
    support = support_batch(records, card, model, cfg, tokenizer)
    bar = tqdm(total=steps, desc=f"adapting {character_id}", unit="step", disable=not progress)
    fast = {}
    for step, fast in enumerate(adaptation.steps(support, steps)):
        if step:
            bar.update(1)
        if on_progress is not None and steps:
            on_progress(step / steps, f"step {step}/{steps}")
    bar.set_postfix(support_loss=f"{adaptation.loss(fast, support):.3f}")
    bar.close()
    learned = isinstance(adaptation.lr, dict)
    metadata = {"character": character_id, "name": card.name, "algo": cfg.meta.algo, "params": spec.mode,
                "k": k, "steps": steps, "lr": "learned" if learned else spec.lr, "optimizer": spec.optimizer,
                "lora_added": adaptation.added_lora}
    if spec.mode == "lora":
        metadata |= {"lora_rank": spec.lora_rank, "lora_alpha": spec.lora_alpha}
    path = save_adapter(adapter_path(run, character_id), adaptation.model_tensors(fast), metadata)
    target = run / "characters" / card_path.name
    if copy_card and target.resolve() != card_path.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(card_path, target)
    return path

