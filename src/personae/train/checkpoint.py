"""Training checkpoints: the model files (models/io.py) plus optimizer and trainer state.

Written atomically and checksummed (``checkpoint.json``); :func:`latest_checkpoint` resumes from
the newest *intact* ``step_*`` folder, skipping damaged or empty ones and saying so;
:func:`remove_stale_staging` clears what interrupted saves left; :func:`check_writable` finds a
read-only or full output folder before training starts.
"""

from __future__ import annotations

import glob
import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from personae.config import Config
from personae.data.jsonl import JsonError, strict_json_loads
from personae.data.tokenizer import Tokenizer
from personae.files import remove_staging, write_text_atomic
from personae.models.io import (
    MODEL_FILES,
    STATE_FILE,
    CheckpointError,
    load_tensors,
    model_directory,
    require_file,
    verify_checkpoint,
    write_model_files,
)

logger = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_META_FILE = "optimizer.json"
CHECKPOINTS_DIR = "checkpoints"
_DISK_MARGIN = 16 * 1024 * 1024  # config, tokenizer, state and file-system slack beyond the tensors


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
    modules: Mapping[str, nn.Module] | None = None,
) -> Path:
    """Write a checkpoint directory atomically and checksummed: built beside the target, then renamed.

    ``modules`` are extra modules saved as ``<name>.safetensors`` (inside the checksummed set).
    A failed write (disk full, permissions) removes the staging folder and leaves the target as it was.
    """
    directory = Path(directory)
    with model_directory(directory) as staging:
        write_model_files(staging, model, config, tokenizer)
        for name, module in (modules or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
                      str(staging / f"{name}.safetensors"))
        if optimizer is not None:
            tensors, meta = _optimizer_to_files(optimizer)
            save_file(tensors, str(staging / OPTIMIZER_FILE))
            (staging / OPTIMIZER_META_FILE).write_text(json.dumps(meta))
        if state is not None:
            (staging / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1))
    return directory


def read_state(directory: Path) -> TrainerState:
    """trainer_state.json of a checkpoint (or a finished run's root)."""
    path = require_file(directory, STATE_FILE)
    try:
        return TrainerState(**strict_json_loads(path.read_bytes()))
    except (JsonError, TypeError) as exc:
        raise CheckpointError(f"{path}: damaged trainer state ({exc})") from None


def load_training_state(
    directory: Path, optimizer: torch.optim.Optimizer | None = None
) -> TrainerState:
    """Read trainer_state.json and, when given an optimizer, restore its state in place."""
    state = read_state(directory)
    if optimizer is not None:
        tensors = load_tensors(require_file(directory, OPTIMIZER_FILE))
        meta_path = require_file(directory, OPTIMIZER_META_FILE)
        try:
            meta = strict_json_loads(meta_path.read_bytes())
        except JsonError as exc:
            raise CheckpointError(f"{meta_path}: damaged optimizer state ({exc})") from None
        optimizer.load_state_dict(_optimizer_from_files(tensors, meta))
    return state


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoints/step_* folder of a run, or None when the run has none.

    Damaged, incomplete or empty folders are skipped with a warning naming the file at fault, and
    the fallback is logged; when every one is damaged, a CheckpointError lists why.
    """
    folder = Path(run_dir) / CHECKPOINTS_DIR
    found = sorted((p for p in folder.glob("step_*") if p.is_dir()), reverse=True) if folder.is_dir() else []
    problems: list[str] = []
    for candidate in found:
        try:
            if not any(candidate.iterdir()):
                raise CheckpointError(f"{candidate}: the folder is empty (an interrupted copy?)")
            verify_checkpoint(candidate, MODEL_FILES + (STATE_FILE,))
        except CheckpointError as error:
            logger.warning("skipping checkpoint %s: %s", candidate.name, error)
            problems.append(str(error))
            continue
        if problems:
            logger.warning("resuming from %s, the newest intact checkpoint (%d newer one(s) skipped)",
                           candidate, len(problems))
        return candidate
    if problems:
        raise CheckpointError(f"{folder}: no intact checkpoint to resume from: " + "; ".join(problems)
                              + ". Remove the damaged folders to start afresh")
    return None


def finished_state(run_dir: Path, stage: str, steps: int) -> TrainerState | None:
    """The state of a run whose final model (``stage``, ``steps`` steps) is already in its root, else None."""
    root = Path(run_dir)
    if not (root / STATE_FILE).is_file():
        return None
    state = read_state(root)
    if state.stage != stage or state.step < steps:
        return None
    verify_checkpoint(root)  # a finished run with a damaged final model is an error, not "done"
    return state


def remove_stale_staging(run_dir: Path) -> list[Path]:
    """Remove the staging folders and files that interrupted saves (SIGKILL, power loss) left behind."""
    root = Path(run_dir)
    removed = remove_staging(root.parent, glob.escape(root.name))  # the final save stages beside the run folder
    removed += remove_staging(root / CHECKPOINTS_DIR, "step_*")
    removed += remove_staging(root, "*")  # single files written aside, e.g. metrics or adapters
    for path in removed:
        logger.warning("removed %s, left by an interrupted save", path)
    return removed


def check_writable(run_dir: Path, checkpoint_bytes: int) -> None:
    """Fail now, not after the first save, when checkpoints cannot be written into ``run_dir``.

    Writes and removes a probe file, and compares the free space with one more checkpoint of
    ``checkpoint_bytes`` (the older checkpoint is only removed after the new one is complete).
    """
    folder = Path(run_dir) / CHECKPOINTS_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = write_text_atomic(folder / ".write-probe", "personae checks that checkpoints can be written\n")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"{folder}: checkpoints cannot be written there ({exc.strerror or exc}); "
                              "choose another --out or fix its permissions") from None
    free = shutil.disk_usage(folder).free
    needed = checkpoint_bytes + _DISK_MARGIN
    if free < needed:
        raise CheckpointError(f"{folder}: {free / 2**20:.0f} MiB free, but a checkpoint needs about "
                              f"{needed / 2**20:.0f} MiB; free some space or choose another --out")


def tensor_bytes(*modules: nn.Module) -> int:
    """The bytes of every tensor in the modules' state dicts."""
    return sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values() if torch.is_tensor(t))

