"""Adapt a loaded model to a new character in memory: card + example conversations -> adapter tensors.

The inner loop is the meta-learning one (SGD, or Adam when `meta.inner_optimizer` says so, on the
dense reply loss, `torch.func`, no module copy), run for `steps` steps on one support batch of
the example conversations. Which parameters adapt is `meta.inner_params` (:class:`AdaptSpec`):

* `all` | `head` | `lora`, or `auto`: the algorithm's own (LoRA adapters for `lora-maml`, the
  final LayerNorm `decoder.ln_f` for `anil`, every parameter for `maml` / `fomaml` / `reptile`).
* A model that has no LoRA layers but adapts LoRA (a fine-tuned run: the config's default
  algorithm is `lora-maml`) gets fresh adapters first (rank `meta.lora_rank`, A drawn with
  `meta.train.seed`, B = 0, so they start as a no-op); the metadata records the rank, and loading
  an adapter adds the same adapters before copying it in.
* The inner rate is `meta.inner_lr`, or the learned Meta-SGD rates (`meta_lrs.safetensors`)
  when the run has them, or the `lr` given.

:func:`adapt_to_character` touches no file; `personae adapt` (personae.train.adapt) wraps it for
files and the server calls it on the model it holds.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from personae.config import INNER_PARAMS, Config
from personae.data.cards import CharacterCard
from personae.data.dialogues import DialogueRecord
from personae.data.images import normalize_pixels
from personae.data.roleplay import RolePlayDataset, collate_roleplay
from personae.data.tokenizer import Tokenizer
from personae.errors import PersonaeError
from personae.meta.maml import inner_trajectory, module_loss, select_names
from personae.models.lora import add_decoder_lora, apply_adapter, lora_settings, reset_decoder_lora
from personae.models.model import PersonaeModel
from personae.tasks import dense_roleplay_task

META_LRS_FILE = "meta_lrs.safetensors"
# ANIL's head, named inside RolePlayTask (which holds the model as .model): the own decoder's final
# norm, or a Hugging Face LM's (Llama / Qwen2 / Gemma: model.norm; GPT-2: transformer.ln_f)
HEAD = ("model.decoder.ln_f", "model.decoder.lm.model.norm", "model.decoder.lm.transformer.ln_f")
TASK_PREFIX = "model."  # RolePlayTask holds the model as .model; adapter tensors use the model's own names
ALGO_INNER_PARAMS = {"lora-maml": "lora", "anil": "head"}  # every other algorithm adapts all parameters


@dataclass(frozen=True)
class AdaptSpec:
    """How a run adapts to a character: which parameters, at what inner rate, with what fresh LoRA."""

    inner_params: str  # all | head | lora (auto resolved)
    lr: float  # the inner rate when no learned rates are used
    lora_rank: int  # rank of fresh adapters (a model without LoRA that adapts lora)
    lora_alpha: float  # their scale
    seed: int = 0  # seeds the draw of fresh adapters
    optimizer: str = "sgd"  # the inner loop's update: sgd | adam (meta.inner_optimizer)

    @classmethod
    def of(cls, cfg: Config, inner_params: str | None = None, lr: float | None = None) -> AdaptSpec:
        """The run's own settings (see the module docstring); `inner_params` / `lr` override them."""
        if inner_params in (None, "auto"):
            inner_params = cfg.meta.inner_params
        if inner_params == "auto":
            inner_params = ALGO_INNER_PARAMS.get(cfg.meta.algo, "all")
        if inner_params not in INNER_PARAMS:
            raise PersonaeError(f"unknown inner_params {inner_params!r}; choose one of {', '.join(INNER_PARAMS)}")
        if lr is not None and lr <= 0:
            raise PersonaeError(f"the adaptation rate must be > 0, got {lr}")
        rank = cfg.model.lora_rank or cfg.meta.lora_rank
        alpha = cfg.model.lora_alpha if cfg.model.lora_rank else cfg.meta.lora_alpha
        return cls(inner_params, cfg.meta.inner_lr if lr is None else lr, rank, alpha, cfg.meta.train.seed,
                   cfg.meta.inner_optimizer)


class Adaptation:
    """A model ready to adapt: its dense reply loss, the names the inner loop adapts, and their rate.

    `added_lora` says whether the adapted LoRA layers are fresh ones (the run carries none of its
    own): they are added to a model without LoRA, or, where a server has put no-op placeholders on
    the model, those are drawn afresh the same way. The model is switched to eval mode (no dropout
    while adapting) and is not modified by `steps`.
    """

    def __init__(self, model: PersonaeModel, cfg: Config, spec: AdaptSpec,
                 learned_lrs: Mapping[str, torch.Tensor] | None = None) -> None:
        self.model, self.spec = model.eval(), spec
        self.added_lora = spec.inner_params == "lora" and not cfg.model.lora_rank  # the run has no LoRA of its own
        if self.added_lora and lora_settings(model) is None:
            add_decoder_lora(model, spec.lora_rank, spec.lora_alpha, seed=spec.seed)
        elif self.added_lora:  # no-op placeholders (a server's): start from the same fresh draw
            reset_decoder_lora(model, spec.seed)
        self.task = dense_roleplay_task(model, cfg.finetune)
        self.loss_fn = module_loss(self.task)
        self.names = select_names(self.task, spec.inner_params, HEAD)
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


@dataclass
class CharacterAdapter:
    """The result of adapting to a character: tensors named as in the model, and the file metadata."""

    tensors: dict[str, torch.Tensor]  # the adapted parameters only
    metadata: dict[str, Any] = field(default_factory=dict)  # what an adapter file records (strings once saved)
    support_loss: float = float("nan")  # the reply loss on the support batch after the last step


def meta_lrs_by_name(path: Path) -> dict[str, torch.Tensor]:
    """Learned inner rates from a meta_lrs.safetensors file, by the task module's parameter names."""
    return {key.replace("/", "."): value for key, value in load_file(str(path)).items()}


def learned_rates(run: Path) -> dict[str, torch.Tensor] | None:
    """The Meta-SGD rates a run learned (RUN/meta_lrs.safetensors), or None."""
    path = Path(run) / META_LRS_FILE
    return meta_lrs_by_name(path) if path.is_file() else None


def support_batch(records: Sequence[DialogueRecord], card: CharacterCard, model: PersonaeModel, cfg: Config,
                  tokenizer: Tokenizer, images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One role-play batch of the example conversations, prompts assembled as in training.

    Images come from the records' files, or, for records without one, from `images`: uint8
    (N, 3, S, S) pixels, one per record, already at the model's image size (e.g. uploads).
    """
    if images is not None and (len(images) != len(records) or any(r.image is not None for r in records)):
        raise PersonaeError(f"{len(images)} in-memory images for {len(records)} examples: give one per "
                            "example, and only for examples without an image file")
    with_image = images is not None or records[0].image is not None
    cards = {r.character: card for r in records}
    dataset = RolePlayDataset(records, cards, tokenizer, image_size=cfg.model.vision.image_size,
                              max_tokens=model.text_budget(0, with_image),
                              include_examples=cfg.finetune.include_examples, progress=False)
    batch = collate_roleplay([dataset[i] for i in range(len(dataset))], tokenizer.pad_id)
    if images is not None:
        batch["pixel_values"] = normalize_pixels(images)
    device = next(model.parameters()).device
    return {key: value.to(device) for key, value in batch.items()}


def adapt_to_character(model: PersonaeModel, cfg: Config, tokenizer: Tokenizer, card: CharacterCard,
                       records: Sequence[DialogueRecord], *, character_id: str, steps: int = 10,
                       spec: AdaptSpec | None = None, learned_lrs: Mapping[str, torch.Tensor] | None = None,
                       images: torch.Tensor | None = None,
                       on_progress: Callable[[float, str], None] | None = None,
                       step_guard: Callable[[], contextlib.AbstractContextManager] | None = None) -> CharacterAdapter:
    """Adapt a loaded model to a character from its example conversations; nothing is read or written.

    `spec` defaults to the run's own (AdaptSpec.of(cfg)); `learned_lrs` (a run's Meta-SGD rates,
    see learned_rates) replace spec.lr when they cover exactly the adapted names. The model's
    weights are not changed, except that a LoRA-free model that adapts LoRA gets fresh no-op
    adapters (metadata "lora_added"). `step_guard()` is entered around every inner step (the
    server passes the lock its decoding thread holds, since the inner loop swaps the module's
    parameters for the duration of a call).
    """
    if steps < 0:
        raise PersonaeError(f"steps must be >= 0, got {steps}")
    if model.decoder is None:
        raise PersonaeError("the model has no role-play decoder: fine-tune (or meta-train) it before adapting")
    if not records:
        raise PersonaeError("no example conversation to adapt from")
    spec = spec or AdaptSpec.of(cfg)
    guard = step_guard or contextlib.nullcontext
    with guard():
        adaptation = Adaptation(model, cfg, spec, learned_lrs)
    support = support_batch(records, card, model, cfg, tokenizer, images)
    trajectory, fast = adaptation.steps(support, steps), {}
    for step in range(steps + 1):
        with guard():
            fast = next(trajectory)
        if on_progress is not None and steps:
            on_progress(step / steps, f"step {step}/{steps}")
    with guard():
        support_loss = adaptation.loss(fast, support)
    learned = isinstance(adaptation.lr, dict)
    metadata: dict[str, Any] = {"character": character_id, "name": card.name, "algo": cfg.meta.algo,
                                "inner_params": spec.inner_params, "k": len(records), "steps": steps,
                                "lr": "learned" if learned else spec.lr, "optimizer": spec.optimizer,
                                "lora_added": adaptation.added_lora}
    if spec.inner_params == "lora":
        metadata |= {"lora_rank": spec.lora_rank, "lora_alpha": spec.lora_alpha}
    tensors = {name: value.detach() for name, value in adaptation.model_tensors(fast).items()}
    return CharacterAdapter(tensors, metadata, support_loss)
