"""Dataclass configs with a strict dict/YAML/JSON round trip and dotted CLI overrides."""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config key, value or preset is wrong; the message names it and the valid choices."""


# The values of the choice-valued keys. The registries downstream (personae.meta.META,
# personae.models.fusion.FUSIONS, ...) must have exactly these keys (tests/unit/test_config.py).
META_ALGOS = ("maml", "fomaml", "reptile", "anil", "lora-maml")
FUSION_KINDS = ("cross", "single")
INNER_PARAMS = ("auto", "all", "head", "lora")  # auto: the algorithm's own (lora-maml: lora, anil: head, else all)
INNER_OPTIMIZERS = ("sgd", "adam")
VMAP_MODES = ("auto", "on", "off")
RANDOMNESS_MODES = ("different", "same", "error")
DECODER_KINDS = ("own", "hf")  # own: personae's decoder; hf: a local HF causal LM folder (models/hf_decoder.py)
VISION_KINDS = ("own", "clip", "siglip", "efficientnet")  # own: personae's ViT; clip / siglip: a local HF folder
# (models/hf_towers.py); efficientnet: EfficientNet-Lite0 written here (models/efficientnet.py)
TEXT_KINDS = ("own", "hf")  # own: personae's encoder; hf: a local BERT-family folder (AutoModel)
TEXT_POOLINGS = ("cls", "mean")  # the text embedding for ITC: the first token's state, or the mean of the real tokens

# Keys that older runs' config.json may hold and that nothing reads any more: load_config drops
# them with a note (only while the schema has no field of that name); anywhere else they are unknown.
REMOVED_KEYS = ("train.eval_every", "finetune.train.eval_every", "meta.train.eval_every",
                "model.decoder.conditioning", "model.decoder.copy")
# Keys of older runs that live on under a new name: load_config moves them, with a note.
# finetune.freeze_vision said what model.vision.locked says (the fine-tune stage applies its model
# section's locks to the loaded run, personae.models.model.PersonaeModel.lock_parts).
RENAMED_KEYS = {"meta.adapt": "meta.inner_params", "finetune.freeze_vision": "model.vision.locked"}


def choice(default: str, choices: tuple[str, ...]) -> Any:
    """A dataclass field that only takes one of `choices` (checked by from_dict)."""
    if default not in choices:
        raise ConfigError(f"default {default!r} is not one of {', '.join(choices)}")
    return field(default=default, metadata={"choices": choices})


@dataclass
class VisionCfg:
    """ViT-style image encoder: patches of the image are the regions v_i."""

    # own: personae's ViT trained here; clip / siglip: CLIPVisionModel / SiglipVisionModel from `path`;
    # efficientnet: EfficientNet-Lite0 (ImageNet) from `path`
    kind: str = choice("own", VISION_KINDS)
    # clip / siglip only: a local folder with config.json, the weights and (optionally)
    # preprocessor_config.json (never downloaded); image_size / patch_size / width are then the folder's own.
    # efficientnet: the folder `personae models prepare efficientnet-lite0` prints (or the package's .pth);
    # the feature map's cells are the regions (stride 32: patch_size 32, width 1280; image_size is kept)
    path: str = ""
    locked: bool = False  # the tower's weights stay fixed (no gradient, always in eval mode), e.g. a pretrained CLIP
    image_size: int = 64  # images are resized to this many pixels a side
    patch_size: int = 8  # pixels a side of one patch (one region v_i)
    width: int = 128  # feature size of the tower
    depth: int = 2  # transformer blocks
    heads: int = 4  # attention heads per block
    mlp_ratio: float = 4.0  # MLP hidden width / width


@dataclass
class TextCfg:
    """Transformer text encoder giving the word features w_j."""

    kind: str = choice("own", TEXT_KINDS)  # own: personae's encoder trained here; hf: the AutoModel in `path`
    # hf only: a local BERT-family folder with config.json, the weights and its tokenizer (never
    # downloaded); captions are tokenized with that tokenizer, and width / depth / heads are the folder's own
    path: str = ""
    pooling: str = choice("cls", TEXT_POOLINGS)  # the ITC text embedding: cls (first token) or mean (real tokens)
    locked: bool = False  # LiT: the tower's weights stay fixed (no gradient, always in eval mode)
    # overwritten by the tokenizer's size when a run starts; hf: 0 or less than the folder's
    # vocabulary means the folder's own, more grows its embeddings (special tokens personae adds)
    vocab_size: int = 4096
    max_len: int = 48  # tokens of a caption (longer ones are cut)
    width: int = 128  # feature size of the tower
    depth: int = 2  # transformer blocks
    heads: int = 4  # attention heads per block
    mlp_ratio: float = 4.0  # MLP hidden width / width


@dataclass
class FusionCfg:
    """How image regions and words are fused: 'cross' (bidirectional) or 'single' (X = [V; W])."""

    kind: str = choice("cross", FUSION_KINDS)  # cross: bidirectional cross-attention; single: one stream [V; W]
    region_pool: int = 1  # average-pool the patch grid by this factor before fusion (cheaper ITM/MLM)
    depth: int = 2  # fusion layers
    heads: int = 4  # attention heads per fusion layer
    mlp_ratio: float = 4.0  # MLP hidden width / width


@dataclass
class DecoderCfg:
    """Causal decoder for role-play replies; the image regions are a prefix before the prompt (LLaVA-style)."""

    enabled: bool = False  # build the decoder (the role-play stage turns it on)
    kind: str = choice("own", DECODER_KINDS)  # own: trained from scratch here; hf: the causal LM in `path`
    # hf only: a local folder with config.json, the weights and a tokenizer with a chat template
    # (never downloaded); the width / depth / heads / mlp_ratio / shift keys are then the folder's own
    path: str = ""
    image_pool: int = 1  # average-pool the patch grid by this factor before the prefix (fewer positions)
    width: int = 128  # feature size of the decoder
    depth: int = 2  # transformer blocks
    heads: int = 4  # attention heads per block
    mlp_ratio: float = 4.0  # MLP hidden width / width
    max_len: int = 256  # positions: image prefix + prompt + reply
    shift: int = 0  # q, k, v also mix in those of this many previous tokens (models/decoder.py)
    # the decoder's own weights stay fixed; its image projector and LoRA adapters (model.lora_rank)
    # still train: a LoRA fine-tune of a pretrained LM
    locked: bool = False


@dataclass
class ModelCfg:
    """The composed multimodal model."""

    vision: VisionCfg = field(default_factory=VisionCfg)  # the image tower
    text: TextCfg = field(default_factory=TextCfg)  # the text tower
    fusion: FusionCfg = field(default_factory=FusionCfg)  # image-text fusion for ITM and MLM
    decoder: DecoderCfg = field(default_factory=DecoderCfg)  # the role-play decoder
    embed_dim: int = 128  # shared ITC embedding size
    dropout: float = 0.0  # dropout rate in every tower
    init_temperature: float = 0.07  # initial ITC temperature tau (learned)
    # LoRA adapters on the decoder (0: none). Recorded by meta-training when it adapts LoRA so that
    # loading rebuilds the model with its adapters before reading the weights; choose the rank
    # to add with meta.lora_rank rather than setting this by hand.
    lora_rank: int = 0
    lora_alpha: float = 8.0  # LoRA scale: the adapter's output is multiplied by lora_alpha / lora_rank
    # the decoder's linear layers LoRA wraps, comma-separated names or dotted-path ends (e.g.
    # "q_proj,v_proj", "mlp.fc"); empty: the decoder's defaults (own decoder: attn.qkv,attn.proj,
    # mlp.fc,mlp.proj; Hugging Face LMs: q_proj,k_proj,v_proj,o_proj, GPT-2: c_attn,c_proj)
    lora_targets: str = ""


@dataclass
class TrainCfg:
    """Optimisation and logging settings of one stage (train: pretraining; finetune.train, meta.train)."""

    steps: int = 600  # optimizer steps
    batch_size: int = 64  # examples per micro-batch and process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    weight_decay: float = 0.05  # AdamW weight decay on matrices (not on vectors and scalars)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas
    warmup_steps: int = 50  # linear warm-up steps before the cosine decay
    clip_grad_norm: float = 1.0  # clip the gradient norm to this (0: no clipping)
    # autocast the forward and backward passes to bfloat16 on the run's device (CPU or CUDA); the
    # weights, their gradients, the optimizer and the losses stay float32
    bf16: bool = False
    # recompute each block's activations in the backward pass instead of keeping them (less memory,
    # about a third more compute): personae's own blocks through torch.utils.checkpoint, Hugging Face
    # models through their gradient_checkpointing_enable (personae.models.checkpointing); not meta.train
    gradient_checkpointing: bool = False
    seed: int = 0  # seeds the initialisation (pretraining) and the order of the batches
    log_every: int = 10  # steps between log lines (metrics.jsonl)
    save_every: int = 200  # steps between checkpoints
    num_workers: int = 0  # DataLoader worker processes
    # batches of similar length: each run of this many batches of an epoch's shuffled examples is
    # sorted by length before it is cut into batches (less padding; 0: off; data sets with lengths only)
    group_by_length: int = 0
    compile: bool = False  # run the stage's task through torch.compile


@dataclass
class PretrainCfg:
    """Weights and settings of the three pretraining objectives."""

    itc_weight: float = 1.0  # weight of the image-text contrastive loss
    itm_weight: float = 1.0  # weight of the image-text matching loss
    mlm_weight: float = 1.0  # weight of the masked language modelling loss
    mask_prob: float = 0.15  # fraction of caption tokens masked for MLM
    tokenizer_vocab: int = 2048  # vocabulary of the BPE tokenizer trained on the training text


@dataclass
class FinetuneCfg:
    """Role-play fine-tuning: its own optimisation settings and what the prompts hold."""

    # the fine-tuning stage's optimisation
    train: TrainCfg = field(default_factory=lambda: TrainCfg(steps=800, batch_size=32, lr=1e-3, warmup_steps=50))
    include_examples: bool = True  # the card's example messages go into every prompt
    max_new_tokens: int = 64  # room kept free in the decoder for a reply when prompts are cut
    # greedy replies in evaluation and chat: no n-gram more than this many times in a row (0: off;
    # personae.models.next_token.ban_loops)
    max_repeats: int = 3
    # scene worlds: this fraction of the conversations speaks with freshly drawn markers (in card and
    # replies alike, personae.world.persona_swap), so the model learns to take a voice from the card
    persona_swap: float = 0.0
    # weight of the region-word alignment loss on the image prefix (0: off): for each thing the image
    # holds (the data kind's image_objects), the region whose tied-head read-out ranks its first word
    # piece highest is trained toward it (personae.objectives.alignment)
    align_weight: float = 0.0
    # the reply loss weighs reply tokens of the data kind's content kinds (the scene world: object
    # names, numbers, yes/no, positions) this much and other reply tokens 1 (1: a plain mean)
    content_weight: float = 1.0
    # a new decoder starts from the pretrained text tower's word embeddings and blocks (false: from a
    # random init, which the tiny preset uses: see docs/lab/2026-12-02-copy-first.md)
    decoder_from_text: bool = True


@dataclass
class MetaCfg:
    """Meta-learning over characters (personae.meta) and adapting to a new one (personae.meta.adapt).

    `train` is the outer optimisation (its lr is the meta rate beta, its steps the meta-batches);
    its batch_size is not used: a step's data is `meta_batch` tasks of `support` + `query`
    conversations each.
    """

    # the outer loop's optimisation (lr: the meta rate beta; steps: meta-batches)
    train: TrainCfg = field(default_factory=lambda: TrainCfg(steps=200, batch_size=4, lr=3e-4, warmup_steps=10,
                                                             log_every=5, save_every=50))
    algo: str = choice("lora-maml", META_ALGOS)  # the meta-learning algorithm (personae.meta.META)
    inner_steps: int = 3  # inner (adaptation) steps per task in meta-training
    inner_lr: float = 0.05  # the inner rate alpha, in meta-training and when adapting
    learn_inner_lr: bool = False  # Meta-SGD: learned per-element inner rates, saved as meta_lrs.safetensors
    # the inner loop's update, in meta-training and when adapting: sgd, or adam (Adam's normalised steps)
    inner_optimizer: str = choice("sgd", INNER_OPTIMIZERS)
    first_order: bool = False  # force first order (fomaml and reptile always are)
    # which parameters the inner loop adapts: all | head (decoder.ln_f) | lora; auto: the algorithm's own
    inner_params: str = choice("auto", INNER_PARAMS)
    meta_batch: int = 4  # tasks (characters) per outer step
    support: int = 5  # k conversations per support set
    query: int = 5  # q conversations per query set
    # auto: vmap over the tasks when they stack; on: always (error if they do not); off: loop over them
    # (on a CPU the loop can be faster)
    vmap: str = choice("auto", VMAP_MODES)
    # dropout under vmap: different (a mask per task) | same (one for all) | error (refuse)
    randomness: str = choice("different", RANDOMNESS_MODES)
    lora_rank: int = 4  # rank of the adapters added when LoRA adapts (recorded in model.lora_rank)
    lora_alpha: float = 8.0  # scale of those adapters (recorded in model.lora_alpha)
    # scene worlds: each episode's character speaks with freshly drawn markers (personae.world.persona_swap),
    # so that tasks are as new to the model as held-out characters are
    persona_swap: bool = False


@dataclass
class Config:
    """Everything a run needs; saved next to its checkpoints as config.json."""

    model: ModelCfg = field(default_factory=ModelCfg)  # the architecture
    train: TrainCfg = field(default_factory=TrainCfg)  # pretraining's optimisation
    pretrain: PretrainCfg = field(default_factory=PretrainCfg)  # the pretraining objectives
    finetune: FinetuneCfg = field(default_factory=FinetuneCfg)  # role-play fine-tuning
    meta: MetaCfg = field(default_factory=MetaCfg)  # meta-training and adaptation
    preset: str = "custom"  # the preset (or file) the config came from


T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON-friendly dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build `cls` from a dict; unknown keys and wrongly typed values raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}'; valid keys here: {', '.join(fields)}")
        kwargs[key] = _coerce(hints[key], value, path)
        choices = fields[key].metadata.get("choices")
        if choices is not None and kwargs[key] not in choices:
            raise ConfigError(f"config key '{path}' must be one of {', '.join(choices)}; got {value!r}")
    return cls(**kwargs)


def choices_of(cls: type, name: str) -> tuple[str, ...]:
    """The values a choice-valued field of a config dataclass takes (e.g. choices_of(MetaCfg, 'algo'))."""
    for f in dataclasses.fields(cls):
        if f.name == name and "choices" in f.metadata:
            return tuple(f.metadata["choices"])
    raise ConfigError(f"{cls.__name__}.{name} is not a choice-valued config field")


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
    body = text.removeprefix("--")
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
    """Read a config written by save_config (or any YAML/JSON file of the same shape).

    A run saved by an older version may hold keys that were removed or renamed since
    (REMOVED_KEYS, RENAMED_KEYS): they are dropped or moved with a logged note; any other unknown
    key is an error.
    """
    data = yaml.safe_load(Path(path).read_text()) or {}
    if isinstance(data, dict):
        _upgrade_legacy_keys(data, Path(path))
    return from_dict(Config, data)


def _schema_has(dotted: str) -> bool:
    """Whether the Config schema has a field at this dotted path."""
    cls: Any = Config
    for key in dotted.split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if key not in fields:
            return False
        cls = typing.get_type_hints(cls)[key]
    return True


def _pop_dotted(data: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    *parents, last = dotted.split(".")
    node: Any = data
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        return False, None
    return True, node.pop(last)


def _upgrade_legacy_keys(data: dict[str, Any], path: Path) -> None:
    """Drop REMOVED_KEYS and move RENAMED_KEYS in place (an older run's config.json)."""
    for dotted in REMOVED_KEYS:
        if _schema_has(dotted):  # still a field of this version: keep it
            continue
        found, value = _pop_dotted(data, dotted)
        if found:
            log.info("%s: dropped '%s' = %r (a removed config key that nothing reads)", path, dotted, value)
    for old, new in RENAMED_KEYS.items():
        found, value = _pop_dotted(data, old)
        if not found:
            continue
        *parents, last = new.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        if last in node and node[last] != value:  # a full config.json holds the new key too: it wins
            log.info("%s: dropped the old key '%s' = %r ('%s' = %r is set)", path, old, value, new, node[last])
            continue
        node[last] = value
        log.info("%s: read the old key '%s' as '%s' = %r", path, old, new, value)
