"""Many characters' LoRA adapters in one model, chosen per batch row: one batch can mix characters.

A server holds one model and many adapter files (`adapters/<character>.safetensors`, each a few
kilobytes of `lora_A` / `lora_B` tensors). Copying a model per character would multiply memory and
split the running batch; instead :class:`AdapterBank` stacks every character's A and B per LoRA
layer into *slots* (slot 0 is the model's own adapters, i.e. no character adapter) and, inside
``with bank.route(rows)``, every :class:`~personae.models.lora.LoRALinear` computes its low-rank
term with the A and B of each row's slot:

    y[b] = base(x[b]) + scaling * (x[b] A[rows[b]]^T) B[rows[b]]^T        # batched matmuls

``rows`` may also be one int (every row uses that slot: the plain two-matmul path). Adapter files
that hold anything other than LoRA tensors (a full-model MAML adapter, an ANIL head) cannot be
mixed per row; :meth:`AdapterBank.add` refuses them with an :class:`AdapterError` naming the key.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from personae.models.lora import LORA_MARKERS, AdapterError, LoRALinear


class AdapterBank:
    """Slots of LoRA adapters for one model (slot 0: its own); `route` picks a slot per batch row."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
        if not self.layers:
            raise AdapterError("the model has no LoRA layers: add_lora first (the adapters' rank must match)")
        self._slots: dict[str, int] = {}  # key -> slot (>= 1)
        self._versions: dict[str, int] = {}
        self._banks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
            name: (m.lora_A.detach()[None].clone(), m.lora_B.detach()[None].clone()) for name, m in self.layers.items()}
        self._free: list[int] = []  # slots of removed adapters, reused by the next add
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """The number of character adapters held (slot 0 not counted)."""
        return len(self._slots)

    def slot(self, key: str | None) -> int:
        """The slot of KEY's adapter, or 0 (the model's own) when it has none."""
        return self._slots.get(key, 0) if key is not None else 0

    def version(self, key: str | None) -> int:
        """How many times KEY's adapter was (re)loaded: part of any cache key computed with it."""
        return self._versions.get(key, 0) if key is not None else 0

    def _split(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Adapter tensors grouped by LoRA layer; anything else is an error naming the key."""
        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            layer, _, marker = name.rpartition(".")
            if marker not in LORA_MARKERS:
                raise AdapterError(f"adapter tensor {name!r} is not a LoRA tensor: only LoRA adapters can be "
                                   "mixed per request (full-model and head adapters need a model of their own)")
            if layer not in self.layers:
                raise AdapterError(f"adapter tensor {name!r} names no LoRA layer of the model")
            own = getattr(self.layers[layer], marker)
            if own.shape != value.shape:
                raise AdapterError(f"adapter tensor {name!r} has shape {tuple(value.shape)}, the model's is "
                                   f"{tuple(own.shape)} (another LoRA rank?)")
            by_layer.setdefault(layer, {})[marker] = value
        return by_layer

    def add(self, key: str, tensors: Mapping[str, torch.Tensor]) -> int:
        """Load (or replace) KEY's adapter; layers it does not name keep the model's own. Its slot."""
        by_layer = self._split(tensors)
        with self._lock:
            slot = self._slots.get(key)
            banks = dict(self._banks)
            for name, (bank_A, bank_B) in banks.items():
                module = self.layers[name]
                new_A = by_layer.get(name, {}).get("lora_A", module.lora_A.detach()).to(bank_A)
                new_B = by_layer.get(name, {}).get("lora_B", module.lora_B.detach()).to(bank_B)
                if slot is None and self._free:  # reuse the slot of a removed adapter
                    bank_A, bank_B = bank_A.clone(), bank_B.clone()
                    bank_A[self._free[-1]], bank_B[self._free[-1]] = new_A, new_B
                    banks[name] = (bank_A, bank_B)
                elif slot is None:
                    banks[name] = (torch.cat([bank_A, new_A[None]]), torch.cat([bank_B, new_B[None]]))
                else:
                    bank_A, bank_B = bank_A.clone(), bank_B.clone()
                    bank_A[slot], bank_B[slot] = new_A, new_B
                    banks[name] = (bank_A, bank_B)
            if slot is None:
                slot = self._free.pop() if self._free else len(self._slots) + 1
                self._slots[key] = slot
            self._banks = banks  # swapped whole: a running route keeps the banks it started with
            self._versions[key] = self._versions.get(key, 0) + 1
        return slot

    def remove(self, key: str) -> bool:
        """Forget KEY's adapter: its slot gets the model's own tensors and is reused later. Whether it was held.

        A row decoding with the slot meanwhile would decode with the next adapter put there: the
        caller removes only adapters no running or queued row uses.
        """
        with self._lock:
            slot = self._slots.pop(key, None)
            if slot is None:
                return False
            banks = {}
            for name, (bank_A, bank_B) in self._banks.items():
                bank_A, bank_B = bank_A.clone(), bank_B.clone()
                bank_A[slot], bank_B[slot] = bank_A[0], bank_B[0]
                banks[name] = (bank_A, bank_B)
            self._banks = banks
            self._free.append(slot)
            self._versions[key] = self._versions.get(key, 0) + 1  # a cached head made with it is not reused
        return True

    @contextlib.contextmanager
    def route(self, rows: torch.Tensor | int) -> Iterator[None]:
        """Within the block, LoRA layers use slot `rows` (an int for all rows, or (B,) per row)."""
        banks = self._banks
        for name, module in self.layers.items():
            module.routing = (*banks[name], rows)
        try:
            yield
        finally:
            for module in self.layers.values():
                module.routing = None


__all__ = ["AdapterBank"]
