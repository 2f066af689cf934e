"""Image-caption pair dataset and its collator, for pretraining (ITC / ITM / MLM).

Items hold uint8 pixels and unpadded token ids; :func:`collate_pairs` stacks, pads and
normalizes (through :func:`personae.data.images.normalize_pixels`, the one place that does).

Captions are tokenized once at construction and kept, like the cached pixels, in flat arrays
rather than lists of Python objects, so DataLoader workers forked from the main process share
them instead of copying pages as reference counts change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from personae.data.image_cache import ImageCache
from personae.data.images import DEFAULT_MAX_PIXELS, IMAGE_MEAN, IMAGE_STD, normalize_pixels, square_pixels
from personae.data.manifest import PairManifest
from personae.data.tokenizer import Tokenizer, pad_ids
from personae.errors import DataError

__all__ = ["PairDataset", "collate_pairs", "scene_group"]

def scene_group(scene_id: str) -> int:
    """A stable non-negative int64 id for a scene (same in every process, unlike ``hash``)."""
    digest = hashlib.blake2b(scene_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class PairDataset(Dataset):
    """Map-style dataset over a :class:`PairManifest`: one item per caption row.

    ``dataset[i]`` is ``{"image": uint8 (3, S, S), "input_ids": long (L,), "index": i,
    "group": int}`` where ``group`` is :func:`scene_group` of the row's ``scene_id``; rows with
    the same group show the same scene and must not serve as each other's negatives.
    With ``cache_images`` every distinct image file is decoded once, up front, into one uint8
    tensor (10,000 images at 64 px take 120 MB).
    """

    def __init__(
        self,
        manifest: PairManifest,
        tokenizer: Tokenizer,
        *,
        image_size: int,
        max_text_len: int,
        cache_images: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        num_threads: int | None = None,
        progress: bool = True,
    ) -> None:
        if len(manifest) == 0:
            raise DataError("manifest has no rows (for the requested split)", manifest.path)
        if image_size <= 0 or max_text_len <= 0:
            raise ValueError(
                f"image_size and max_text_len must be positive, got {image_size}, {max_text_len}"
            )
        self.manifest = manifest
        self.image_size = image_size
        self.max_text_len = max_text_len
        self.max_pixels = max_pixels
        self.pad_id = tokenizer.pad_id
        ids = tokenizer.encode_many((r.caption for r in manifest.records), max_length=max_text_len)
        self._token_offsets = np.cumsum([0] + [len(seq) for seq in ids], dtype=np.int64)
        self._tokens = np.fromiter((t for seq in ids for t in seq), dtype=np.int64,
                                   count=int(self._token_offsets[-1]))
        self._groups = np.array([scene_group(r.scene_id) for r in manifest.records], dtype=np.int64)
        self._cache: ImageCache | None = None
        if cache_images:
            self._build_cache(num_threads, progress)

    def _build_cache(self, num_threads: int | None, progress: bool = True) -> None:
        """Decode each distinct image file once (see :class:`ImageCache`)."""
        records = self.manifest.records
        self._cache = ImageCache([r.image for r in records], self.image_size,
                                 sources=[(self.manifest.path, r.line) for r in records],
                                 max_pixels=self.max_pixels, num_threads=num_threads, progress=progress)

    def __len__(self) -> int:
        return len(self._groups)

    def image(self, index: int) -> torch.Tensor:
        """uint8 pixels ``(3, S, S)`` of row ``index``."""
        if self._cache is not None:
            return self._cache[index]
        record = self.manifest.records[index]
        return square_pixels(record.image, self.image_size, max_pixels=self.max_pixels,
                             manifest=self.manifest.path, line=record.line).contiguous()

    def input_ids(self, index: int) -> torch.Tensor:
        """Token ids ``(L,)`` of row ``index`` (cls first, cut to ``max_text_len``)."""
        start, end = self._token_offsets[index], self._token_offsets[index + 1]
        return torch.from_numpy(self._tokens[start:end].copy())

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        index = index % len(self)
        return {
            "image": self.image(index),
            "input_ids": self.input_ids(index),
            "index": index,
            "group": int(self._groups[index]),
        }


def collate_pairs(
    items: Sequence[dict[str, Any]],
    pad_id: int,
    *,
    normalize: bool = True,
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
) -> dict[str, torch.Tensor]:
    """Batch :class:`PairDataset` items.

    Returns ``pixel_values`` (B, 3, S, S) float normalized (uint8 when ``normalize=False``, to
    normalize on the accelerator instead), ``input_ids`` (B, T) long right-padded with
    ``pad_id``, ``attention_mask`` (B, T) bool, ``index`` (B,) long and ``group`` (B,) long.
    Use ``functools.partial(collate_pairs, pad_id=tokenizer.pad_id)`` as a DataLoader collate_fn.
    """
    if len(items) == 0:
        raise ValueError("collate_pairs got an empty batch")
    pixels = torch.stack([item["image"] for item in items])  # (B, 3, S, S) uint8
    input_ids, attention_mask = pad_ids([item["input_ids"] for item in items], pad_id)
    return {
        "pixel_values": normalize_pixels(pixels, mean, std) if normalize else pixels,
        "input_ids": input_ids,  # (B, T)
        "attention_mask": attention_mask,  # (B, T)
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),  # (B,)
        "group": torch.tensor([item["group"] for item in items], dtype=torch.long),  # (B,)
    }
