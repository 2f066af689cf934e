"""The server's character adapters: RUN/adapters/*.safetensors loaded into one AdapterBank.

`personae adapt` (or an adaptation job through the API) writes `RUN/adapters/<id>.safetensors`.
:class:`ServerAdapters` loads every LoRA adapter file into an
:class:`~personae.models.adapter_bank.AdapterBank`, so that requests for different characters
decode in one batch, each row with its own character's adapter. A run without LoRA layers (a
fine-tuned run whose adapters were made with fresh LoRA) gets the same no-op LoRA layers first
(rank and alpha from the adapter file): the base model's outputs do not change.

Adapter files that hold other tensors (a MAML adapter holds the whole model, ANIL's the final
LayerNorm) cannot be mixed per row; they are reported in `problems` (and in the character list)
and the character is played by the base model. `sync()` picks up new or rewritten files (by
modification time); the model is only changed while `lock` is held, which the decoding thread
also holds for every forward.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from personae.models.adapter_bank import AdapterBank
from personae.models.lora import AdapterError, add_lora, load_adapter, lora_settings
from personae.models.model import PersonaeModel

log = logging.getLogger(__name__)
ADAPTER_SUFFIX = ".safetensors"


class ServerAdapters:
    """Which characters have an adapter applied per row, which adapter files could not be applied, and why."""

    def __init__(self, model: PersonaeModel, adapter_dir: Path) -> None:
        self.model, self.adapter_dir = model, Path(adapter_dir)
        self.lock = threading.RLock()
        self.bank: AdapterBank | None = AdapterBank(model) if lora_settings(model) else None
        self.problems: dict[str, str] = {}
        self._loaded: dict[str, float] = {}  # id -> mtime of the file loaded
        self.sync()

    def sync(self) -> list[str]:
        """Load new or rewritten adapter files; the ids loaded now."""
        loaded = []
        if not self.adapter_dir.is_dir():
            return loaded
        for path in sorted(self.adapter_dir.glob("*" + ADAPTER_SUFFIX)):
            character, mtime = path.name.removesuffix(ADAPTER_SUFFIX), path.stat().st_mtime
            if self._loaded.get(character) == mtime:
                continue
            try:
                self._load(character, path)
            except AdapterError as error:
                self.problems[character] = str(error)
                log.warning("adapter of %s is not applied by the server: %s", character, error)
            else:
                self.problems.pop(character, None)
                loaded.append(character)
            self._loaded[character] = mtime
        return loaded

    def _load(self, character: str, path: Path) -> None:
        tensors, metadata = load_adapter(path)
        with self.lock:
            if self.bank is None:
                self._add_lora(metadata, path)
            assert self.bank is not None
            self.bank.add(character, tensors)

    def _add_lora(self, metadata: dict[str, str], path: Path) -> None:
        """Give a LoRA-free model no-op LoRA layers of the adapter's rank (outputs unchanged)."""
        if metadata.get("params", "lora") != "lora" or "lora_rank" not in metadata:
            raise AdapterError(f"{path.name} adapts {metadata.get('params', 'unknown')!r} parameters, not LoRA "
                               "adapters: only LoRA adapters are applied per request")
        device = next(self.model.parameters()).device
        add_lora(self.model, targets=("decoder",), rank=int(metadata["lora_rank"]),
                 alpha=float(metadata.get("lora_alpha", 8.0)))
        self.model.to(device)
        self.bank = AdapterBank(self.model)

    def key(self, character: str | None) -> str | None:
        """The bank key of CHARACTER's adapter, or None when none is applied."""
        if character is None or self.bank is None or not self.bank.slot(character):
            return None
        return character

    def status(self, character: str) -> str | None:
        """'applied', the reason an adapter file is not applied, or None when it has no adapter file."""
        if character in self.problems:
            return "not applied: " + self.problems[character]
        return "applied" if self.key(character) else None


__all__ = ["ServerAdapters"]
