"""A Hugging Face decoder's LoRA adapters in PEFT's format, so that `peft` and vLLM load them.

A PEFT adapter folder holds ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``,
``target_modules``, ``base_model_name_or_path``, ...) and ``adapter_model.safetensors``, whose keys
are the LM's module paths under ``base_model.model.``::

    personae:  decoder.lm.model.layers.0.self_attn.q_proj.lora_A           (rank, in)
    PEFT:      base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  (the same tensor)

The tensors are the same: PEFT's ``lora_A`` is a Linear(in, r), its ``lora_B`` a Linear(r, out),
and its scale is ``lora_alpha / r`` (no rsLoRA), as personae's. GPT-2's Conv1D layers are marked
``fan_in_fan_out`` (only merging reads it). Only adapters on the LM itself fit the format: an
adapter on the image projector (``decoder.image_proj``) is refused, naming the layer.

:func:`read_peft_adapter` reads such a folder back as personae adapter tensors (keyed by
parameter name) and :func:`load_peft_adapter` puts it on a model, adding the LoRA layers it
names when the model has none.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from personae.files import atomic_directory
from personae.models.lora import (
    LORA_MARKERS,
    AdapterError,
    LoRALinear,
    add_decoder_lora,
    apply_adapter,
    load_adapter,
    lora_settings,
    lora_targets_of,
    save_adapter,
)

__all__ = ["PEFT_CONFIG_FILE", "PEFT_WEIGHTS_FILE", "load_peft_adapter", "peft_config", "read_peft_adapter",
           "write_peft_adapter"]

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
LM_PREFIX = "decoder.lm."  # where PersonaeModel holds a Hugging Face LM
PEFT_PREFIX = "base_model.model."  # where a PeftModel holds it


def peft_key(name: str) -> str:
    """personae's 'decoder.lm.X.lora_A' -> PEFT's 'base_model.model.X.lora_A.weight'."""
    if not name.startswith(LM_PREFIX):
        raise AdapterError(f"adapter tensor {name!r} is not on the Hugging Face LM (decoder.lm): the PEFT format "
                           "holds the LM's adapters only")
    return PEFT_PREFIX + name.removeprefix(LM_PREFIX) + ".weight"


def personae_key(key: str, folder: Path) -> str:
    """PEFT's 'base_model.model.X.lora_A.weight' -> personae's 'decoder.lm.X.lora_A'."""
    body = key.removeprefix(PEFT_PREFIX).removesuffix(".weight")
    if not key.startswith(PEFT_PREFIX) or not key.endswith(".weight") or body.rsplit(".", 1)[-1] not in LORA_MARKERS:
        raise AdapterError(f"{folder / PEFT_WEIGHTS_FILE}: tensor {key!r} is not a LoRA weight of the form "
                           "base_model.model.<module>.lora_A.weight / lora_B.weight (only plain LoRA is read)")
    return LM_PREFIX + body


def _lm_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by name, all on the LM (anything else is an error naming it)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise AdapterError("the model has no LoRA layers: there is no adapter to write in the PEFT format")
    outside = [name for name in layers if not name.startswith(LM_PREFIX)]
    if outside:
        raise AdapterError(f"LoRA layer {outside[0]} is not on the Hugging Face LM (decoder.lm): the PEFT format "
                           "holds the LM's adapters only (choose model.lora_targets on the LM)")
    return layers


def peft_config(model: nn.Module, base_model: str | Path) -> dict[str, Any]:
    """adapter_config.json for the model's LoRA layers; `base_model` is the LM's local folder."""
    layers, settings = _lm_layers(model), lora_settings(model)
    assert settings is not None  # _lm_layers found LoRA layers
    targets = lora_targets_of(model)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
        "r": int(settings["rank"]), "lora_alpha": float(settings["alpha"]), "target_modules": list(targets),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "inference_mode": True,
        "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
    }


def write_peft_adapter(model: nn.Module, folder: str | Path, base_model: str | Path) -> Path:
    """Write the model's LoRA adapters as a PEFT adapter folder (replaced whole); the folder."""
    folder = Path(folder)
    config = peft_config(model, base_model)
    tensors = {peft_key(f"{name}.{marker}"): getattr(layer, marker)
               for name, layer in _lm_layers(model).items() for marker in LORA_MARKERS}
    with atomic_directory(folder) as staging:
        (staging / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_adapter(staging / PEFT_WEIGHTS_FILE, tensors, {"format": "pt"})
    return folder


def _read_config(folder: Path) -> dict[str, Any]:
    """adapter_config.json, checked for what personae's LoRA computes the same way."""
    path = folder / PEFT_CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{folder}: no {PEFT_CONFIG_FILE}, not a PEFT adapter folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise AdapterError(f"{path}: not valid JSON ({error})") from error
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA adapters are read")
    unsupported = {"use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
                   "modules_to_save": None}
    for key, plain in unsupported.items():
        if config.get(key) not in (None, plain):
            raise AdapterError(f"{path}: {key}={config[key]!r} is not supported (plain LoRA: {key}={plain!r})")
    if not isinstance(config.get("r"), int) or "lora_alpha" not in config:
        raise AdapterError(f"{path}: needs an integer 'r' and 'lora_alpha'")
    return config


def read_peft_adapter(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A PEFT LoRA folder as (tensors by personae parameter name, metadata with lora_rank and lora_alpha)."""
    folder = Path(folder)
    config = _read_config(folder)
    tensors, _ = load_adapter(folder / PEFT_WEIGHTS_FILE)
    adapter = {personae_key(key, folder): value for key, value in tensors.items()}
    metadata = {"inner_params": "lora", "lora_rank": str(config["r"]), "lora_alpha": str(float(config["lora_alpha"])),
                "base_model": str(config.get("base_model_name_or_path", ""))}
    return adapter, metadata


def load_peft_adapter(model: nn.Module, folder: str | Path) -> Mapping[str, str]:
    """Put a PEFT LoRA adapter on the model (adding exactly the LoRA layers it names if it has none); its metadata."""
    tensors, metadata = read_peft_adapter(folder)
    if lora_settings(model) is None:
        # the LoRA layers named by the file's keys, as dotted-path ends under decoder.
        layers = sorted({name.removeprefix("decoder.").rsplit(".", 1)[0] for name in tensors})
        add_decoder_lora(model, int(metadata["lora_rank"]), float(metadata["lora_alpha"]), targets=layers)
    apply_adapter(model, tensors)
    return metadata
