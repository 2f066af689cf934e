"""A model on disk: a directory of config.json, model.safetensors and tokenizer.json (no pickle).

A run with a Hugging Face decoder also holds ``chat_tokenizer.json``, the LM's tokenizer and chat
template (:meth:`HFChatTokenizer.save`); :func:`load_model` then returns that tokenizer (its
``text_tokenizer`` is the caption tokenizer of tokenizer.json), so chat, evaluation and serving need
only the run folder for it. Pretrained towers and the decoder are rebuilt from the folders the
config names (``model.vision.path``, ``model.text.path``, ``model.decoder.path``) before the run's
weights are read; a folder that moved is an error naming the key.

Both training (checkpoints) and serving (loading a run) use this module, which is why it lives
below `train/` and `serve/`. Every folder written here carries ``checkpoint.json``, the sha256
and size of each file it wrote; :func:`verify_checkpoint` checks them before anything is loaded,
so a truncated, bit-flipped or half-copied checkpoint is an error naming the file, never a
different model. Folders written before checksums existed still load, with a note. Tied weights
(an LM head that is its embeddings) are stored once and tied again on load (:func:`save_state_dict`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from personae.config import Config, load_config, save_config
from personae.data.hf_tokenizer import HFChatTokenizer
from personae.data.jsonl import JsonError, strict_json_loads
from personae.data.tokenizer import Tokenizer
from personae.errors import PersonaeError
from personae.files import atomic_directory
from personae.models.model import PersonaeModel

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
CHAT_TOKENIZER_FILE = "chat_tokenizer.json"  # runs with a Hugging Face decoder: its tokenizer and chat template
STATE_FILE = "trainer_state.json"  # written last when a folder is updated in place
MANIFEST_FILE = "checkpoint.json"  # {"format": 1, "files": {name: {"sha256": hex, "bytes": n}}}
MODEL_FILES = (CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE)
ALIASES_KEY = "personae_aliases"  # model.safetensors metadata: JSON {alias: name}, names tied to one tensor
_HASH_CHUNK = 1 << 20


class CheckpointError(PersonaeError):
    """A checkpoint directory is missing a file or does not match the model."""


def write_model_files(folder: Path, model: nn.Module, config: Config, tokenizer: Tokenizer | HFChatTokenizer) -> None:
    """config.json, model.safetensors and tokenizer.json (and a chat tokenizer's chat_tokenizer.json) into a folder."""
    save_config(config, folder / CONFIG_FILE)
    save_state_dict(model.state_dict(), folder / MODEL_FILE)
    if isinstance(tokenizer, HFChatTokenizer):
        if tokenizer.text_tokenizer is None:
            raise CheckpointError(f"{folder}: a run keeps its caption tokenizer; this chat tokenizer carries none")
        tokenizer.save(folder / CHAT_TOKENIZER_FILE)
        tokenizer = tokenizer.text_tokenizer
    tokenizer.save(folder / TOKENIZER_FILE)


def save_state_dict(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """A state dict as safetensors; tied entries (one tensor under two names) are stored once, the tie recorded.

    safetensors refuses tensors that share memory, and an LM with tied embeddings (GPT-2's lm_head
    and wte) has two names for one Parameter: the later name is kept in the file's metadata
    (``ALIASES_KEY``) and :func:`load_tensors` gives it back, so a strict ``load_state_dict`` fills
    the one Parameter and the tie stays. Views that overlap without being the same tensor are copied.
    """
    weights, aliases = untie(state)
    metadata = {"format": "pt"} | ({ALIASES_KEY: json.dumps(aliases, sort_keys=True)} if aliases else {})
    save_file(weights, str(path), metadata=metadata)


def untie(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, {alias: name}): each tensor shared by several names kept once, under the first name, on the CPU."""
    weights: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}  # (storage, offset, shape, stride) -> the first name of that exact tensor
    storages: set[int] = set()
    for name, value in state.items():
        value = value.detach()
        if value.numel() == 0:  # empty tensors own no memory to share
            weights[name] = value.cpu()
            continue
        storage = value.untyped_storage().data_ptr()
        view = (storage, value.storage_offset(), tuple(value.shape), tuple(value.stride()))
        if view in first:
            aliases[name] = first[view]
            continue
        first[view] = name
        weights[name] = value.contiguous().cpu() if storage not in storages else value.clone().contiguous().cpu()
        storages.add(storage)
    return weights, aliases


@contextmanager
def model_directory(directory: Path) -> Iterator[Path]:
    """A staging folder that replaces ``directory`` when the block ends without an error.

    Into an existing directory (a run's root) the weights are renamed first and the trainer
    state last, so a reader that finds the new state finds the new weights too.
    """
    with atomic_directory(directory, first=(MODEL_FILE,), last=(MANIFEST_FILE, STATE_FILE)) as staging:
        yield staging
        write_manifest(staging)


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> Path:
    """Record the sha256 and size of every file in a (staging) folder in its checkpoint.json."""
    files = {
        path.name: {"sha256": file_sha256(path), "bytes": path.stat().st_size}
        for path in sorted(Path(folder).iterdir())
        if path.is_file() and path.name != MANIFEST_FILE
    }
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps({"format": 1, "files": files}, indent=1) + "\n", encoding="utf-8")
    return path


def verify_checkpoint(directory: Path, required: Sequence[str] = MODEL_FILES) -> bool:
    """Check every file listed in checkpoint.json (size, then sha256) and that ``required`` exist.

    Returns False (after logging a note) for a folder without checkpoint.json, written before
    checksums; raises :class:`CheckpointError` naming the file that is missing or damaged.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint folder not found")
    for name in required:
        require_file(directory, name)
    manifest = directory / MANIFEST_FILE
    if not manifest.is_file():
        logger.info("%s: no %s (written before checksums): its files are loaded unverified", directory, MANIFEST_FILE)
        return False
    for name, expected in _manifest_files(manifest).items():
        _verify_file(directory / name, expected, manifest)
    return True


def _manifest_files(manifest: Path) -> dict[str, dict[str, object]]:
    """The ``files`` table of a checkpoint.json, checked for shape."""
    try:
        files = strict_json_loads(manifest.read_bytes())["files"]
        if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("bytes"), int)
            and "/" not in name and name not in ("", ".", "..") for name, e in files.items()
        ):
            raise JsonError("'files' must map plain file names to {'sha256': str, 'bytes': int}")
    except (JsonError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest}: damaged checkpoint manifest ({exc})") from None
    return files


def _verify_file(path: Path, expected: dict[str, object], manifest: Path) -> None:
    """One file against its manifest entry: present, the recorded size, the recorded sha256."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (listed in {manifest.name}); the checkpoint is incomplete")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(f"{path}: damaged, {size} bytes where {manifest.name} records "
                              f"{expected['bytes']} (truncated or partly copied)")
    if file_sha256(path) != expected["sha256"]:
        raise CheckpointError(f"{path}: damaged, its sha256 does not match {manifest.name} "
                              f"(flipped bits or a bad copy); use another checkpoint")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, tied names given back (:func:`save_state_dict`); unreadable: a CheckpointError."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (no __contains__)
            metadata = handle.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError) as exc:  # what safetensors raises on bad bytes
        raise CheckpointError(f"{path}: damaged or not a safetensors file ({exc})") from None
    return tensors | _aliased(tensors, metadata.get(ALIASES_KEY), path)


def _aliased(tensors: dict[str, torch.Tensor], recorded: str | None, path: Path) -> dict[str, torch.Tensor]:
    """{alias: the tensor it shares} from the file's recorded ties; a tie naming no tensor is a CheckpointError."""
    if recorded is None:
        return {}
    try:
        aliases = strict_json_loads(recorded.encode())
        if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
            raise JsonError("expected {alias: name}")
    except JsonError as exc:
        raise CheckpointError(f"{path}: damaged {ALIASES_KEY} metadata ({exc})") from None
    unknown = sorted(name for name in aliases.values() if name not in tensors)
    if unknown:
        raise CheckpointError(f"{path}: {ALIASES_KEY} ties names to tensors the file lacks: {unknown[:5]}")
    return {alias: tensors[name] for alias, name in aliases.items()}


def require_file(directory: Path, name: str) -> Path:
    """``directory / name``, or a CheckpointError saying the folder is not a checkpoint."""
    path = Path(directory) / name
    if not path.exists():
        raise CheckpointError(f"{directory}: not a personae checkpoint, {name} is missing")
    return path


def load_model(directory: Path, device: str | torch.device = "cpu"
               ) -> tuple[PersonaeModel, Config, Tokenizer | HFChatTokenizer]:
    """Verify the checksums, rebuild the model from config.json, load model.safetensors (strict).

    The tokenizer is the run's chat tokenizer when it has a Hugging Face decoder, else tokenizer.json's.
    """
    verify_checkpoint(directory)
    config = load_config(require_file(directory, CONFIG_FILE))
    tokenizer = load_tokenizer(directory, config)
    model = PersonaeModel(config.model)
    weights = load_tensors(require_file(directory, MODEL_FILE))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: weights do not match config.json (missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    return model.to(device), config, tokenizer


def load_tokenizer(directory: Path, config: Config) -> Tokenizer | HFChatTokenizer:
    """tokenizer.json, wrapped in the run's chat tokenizer when its decoder is a Hugging Face LM."""
    tokenizer = Tokenizer.from_file(require_file(directory, TOKENIZER_FILE))
    decoder = config.model.decoder
    if not (decoder.enabled and decoder.kind == "hf"):
        return tokenizer
    path = Path(directory) / CHAT_TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the run's decoder is a Hugging Face LM (model.decoder.kind hf) "
                              "and the run keeps the LM's tokenizer and chat template in this file")
    return HFChatTokenizer.load(path, text_tokenizer=tokenizer)


def caption_tokenizer(tokenizer: Tokenizer | HFChatTokenizer) -> Tokenizer:
    """The tokenizer of captions (the text tower's): a chat tokenizer's text_tokenizer, else the tokenizer itself."""
    if isinstance(tokenizer, HFChatTokenizer):
        if tokenizer.text_tokenizer is None:
            raise CheckpointError(f"{tokenizer.folder}: this chat tokenizer carries no caption tokenizer")
        return tokenizer.text_tokenizer
    return tokenizer
