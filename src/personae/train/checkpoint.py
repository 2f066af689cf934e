"""Checkpoints as directories (config.json, model.safetensors, tokenizer.json, trainer state), atomic."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from personae.config import Config, load_config, save_config
from personae.data.tokenizer import Tokenizer
from personae.errors import PersonaeError
from personae.models.model import PersonaeModel

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


class CheckpointError(PersonaeError):
    """A checkpoint directory is missing a file or does not match the model."""


@dataclass
class TrainerState:
    """Where a run stands: the next step to run and the log so far (JSON, no pickle)."""

    step: int = 0
    stage: str = "pretrain"
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (safetensors) and plain values (JSON)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    slots: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        slots.setdefault(int(index), {}).update(values)
    return {"state": slots, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    config: Config,
    tokenizer: Tokenizer,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    state: TrainerState | None = None,
) -> Path:
    """Write a checkpoint directory atomically: build it beside the target, then rename it in place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_config(config, staging / CONFIG_FILE)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(staging / MODEL_FILE), metadata={"format": "pt"})
    tokenizer.save(staging / TOKENIZER_FILE)
    if optimizer is not None:
        tensors, meta = _optimizer_to_files(optimizer)
        save_file(tensors, str(staging / OPTIMIZER_FILE))
        (staging / "optimizer.json").write_text(json.dumps(meta))
    if state is not None:
        (staging / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1))
    _swap_in(staging, directory)
    return directory


def _swap_in(staging: Path, directory: Path) -> None:
    """Move a finished checkpoint into place so that a reader never sees a half-written file.

    A new directory is renamed in one step; into an existing one (a run's root) each file is
    renamed over the old one, weights first and trainer state last.
    """
    if not directory.exists():
        os.replace(staging, directory)
        return
    order = {MODEL_FILE: 0, STATE_FILE: 2}
    for path in sorted(staging.iterdir(), key=lambda p: order.get(p.name, 1)):
        os.replace(path, directory / path.name)
    staging.rmdir()


def _require(directory: Path, name: str) -> Path:
    path = Path(directory) / name
    if not path.exists():
        raise CheckpointError(f"{directory}: not a personae checkpoint, {name} is missing")
    return path


def load_model(directory: Path, device: str | torch.device = "cpu") -> tuple[PersonaeModel, Config, Tokenizer]:
    """Rebuild the model from config.json and load model.safetensors (strict: every key must match)."""
    config = load_config(_require(directory, CONFIG_FILE))
    tokenizer = Tokenizer.from_file(_require(directory, TOKENIZER_FILE))
    model = PersonaeModel(config.model)
    weights = load_file(str(_require(directory, MODEL_FILE)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: weights do not match config.json (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    return model.to(device), config, tokenizer


def load_training_state(
    directory: Path, optimizer: torch.optim.Optimizer | None = None
) -> TrainerState:
    """Read trainer_state.json and, when given an optimizer, restore its state in place."""
    state = TrainerState(**json.loads(_require(directory, STATE_FILE).read_text()))
    if optimizer is not None:
        tensors = load_file(str(_require(directory, OPTIMIZER_FILE)))
        meta = json.loads(_require(directory, "optimizer.json").read_text())
        optimizer.load_state_dict(_optimizer_from_files(tensors, meta))
    return state


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoints/step_* directory of a run, or None."""
    folder = Path(run_dir) / "checkpoints"
    found = sorted(folder.glob("step_*")) if folder.exists() else []
    return found[-1] if found else None
