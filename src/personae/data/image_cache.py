"""Decode each distinct image file of a data set once, in a thread pool, into one uint8 tensor."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from personae.data.images import DEFAULT_MAX_PIXELS, square_pixels

_PROGRESS_THRESHOLD = 1000


class ImageCache:
    """Pixels (U, 3, S, S) uint8 of the U distinct files among `paths`, and each row's slot.

    `sources[i]` = (manifest path, line) of row i, so a bad image is reported where it is named.
    """

    def __init__(self, paths: Sequence[Path], size: int, *, sources: Sequence[tuple[Path, int]] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, num_threads: int | None = None,
                 progress: bool = True) -> None:
        slot_of: dict[Path, int] = {}
        first_row: list[int] = []
        for row, path in enumerate(paths):
            if path not in slot_of:
                slot_of[path] = len(first_row)
                first_row.append(row)
        self.size = size
        self.slots = torch.tensor([slot_of[p] for p in paths], dtype=torch.long)  # (N,)
        self.pixels = torch.empty((len(first_row), 3, size, size), dtype=torch.uint8)  # (U, 3, S, S)

        def decode(row: int):
            manifest, line = sources[row] if sources is not None else (None, None)
            return square_pixels(paths[row], size, max_pixels=max_pixels, manifest=manifest, line=line)

        workers = num_threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:  # Pillow releases the GIL while decoding
            progress = tqdm(pool.map(decode, first_row), total=len(first_row), desc="decoding images",
                            unit="img", disable=not progress or len(first_row) <= _PROGRESS_THRESHOLD)
            for slot, image in enumerate(progress):
                self.pixels[slot] = image

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, row: int) -> torch.Tensor:
        """uint8 pixels (3, S, S) of row `row`."""
        return self.pixels[int(self.slots[row])]
