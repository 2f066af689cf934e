"""The server's character adapters: RUN/adapters/*.safetensors loaded into one AdapterBank.

`personae adapt` writes `RUN/adapters/<id>.safetensors`; an adaptation job through the API adapts
the served model in memory and hands its tensors over with :meth:`ServerAdapters.add` (and writes
the same file, for a restart). :class:`ServerAdapters` loads every LoRA adapter file into an
:class:`~personae.models.adapter_bank.AdapterBank`, so that requests for different characters
decode in one batch, each row with its own character's adapter. A run without LoRA layers (a
fine-tuned run whose adapters were made with fresh LoRA) gets the same no-op LoRA layers first
(rank and alpha from the adapter file): the base model's outputs do not change.

Adapter files that hold other tensors (a MAML adapter holds the whole model, ANIL's the final
LayerNorm) cannot be mixed per row; they are reported in `problems` (and in the character list)
and the character is played by the base model. `sync()` picks up new or rewritten files (by
modification time); the model is only changed while `lock` is held, which the decoding thread
also holds for every forward.

Operations: :meth:`load` applies an adapter file from any path (``POST /v1/adapters``),
:meth:`unload` takes one out of memory (``DELETE /v1/adapters/{id}``). With ``max_resident`` set,
applying one more adapter evicts the least recently used one that no running or queued request
uses (``in_use``); an evicted adapter whose file is known is loaded again when a request for its
character comes (:meth:`key`).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from personae.models.adapter_bank import AdapterBank
from personae.models.adapter_files import load_verified_adapter
from personae.models.lora import AdapterError, add_decoder_lora, lora_settings
from personae.models.model import PersonaeModel

log = logging.getLogger(__name__)
ADAPTER_SUFFIX = ".safetensors"


class ServerAdapters:
    """Which characters have an adapter applied per row, which adapter files could not be applied, and why."""

    def __init__(self, model: PersonaeModel, adapter_dir: Path, max_resident: int | None = None,
                 in_use: Callable[[], set[str]] = set) -> None:
        self.model, self.adapter_dir = model, Path(adapter_dir)
        self.max_resident, self.in_use = max_resident, in_use
        self.lock = threading.RLock()
        self.bank: AdapterBank | None = AdapterBank(model) if lora_settings(model) else None
        self.problems: dict[str, str] = {}
        self.evictions = 0
        self._loaded: dict[str, float] = {}  # id -> mtime of the file loaded
        self._sources: dict[str, Path] = {}  # id -> the file its adapter came from (to load it again)
        self._recent: OrderedDict[str, None] = OrderedDict()  # resident ids, least recently used first
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

    def add(self, character: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any],
            path: Path | None = None) -> bool:
        """Apply adapter tensors made in memory (and written to `path`); False, with a problem noted, if not."""
        try:
            as_saved = {str(key): str(value) for key, value in metadata.items()}  # what the file's metadata reads
            self._apply(character, tensors, as_saved, f"the adapter of {character}")
        except AdapterError as error:
            self.problems[character] = str(error)
            log.warning("adapter of %s is not applied by the server: %s", character, error)
            return False
        self.problems.pop(character, None)
        if path is not None and Path(path).is_file():  # sync() need not load the same file again
            self._loaded[character] = Path(path).stat().st_mtime
            self._sources[character] = Path(path)
        return True

    def load(self, character: str, path: Path) -> None:
        """Apply the adapter file at PATH to CHARACTER's requests; AdapterError when it cannot be applied."""
        path = Path(path)
        if path.suffix != ADAPTER_SUFFIX or not path.is_file():
            raise AdapterError(f"{path} is not a {ADAPTER_SUFFIX} adapter file")
        self._load(character, path)
        self.problems.pop(character, None)

    def unload(self, character: str) -> bool:
        """Take CHARACTER's adapter out of memory (its file stays); False when it was not resident."""
        with self.lock:
            self._sources.pop(character, None)
            self._recent.pop(character, None)
            return self.bank is not None and self.bank.remove(character)

    def source(self, character: str) -> Path | None:
        """The file CHARACTER's adapter was loaded from, when known."""
        return self._sources.get(character)

    def resident(self) -> list[str]:
        """The ids whose adapters are in memory, least recently used first."""
        return list(self._recent)

    def _load(self, character: str, path: Path) -> None:
        tensors, metadata = load_verified_adapter(path)  # a damaged file is an AdapterError naming it
        self._apply(character, tensors, metadata, path.name)
        self._sources[character] = path

    def _apply(self, character: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
               label: str) -> None:
        with self.lock:
            if self.bank is None:
                self._add_lora(metadata, label)
            assert self.bank is not None
            self.bank.add(character, dict(tensors))
            self._recent[character] = None
            self._recent.move_to_end(character)
            self._evict(keep=character)

    def _evict(self, keep: str) -> None:
        """Down to max_resident adapters: the least recently used ones no request uses go (their files stay)."""
        if self.max_resident is None or self.bank is None:
            return
        busy = self.in_use() | {keep}
        for character in [c for c in self._recent if c not in busy]:
            if len(self._recent) <= self.max_resident:
                break
            self._recent.pop(character)
            self.bank.remove(character)
            self.evictions += 1
            log.info("adapter of %s evicted (max_adapters=%d)", character, self.max_resident)

    def _add_lora(self, metadata: Mapping[str, str], label: str) -> None:
        """Give a LoRA-free model no-op LoRA layers of the adapter's rank (outputs unchanged), then a bank."""
        # adapter files written before the key was renamed say "params"
        inner_params = metadata.get("inner_params", metadata.get("params", "lora"))
        if inner_params != "lora" or "lora_rank" not in metadata:
            raise AdapterError(f"{label} adapts {inner_params!r} parameters, not LoRA adapters: only LoRA "
                               "adapters are applied per request")
        settings = lora_settings(self.model)  # an in-memory adaptation may have added them already
        if settings is None:
            add_decoder_lora(self.model, int(metadata["lora_rank"]), float(metadata.get("lora_alpha", 8.0)))
        self.bank = AdapterBank(self.model)

    def key(self, character: str | None) -> str | None:
        """The bank key of CHARACTER's adapter (loaded again if it was evicted), or None when none is applied."""
        if character is None or self.bank is None:
            return None
        with self.lock:
            if not self.bank.slot(character) and character in self._sources:
                try:
                    self._load(character, self._sources[character])
                except AdapterError as error:
                    self.problems[character] = str(error)
                    self._sources.pop(character)
            if not self.bank.slot(character):
                return None
            self._recent.move_to_end(character)
            self._evict(keep=character)  # adapters kept over the cap while in use go once free
        return character

    def status(self, character: str) -> str | None:
        """'applied' (resident, or evicted and loaded again when asked for), why a file is not applied, or None."""
        if character in self.problems:
            return "not applied: " + self.problems[character]
        held = self.bank is not None and (bool(self.bank.slot(character)) or character in self._sources)
        return "applied" if held else None


__all__ = ["ServerAdapters"]
