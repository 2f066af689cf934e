"""Training checkpoints: the model files (models/io.py) plus optimizer and trainer state, written atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from personae.config import Config
from personae.data.tokenizer import Tokenizer
from personae.models.io import STATE_FILE, model_directory, require_file, write_model_files

OPTIMIZER_FILE = "optimizer.safetensors"


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
    with model_directory(directory) as staging:
        write_model_files(staging, model, config, tokenizer)
        if optimizer is not None:
            tensors, meta = _optimizer_to_files(optimizer)
            save_file(tensors, str(staging / OPTIMIZER_FILE))
            (staging / "optimizer.json").write_text(json.dumps(meta))
        if state is not None:
            (staging / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1))
    return directory


def load_training_state(
    directory: Path, optimizer: torch.optim.Optimizer | None = None
) -> TrainerState:
    """Read trainer_state.json and, when given an optimizer, restore its state in place."""
    state = TrainerState(**json.loads(require_file(directory, STATE_FILE).read_text()))
    if optimizer is not None:
        tensors = load_file(str(require_file(directory, OPTIMIZER_FILE)))
        meta = json.loads(require_file(directory, "optimizer.json").read_text())
        optimizer.load_state_dict(_optimizer_from_files(tensors, meta))
    return state


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoints/step_* directory of a run, or None."""
    folder = Path(run_dir) / "checkpoints"
    found = sorted(folder.glob("step_*")) if folder.exists() else []
    return found[-1] if found else None
