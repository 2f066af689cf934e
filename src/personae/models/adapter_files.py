"""Adapter files with a checksum: ``<id>.safetensors`` and beside it ``<id>.sha256.json`` (its sha256 and size).

Like a checkpoint's ``checkpoint.json``: :func:`save_verified_adapter` writes the manifest after
the adapter, :func:`load_verified_adapter` checks it first, so a truncated or bit-flipped adapter
is an :class:`~personae.models.lora.AdapterError` naming the file, never a different character.
An adapter without a manifest (written before checksums, or copied without it) loads unverified,
with a note. The old manifest is removed before a new adapter is written, so an interrupted save
leaves an adapter without a manifest (loaded unverified), never one with a stale manifest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from personae.data.jsonl import JsonError, strict_json_loads
from personae.files import write_bytes_atomic
from personae.models.io import file_sha256
from personae.models.lora import (
    LORA_MARKERS,
    AdapterError,
    add_decoder_lora,
    apply_adapter,
    load_adapter,
    lora_settings,
    save_adapter,
)
from personae.models.model import PersonaeModel

log = logging.getLogger(__name__)
MANIFEST_SUFFIX = ".sha256.json"


def manifest_path(adapter: Path) -> Path:
    """RUN/adapters/mira.safetensors -> RUN/adapters/mira.sha256.json."""
    adapter = Path(adapter)
    return adapter.with_name(adapter.name.removesuffix(".safetensors") + MANIFEST_SUFFIX)


def save_verified_adapter(path: str | Path, tensors: Mapping[str, torch.Tensor],
                          metadata: Mapping[str, object] | None = None) -> Path:
    """Write the adapter (atomically), then its manifest; returns the adapter's path."""
    path = Path(path)
    manifest_path(path).unlink(missing_ok=True)
    save_adapter(path, tensors, metadata)
    record = {"format": 1, "file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}
    write_bytes_atomic(manifest_path(path), (json.dumps(record, indent=1) + "\n").encode())
    return path


def verify_adapter(path: str | Path) -> bool:
    """Check the adapter against its manifest: True when verified, False without a manifest; AdapterError if damaged."""
    path, manifest = Path(path), manifest_path(Path(path))
    if not path.is_file():
        raise AdapterError(f"adapter file not found: {path}")
    if not manifest.is_file():
        log.info("%s: no %s (written before checksums): loaded unverified", path, manifest.name)
        return False
    try:
        record = strict_json_loads(manifest.read_bytes())
        expected_size, expected_hash = record["bytes"], record["sha256"]
        if not isinstance(expected_size, int) or not isinstance(expected_hash, str):
            raise JsonError("'bytes' must be an integer and 'sha256' a string")
    except (JsonError, KeyError, TypeError) as error:
        raise AdapterError(f"{manifest}: damaged adapter manifest ({error})") from None
    size = path.stat().st_size
    if size != expected_size:
        raise AdapterError(f"{path}: damaged, {size} bytes where {manifest.name} records {expected_size} "
                           "(truncated or partly copied)")
    if file_sha256(path) != expected_hash:
        raise AdapterError(f"{path}: damaged, its sha256 does not match {manifest.name} (flipped bits or a bad copy)")
    return True


def load_verified_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`verify_adapter`, then the adapter's (tensors by parameter name, metadata)."""
    verify_adapter(path)
    return load_adapter(path)


def attach_adapter(model: PersonaeModel, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Copy an adapter's tensors into the model, first adding the fresh LoRA layers it was made with (if any)."""
    needs_lora = any(name.rsplit(".", 1)[-1] in LORA_MARKERS for name in tensors)
    if needs_lora and lora_settings(model) is None:
        if "lora_rank" not in metadata:
            raise AdapterError("the adapter holds LoRA tensors but records no lora_rank, and the model has no LoRA")
        add_decoder_lora(model, int(metadata["lora_rank"]), float(metadata.get("lora_alpha", 8.0)))
    apply_adapter(model, tensors)


__all__ = ["MANIFEST_SUFFIX", "attach_adapter", "load_verified_adapter", "manifest_path", "save_verified_adapter",
           "verify_adapter"]
