"""Pretrained image and text towers behind personae's tower interfaces (``model.vision.kind``, ``model.text.kind``).

Every tower gives what :class:`~personae.models.model.PersonaeModel` reads of its own towers:

* an image tower maps ``(B, 3, S, S)`` normalised pixels to ``(B, 1 + g*g, D)`` regions, index 0
  the image's pooled embedding (what ITC projects) and then the ``g x g`` grid (``grid``) of patch
  tokens or feature-map cells (what fusion and the decoder's image prefix see);
* a text tower maps ``(B, T)`` ids and a padding mask to ``(B, T, D)`` word states (zeros at padding,
  as the own encoder gives) and offers ``word_embeddings`` for the MLM head.

:class:`HFVisionTower` wraps ``CLIPVisionModel`` / ``SiglipVisionModel`` folders (the
:data:`VISION_TOWERS` registry says which class, which ``model_type`` values and whether the
sequence starts with a cls token). The image settings come from the folder's
``preprocessor_config.json`` (crop size, mean, std) and are written into the config so the one image
loader resizes to the tower's size; personae's loaders normalise with CLIP's statistics, and the
tower maps those pixels exactly (an affine map per channel) onto its own mean / std.

:class:`ConvVisionTower` is the interface for convolutional backbones: any module mapping pixels to
a square feature map ``(B, C, g, g)``; its cells are the regions and their mean the pooled embedding.

:class:`HFTextTower` wraps a BERT-family ``AutoModel`` folder; its tokenizer is the run's caption
tokenizer (``personae.train.pretrain.prepare_tokenizer``). Nothing is downloaded: a missing folder,
a folder without ``config.json`` or of another architecture is an error naming the folder and key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, CLIPVisionModel, PreTrainedModel, SiglipVisionModel

from personae.config import TextCfg, VisionCfg
from personae.data.images import IMAGE_MEAN, IMAGE_STD
from personae.errors import DataError

__all__ = ["VISION_TOWERS", "ConvVisionTower", "HFTextTower", "HFVisionTower", "VisionTowerSpec",
           "load_text_model", "load_vision_model", "read_model_config"]

PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class VisionTowerSpec:
    """How one family of Hugging Face vision folders loads and lays out its tokens."""

    model_class: type[PreTrainedModel]
    model_types: tuple[str, ...]  # config.json model_type values the class loads (a whole model or its tower)
    leading_cls: bool  # the sequence starts with a cls token (CLIP) or is only patches (SigLIP)
    mean: tuple[float, float, float]  # the family's statistics when the folder has no preprocessor_config.json
    std: tuple[float, float, float]


# model.vision.kind -> spec; with "own" these are config.VISION_KINDS
VISION_TOWERS: dict[str, VisionTowerSpec] = {
    "clip": VisionTowerSpec(CLIPVisionModel, ("clip", "clip_vision_model"), True, IMAGE_MEAN, IMAGE_STD),
    "siglip": VisionTowerSpec(SiglipVisionModel, ("siglip", "siglip_vision_model"), False,
                              (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def read_model_config(path: str, key: str) -> dict[str, Any]:
    """config.json of the local model folder that config key `key` names; errors name both."""
    if not path:
        raise DataError(f"{key} is empty: give a local Hugging Face model folder")
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"the Hugging Face model folder that {key} names does not exist (moved or deleted?); "
                        f"set {key} to where it is now", folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise DataError(f"no config.json in the Hugging Face model folder ({key}); it needs config.json "
                        "and the weights", folder)
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"config.json is not valid JSON: {error}", folder) from error


def load_vision_model(cfg: VisionCfg) -> PreTrainedModel:
    """The vision tower of kind cfg.kind saved in cfg.path (float32, never downloaded)."""
    spec = VISION_TOWERS[cfg.kind]
    model_type = read_model_config(cfg.path, "model.vision.path").get("model_type", "")
    if model_type not in spec.model_types:
        raise DataError(f"model.vision.kind is {cfg.kind!r} but config.json has model_type {model_type!r}; "
                        f"expected one of {', '.join(spec.model_types)}", cfg.path)
    return spec.model_class.from_pretrained(cfg.path, local_files_only=True, dtype=torch.float32)


def load_text_model(cfg: TextCfg) -> PreTrainedModel:
    """The BERT-family encoder saved in cfg.path (AutoModel, float32, never downloaded)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    model_type = read_model_config(cfg.path, "model.text.path").get("model_type", "")
    if model_type not in MODEL_MAPPING_NAMES:
        raise DataError(f"model_type {model_type!r} in config.json is not an architecture AutoModel loads "
                        "(e.g. bert, distilbert, roberta)", cfg.path)
    return AutoModel.from_pretrained(cfg.path, local_files_only=True, dtype=torch.float32)


def _processor_settings(cfg: VisionCfg, spec: VisionTowerSpec, config_size: int
                        ) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(size, mean, std) from the folder's preprocessor_config.json, else the model config's size and the family's."""
    file = Path(cfg.path) / PREPROCESSOR_FILE
    if not file.is_file():
        return config_size, spec.mean, spec.std
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{PREPROCESSOR_FILE} is not valid JSON: {error}", cfg.path) from error
    size = _side(settings.get("crop_size") if settings.get("do_center_crop", True) else None)
    size = size or _side(settings.get("size")) or config_size
    if size != config_size:
        raise DataError(f"{PREPROCESSOR_FILE} gives images of {size} pixels but config.json's image_size is "
                        f"{config_size}: the tower's position embeddings fit only the latter", cfg.path)
    mean = tuple(float(v) for v in settings.get("image_mean", spec.mean))
    std = tuple(float(v) for v in settings.get("image_std", spec.std))
    return size, mean, std


def _side(value: Any) -> int | None:
    """Pixels a side of an image processor's size entry (an int, {height, width} or {shortest_edge})."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        side = value.get("height", value.get("shortest_edge"))
        return int(side) if side is not None else None
    return None


class _Renormalise(nn.Module):
    """Pixels normalised with personae's statistics -> pixels normalised with a tower's (exact per-channel affine)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        own_mean, own_std = torch.tensor(IMAGE_MEAN), torch.tensor(IMAGE_STD)
        target_mean, target_std = torch.tensor(mean), torch.tensor(std)
        # (x - m0) / s0 -> (x - m) / s  is  p * s0 / s + (m0 - m) / s; buffers outside the state dict
        self.register_buffer("scale", (own_std / target_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((own_mean - target_mean) / target_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values * self.scale.to(pixel_values.dtype) + self.shift.to(pixel_values.dtype)


class HFVisionTower(nn.Module):
    """A CLIP / SigLIP vision folder as the image tower: [pooled; patch tokens] are the regions."""

    def __init__(self, cfg: VisionCfg) -> None:
        super().__init__()
        self.spec = VISION_TOWERS[cfg.kind]
        self.model = load_vision_model(cfg)
        config = self.model.config
        size, mean, std = _processor_settings(cfg, self.spec, int(config.image_size))
        # the rest of personae (image loaders, fusion positions, the decoder prefix) reads these keys;
        # the run records where the folder is, whatever the working directory
        cfg.image_size, cfg.patch_size, cfg.width = size, int(config.patch_size), int(config.hidden_size)
        cfg.path = str(Path(cfg.path).resolve())
        self.cfg = cfg
        self.grid = size // cfg.patch_size
        self.renormalise = _Renormalise(mean, std)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels normalised by personae -> (B, 1 + g*g, D) regions, index 0 the pooled output."""
        out = self.model(pixel_values=self.renormalise(pixel_values))
        patches = out.last_hidden_state[:, 1:] if self.spec.leading_cls else out.last_hidden_state  # (B, g*g, D)
        pooled = out.pooler_output if out.pooler_output is not None else patches.mean(dim=1)  # (B, D)
        return torch.cat([pooled[:, None], patches], dim=1)


class ConvVisionTower(nn.Module):
    """A convolutional backbone as the image tower: its last feature map's cells are the regions.

    `backbone` maps (B, 3, S, S) pixels to a square (B, C, g, g) feature map; the regions are
    [mean of the cells; the g*g cells]. The config's width / patch_size are written from it, so the
    fusion and decoder-prefix sizes follow (patch_size = S / g, the cells' stride).
    """

    def __init__(self, cfg: VisionCfg, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        with torch.no_grad():
            probe = backbone(torch.zeros(1, 3, cfg.image_size, cfg.image_size))  # (1, C, g, h)
        if probe.dim() != 4 or probe.shape[-1] != probe.shape[-2] or cfg.image_size % probe.shape[-1]:
            raise ValueError(f"a convolutional tower needs a square feature map whose side divides "
                             f"model.vision.image_size={cfg.image_size}; got {tuple(probe.shape)}")
        self.grid = int(probe.shape[-1])
        cfg.width, cfg.patch_size = int(probe.shape[1]), cfg.image_size // self.grid
        self.cfg = cfg

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1 + g*g, C) regions: the mean cell, then the cells row by row."""
        cells = self.backbone(pixel_values).flatten(2).transpose(1, 2)  # (B, g*g, C)
        return torch.cat([cells.mean(dim=1, keepdim=True), cells], dim=1)


class HFTextTower(nn.Module):
    """A BERT-family folder as the text tower: its last hidden states are the words."""

    def __init__(self, cfg: TextCfg) -> None:
        super().__init__()
        self.model = load_text_model(cfg)
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # BERT's next-sentence pooler: personae pools itself (model.text.pooling)
        config = self.model.config
        rows = self.model.get_input_embeddings().num_embeddings
        if cfg.vocab_size > rows:  # personae's added special tokens (image, roles): new rows
            self.model.resize_token_embeddings(cfg.vocab_size, mean_resizing=False)
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and cfg.max_len > limit:
            raise DataError(f"model.text.max_len={cfg.max_len} is more than the tower's {limit} positions", cfg.path)
        cfg.vocab_size, cfg.width = max(rows, cfg.vocab_size), int(config.hidden_size)
        cfg.path = str(Path(cfg.path).resolve())  # the run records where the folder is, whatever the working directory
        self.cfg = cfg

    @property
    def word_embeddings(self) -> torch.Tensor:
        """(V, D) input embedding matrix (the MLM head's output weights are tied to it)."""
        return self.model.get_input_embeddings().weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids, (B, T) bool valid mask -> (B, T, D) word states, zeros at padding."""
        if input_ids.shape[1] > self.cfg.max_len:
            raise ValueError(f"text of {input_ids.shape[1]} tokens is longer than "
                             f"model.text.max_len={self.cfg.max_len}")
        mask = attention_mask.long() if attention_mask is not None else None
        words = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, T, D)
        return words if attention_mask is None else words * attention_mask[..., None].to(words.dtype)
