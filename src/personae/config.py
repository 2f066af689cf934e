"""Dataclass configs with a strict dict/YAML/JSON round trip and dotted CLI overrides."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml


class ConfigError(ValueError):
    """A config key, value or preset is wrong; the message names it and the valid choices."""


@dataclass
class VisionCfg:
    """ViT-style image encoder: patches of the image are the regions v_i."""

    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0


@dataclass
class TextCfg:
    """Transformer text encoder giving the word features w_j."""

    vocab_size: int = 4096  # overwritten by the tokenizer's size when a run starts
    max_len: int = 48
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0


@dataclass
class FusionCfg:
    """How image regions and words are fused: 'cross' (bidirectional) or 'single' (X = [V; W])."""

    kind: str = "cross"
    region_pool: int = 1  # average-pool the patch grid by this factor before fusion (cheaper ITM/MLM)
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0


@dataclass
class DecoderCfg:
    """Causal decoder for role-play replies; built only when `enabled` (the role-play stage turns it on)."""

    enabled: bool = False
    conditioning: str = "prefix"  # image regions projected and placed before the prompt (LLaVA-style)
    image_pool: int = 1  # average-pool the patch grid by this factor before the prefix (fewer positions)
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    max_len: int = 256
    shift: int = 0  # q, k, v also mix in those of this many previous tokens (models/decoder.py)


@dataclass
class ModelCfg:
    """The composed multimodal model."""

    vision: VisionCfg = field(default_factory=VisionCfg)
    text: TextCfg = field(default_factory=TextCfg)
    fusion: FusionCfg = field(default_factory=FusionCfg)
    decoder: DecoderCfg = field(default_factory=DecoderCfg)
    embed_dim: int = 128  # shared ITC embedding size
    dropout: float = 0.0
    init_temperature: float = 0.07
    # LoRA adapters on the decoder (0: none). Recorded by `meta-train --algo lora-maml` so that
    # loading rebuilds the model with its adapters before reading the weights; choose the rank
    # to add with meta.lora_rank rather than setting this by hand.
    lora_rank: int = 0
    lora_alpha: float = 8.0


@dataclass
class TrainCfg:
    """Optimisation and logging settings shared by every stage."""

    steps: int = 600
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 50
    clip_grad_norm: float = 1.0
    bf16: bool = False
    seed: int = 0
    log_every: int = 10
    save_every: int = 200
    eval_every: int = 0
    num_workers: int = 0
    compile: bool = False


@dataclass
class PretrainCfg:
    """Weights and settings of the three pretraining objectives."""

    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    mask_prob: float = 0.15
    tokenizer_vocab: int = 2048


@dataclass
class FinetuneCfg:
    """Role-play fine-tuning: its own optimisation settings and what the prompts hold."""

    train: TrainCfg = field(default_factory=lambda: TrainCfg(steps=800, batch_size=32, lr=1e-3, warmup_steps=50))
    include_examples: bool = True  # the card's example messages go into every prompt
    freeze_vision: bool = False
    max_new_tokens: int = 64  # room kept free in the decoder for a reply when prompts are cut
    # greedy replies in evaluation and chat: no n-gram more than this many times in a row (0: off;
    # personae.models.next_token.ban_loops)
    max_repeats: int = 3
    # scene worlds: this fraction of the conversations speaks with freshly drawn markers (in card and
    # replies alike, personae.world.persona_swap), so the model learns to take a voice from the card
    persona_swap: float = 0.0


@dataclass
class MetaCfg:
    """Meta-training over characters: the fields of personae.meta.MetaCfg plus the outer loop's settings.

    `train` is the outer optimisation (its lr is the meta rate beta, its steps the meta-batches);
    its batch_size is not used: a step's data is `meta_batch` tasks of `support` + `query`
    conversations each.
    """

    train: TrainCfg = field(default_factory=lambda: TrainCfg(steps=200, batch_size=4, lr=3e-4, warmup_steps=10,
                                                             log_every=5, save_every=50))
    algo: str = "lora-maml"  # a key of personae.meta.META
    inner_steps: int = 3
    inner_lr: float = 0.05
    learn_inner_lr: bool = False  # Meta-SGD: learned per-element inner rates, saved as meta_lrs.safetensors
    inner_optimizer: str = "sgd"  # sgd | adam: the inner loop's update, in meta-training and when adapting
    first_order: bool = False
    adapt: str = "auto"  # all | head | lora; auto: the algorithm's own
    meta_batch: int = 4
    support: int = 5
    query: int = 5
    vmap: str = "auto"  # auto | on | off (off loops over tasks; on a CPU the loop can be faster)
    randomness: str = "different"
    lora_rank: int = 4  # the adapters meta-train adds for lora-maml (recorded in model.lora_rank)
    lora_alpha: float = 8.0
    # scene worlds: each episode's character speaks with freshly drawn markers (personae.world.persona_swap),
    # so that tasks are as new to the model as held-out characters are
    persona_swap: bool = False


@dataclass
class Config:
    """Everything a run needs; saved next to its checkpoints as config.json."""

    model: ModelCfg = field(default_factory=ModelCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    pretrain: PretrainCfg = field(default_factory=PretrainCfg)
    finetune: FinetuneCfg = field(default_factory=FinetuneCfg)
    meta: MetaCfg = field(default_factory=MetaCfg)
    preset: str = "custom"


T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON-friendly dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build `cls` from a dict; unknown keys and wrongly typed values raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{path}' needs a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no", "on", "off"}:
            return value.lower() in {"true", "1", "yes", "on"}
        raise ConfigError(f"config key '{path}' needs true/false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"config key '{path}' needs a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{path}' needs {hint.__name__}, got {value!r}") from None
        if hint is int:
            if not number.is_integer():
                raise ConfigError(f"config key '{path}' needs an integer, got {value!r}")
            return int(number)
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{path}' needs a string, got {value!r}")
        return value
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split 'train.lr=3e-4' (a leading '--' is allowed) into (['train', 'lr'], parsed value)."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override '{text}' must look like --section.key=value")
    key, raw = body.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw  # YAML 1.1 reads on/off/yes/no as booleans: keep the word (meta.vmap=off is a string)
    return key.split("."), value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Return a new Config with dotted overrides applied; bad keys and values raise ConfigError."""
    data = to_dict(cfg)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, key in enumerate(keys[:-1]):
            if not isinstance(node.get(key), dict):
                raise ConfigError(f"unknown config section '{'.'.join(keys[: i + 1])}' in override '{text}'")
            node = node[key]
        if keys[-1] not in node:
            raise ConfigError(
                f"unknown config key '{'.'.join(keys)}' in override '{text}'; "
                f"valid keys here: {', '.join(node)}"
            )
        node[keys[-1]] = value
    return from_dict(Config, data)


def list_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    folder = resources.files("personae") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> Config:
    """Load a shipped preset by name ('tiny', 'small', 'base', ...) or a YAML/JSON file path."""
    path = Path(name)
    if path.suffix in {".yaml", ".yml", ".json"} and path.exists():
        text, label = path.read_text(), str(path)
    else:
        presets = list_presets()
        if name not in presets:
            raise ConfigError(f"unknown preset '{name}'; shipped presets: {', '.join(presets)}")
        text, label = (resources.files("personae") / "presets" / f"{name}.yaml").read_text(), name
    data = yaml.safe_load(text) or {}
    data.setdefault("preset", label)
    return from_dict(Config, data)


def save_config(cfg: Config, path: Path) -> None:
    """Write the config as JSON."""
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def load_config(path: Path) -> Config:
    """Read a config written by save_config (or any YAML/JSON file of the same shape)."""
    return from_dict(Config, yaml.safe_load(Path(path).read_text()) or {})
