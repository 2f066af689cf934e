"""The characters a server knows: trained (RUN/characters), uploaded (RUN/uploads), and their adapters.

* Trained cards come with the fine-tuned run and are read-only here.
* Uploaded cards (JSON or PNG, validated by :func:`personae.data.cards.load_card`) are written, byte
  for byte as uploaded, to ``RUN/uploads/<id>.json|png`` so that they survive a restart and export
  losslessly (the PNG keeps its transparency and every chunk); DELETE removes the file.
* A character is *adapted* when ``RUN/adapters/<id>.safetensors`` exists (written by `personae
  adapt` or by an adaptation job); :mod:`personae.serve.adapters` applies it per request.

A character's id is its card file's stem (trained) or a slug of its name (uploaded).
"""

from __future__ import annotations

import io
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from personae.data.cards import MAX_AVATAR_PIXELS, CharacterCard, card_png_bytes, default_avatar, load_card
from personae.data.convert import slugify
from personae.data.images import model_pixels
from personae.errors import PersonaeError
from personae.files import write_bytes_atomic

log = logging.getLogger(__name__)
Source = Literal["trained", "uploaded"]
MODEL_PREFIX = "personae/"
_CARD_SUFFIXES = (".json", ".png")


class CharacterNotFound(PersonaeError, LookupError):
    """No character with that id, model name or card name; the message lists some known ids."""


class CharacterExists(PersonaeError):
    """An upload whose id is already taken."""


class CharacterReadOnly(PersonaeError):
    """A trained character cannot be deleted through the API (it belongs to the run)."""


@dataclass
class CharacterEntry:
    """A known character: id, card, where its card file lives and where it came from."""

    id: str
    card: CharacterCard
    path: Path
    source: Source
    adapter: Path

    @property
    def model(self) -> str:
        """The name clients put in `model`."""
        return MODEL_PREFIX + self.id

    @property
    def adapted(self) -> bool:
        return self.adapter.is_file()

    @property
    def created(self) -> int:
        return int(self.path.stat().st_mtime) if self.path.exists() else 0


class CharacterRegistry:
    """Lists, finds, adds and removes characters of one run; thread-safe; caches avatars as pixels."""

    def __init__(self, run_dir: Path, *, image_size: int) -> None:
        self.run_dir = Path(run_dir)
        self.trained_dir = self.run_dir / "characters"
        self.upload_dir = self.run_dir / "uploads"
        self.adapter_dir = self.run_dir / "adapters"
        self.image_size = image_size
        self._lock = threading.RLock()
        self._entries: dict[str, CharacterEntry] = {}
        self._pixels: dict[str, torch.Tensor] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read both card folders: an unreadable trained card is an error, an unreadable upload is skipped.

        Uploads stored by an older, laxer version (a card with ``Infinity`` before strict JSON) must not
        stop the server: each is logged with its file and the reason, and kept in ``skipped``.
        """
        entries: dict[str, CharacterEntry] = {}
        skipped: dict[Path, str] = {}
        for folder, source in ((self.trained_dir, "trained"), (self.upload_dir, "uploaded")):
            if not folder.is_dir():
                continue
            for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in _CARD_SUFFIXES):
                if path.stem in entries:
                    continue  # a trained id wins over an upload of the same id
                try:
                    card = load_card(path)
                except (PersonaeError, OSError) as error:  # a CardError, an unreadable file
                    if source == "trained":
                        raise
                    skipped[path] = str(error)
                    log.warning("skipping the uploaded card %s: %s (delete or fix the file)", path, error)
                    continue
                entries[path.stem] = CharacterEntry(path.stem, card, path, source,  # type: ignore[arg-type]
                                                    self.adapter_dir / f"{path.stem}.safetensors")
        self.skipped = skipped
        with self._lock:
            self._entries = entries
            self._pixels = {k: v for k, v in self._pixels.items() if k in entries}

    def list(self) -> list[CharacterEntry]:
        """Every character, trained first, then uploaded, each by id."""
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: (e.source != "trained", e.id))

    def find(self, name: str) -> CharacterEntry | None:
        """By id, `personae/<id>`, or card name (any case); None when unknown."""
        wanted = name.strip()
        wanted = wanted.removeprefix(MODEL_PREFIX)
        with self._lock:
            if wanted in self._entries:
                return self._entries[wanted]
            lowered = wanted.lower()
            return next((e for e in self.list() if e.card.name.lower() == lowered or e.id == lowered), None)

    def get(self, name: str) -> CharacterEntry:
        """Like find, but an unknown name raises CharacterNotFound listing known ids."""
        entry = self.find(name)
        if entry is None:
            known = [e.id for e in self.list()]
            shown = ", ".join(known[:12]) + (" ..." if len(known) > 12 else "") if known else "none"
            raise CharacterNotFound(f"no character '{name}'; known: {shown}")
        return entry

    def add(self, raw: bytes, *, max_pixels: int = MAX_AVATAR_PIXELS) -> CharacterEntry:
        """Validate and store an uploaded card (JSON or PNG bytes); raises CardError or CharacterExists."""
        card = load_card(raw, name="uploaded card", max_pixels=max_pixels)
        entry_id = slugify(card.name)
        with self._lock:
            if entry_id in self._entries:
                where = self._entries[entry_id].source
                raise CharacterExists(f"a {where} character with id '{entry_id}' already exists; "
                                      f"delete it first or rename the card")
            path = self.upload_dir / f"{entry_id}{'.png' if card.avatar is not None else '.json'}"
            write_bytes_atomic(path, raw)  # the upload itself, validated: what an export gives back
            entry = CharacterEntry(entry_id, card, path, "uploaded", self.adapter_dir / f"{entry_id}.safetensors")
            self._entries[entry_id] = entry
            return entry

    def remove(self, name: str) -> CharacterEntry:
        """Delete an uploaded character's card file; trained ones raise CharacterReadOnly."""
        with self._lock:
            entry = self.get(name)
            if entry.source != "uploaded":
                raise CharacterReadOnly(f"'{entry.id}' is a trained character of the run and cannot be deleted; "
                                        f"only uploaded characters can")
            entry.path.unlink(missing_ok=True)
            del self._entries[entry.id]
            self._pixels.pop(entry.id, None)
            return entry

    def card_json(self, entry: CharacterEntry) -> dict:
        """The card as JSON: a JSON card file as it is, a PNG card's card JSON (V3 when it has one)."""
        if entry.path.suffix.lower() == ".json":
            return json.loads(entry.path.read_bytes().decode("utf-8-sig"))
        return entry.card.to_json()

    def card_png(self, entry: CharacterEntry) -> bytes:
        """The card as PNG: a PNG card file byte for byte, else a PNG of the card on its generated avatar."""
        if entry.path.suffix.lower() == ".png":
            return entry.path.read_bytes()
        return card_png_bytes(entry.card)

    def avatar(self, entry: CharacterEntry, size: int = 256) -> Image.Image:
        """The card's own image, else a generated one."""
        if entry.card.avatar is not None:
            return Image.fromarray(np.asarray(entry.card.avatar, dtype=np.uint8)).convert("RGB")
        return default_avatar(entry.card.name, size)

    def avatar_png(self, entry: CharacterEntry) -> bytes:
        """The avatar as PNG bytes, at most 256 px on a side."""
        image = self.avatar(entry)
        image.thumbnail((256, 256))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    def pixels(self, entry: CharacterEntry) -> torch.Tensor:
        """The avatar as the model's (3, S, S) input: what the character looks at without an image."""
        with self._lock:
            if entry.id not in self._pixels:
                self._pixels[entry.id] = model_pixels(self.avatar(entry), self.image_size)
            return self._pixels[entry.id]
