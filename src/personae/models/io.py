"""A model on disk: a directory of config.json, model.safetensors and tokenizer.json (no pickle).

Both training (checkpoints) and serving (loading a run) use this module, which is why it lives
below `train/` and `serve/`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from personae.config import Config, load_config, save_config
from personae.data.tokenizer import Tokenizer
from personae.errors import PersonaeError
from personae.files import atomic_directory
from personae.models.model import PersonaeModel

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "trainer_state.json"  # written last when a folder is updated in place


class CheckpointError(PersonaeError):
    """A checkpoint directory is missing a file or does not match the model."""


def write_model_files(folder: Path, model: nn.Module, config: Config, tokenizer: Tokenizer) -> None:
    """config.json, model.safetensors and tokenizer.json into an (empty, staging) folder."""
    save_config(config, folder / CONFIG_FILE)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(folder / MODEL_FILE), metadata={"format": "pt"})
    tokenizer.save(folder / TOKENIZER_FILE)


@contextmanager
def model_directory(directory: Path) -> Iterator[Path]:
    """A staging folder that replaces ``directory`` when the block ends without an error.

    Into an existing directory (a run's root) the weights are renamed first and the trainer
    state last, so a reader that finds the new state finds the new weights too.
    """
    with atomic_directory(directory, first=(MODEL_FILE,), last=(STATE_FILE,)) as staging:
        yield staging


def require_file(directory: Path, name: str) -> Path:
    path = Path(directory) / name
    if not path.exists():
        raise CheckpointError(f"{directory}: not a personae checkpoint, {name} is missing")
    return path


def load_model(directory: Path, device: str | torch.device = "cpu") -> tuple[PersonaeModel, Config, Tokenizer]:
    """Rebuild the model from config.json and load model.safetensors (strict: every key must match)."""
    config = load_config(require_file(directory, CONFIG_FILE))
    tokenizer = Tokenizer.from_file(require_file(directory, TOKENIZER_FILE))
    model = PersonaeModel(config.model)
    weights = load_file(str(require_file(directory, MODEL_FILE)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: weights do not match config.json (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    return model.to(device), config, tokenizer
