"""Image decoding with size limits, RGB conversion, square resizing and normalization.

Every image that enters personae (manifest rows, cards, uploads to the server) goes through
:func:`load_image` or :func:`load_image_bytes`, so the limits and conversions are the same
everywhere; and every image the *model* looks at (training, evaluation, chat, serving, avatars)
goes through :func:`square_pixels` (uint8, what the training cache keeps) or :func:`model_pixels`
(normalised), so the same picture gives the same input tensor on every path:

* Only the formats of :data:`IMAGE_FORMATS` (PNG, JPEG, WebP and GIF, whose first frame is used)
  are decoded. The format is recognised by its magic bytes *before* Pillow sees the data, and
  Pillow is then told to try that one format only, so no other decoder (and no foreign program,
  such as Ghostscript for EPS) ever parses an input; anything else is a :class:`DataError`.
* The pixel count is read from the file header and checked against ``max_pixels`` *before* any
  pixel data is decoded (decompression bombs never allocate).
* Undecodable, truncated or oversized files raise :class:`~personae.errors.DataError` naming the
  file (and the manifest line, when the caller passes one).
* EXIF orientation is applied; palette / grey / alpha modes become RGB, with transparent pixels
  composited on white.
* With ``size`` given, the image is center-cropped to a square (the shorter side) and resized to
  ``size x size`` with bicubic resampling (never stretched).

Normalization lives here and only here: :func:`normalize_pixels` turns uint8 ``(..., 3, H, W)``
pixels into the float input the vision tower expects.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from personae.errors import DataError

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_FORMATS",
    "sniff_format",
    "load_image",
    "load_image_bytes",
    "square_pixels",
    "model_pixels",
    "to_tensor",
    "normalize_pixels",
    "denormalize_pixels",
]

# CLIP's statistics; pretrained HF towers that use other values pass their own mean/std.
IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS: int = 4096 * 4096

# The formats personae decodes, as Pillow names them, each with the magic bytes that identify it.
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF")
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)
_MAGIC_BYTES = 12  # enough for every signature above and for RIFF....WEBP

# what the model can be shown: a file, encoded bytes (an upload, a card), or decoded pixels
ImageSource = str | PathLike[str] | bytes | np.ndarray | Image.Image

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def load_image(
    path: str | PathLike[str],
    *,
    size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    manifest: str | PathLike[str] | None = None,
    line: int | None = None,
) -> np.ndarray:
    """Decode an image file to an RGB ``(H, W, 3)`` uint8 array (``(size, size, 3)`` if sized).

    When ``manifest``/``line`` are given, errors point at that manifest row and name the image.
    """
    path = Path(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise _error(f"image file not found: {path}", path, manifest, line) from None
    except OSError as exc:
        message = f"cannot open image {path}: {exc.strerror or exc}"
        raise _error(message, path, manifest, line) from exc
    with handle:
        return _decode(handle, str(path), size, max_pixels, manifest, line)


def load_image_bytes(
    data: bytes,
    *,
    size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str = "<bytes>",
) -> np.ndarray:
    """Decode an in-memory image (an upload, a card) with the same checks as :func:`load_image`.

    ``name`` is used in error messages in place of a file path.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"load_image_bytes expects bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise DataError("empty image data", name)
    return _decode(io.BytesIO(bytes(data)), name, size, max_pixels, None, None)


def square_pixels(
    image: ImageSource,
    size: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    manifest: str | PathLike[str] | None = None,
    line: int | None = None,
) -> torch.Tensor:
    """Any image -> uint8 ``(3, size, size)``: decoded with the limits, RGB, center square, resized.

    Files and bytes are decoded by :func:`load_image` / :func:`load_image_bytes` (``name``,
    ``manifest`` and ``line`` place their errors); arrays ``(H, W[, C])`` and Pillow images are
    already decoded and get the same RGB conversion and square treatment.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        array = load_image_bytes(image, size=size, max_pixels=max_pixels, name=name or "<bytes>")
    elif isinstance(image, (str, PathLike)):
        array = load_image(image, size=size, max_pixels=max_pixels, manifest=manifest, line=line)
    elif isinstance(image, (np.ndarray, Image.Image)):
        if size <= 0:
            raise ValueError(f"size must be a positive int, got {size}")
        decoded = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
        array = _finish(decoded, size)
    else:
        raise TypeError(f"expected a path, bytes, an array or a PIL image, got {type(image).__name__}")
    return torch.from_numpy(array).permute(2, 0, 1)  # (3, S, S)


def model_pixels(
    image: ImageSource,
    size: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
) -> torch.Tensor:
    """Any image -> the model's normalised float ``(3, size, size)`` input (chat, server, avatars).

    Equal to what training feeds the model for the same image: :func:`square_pixels` then
    :func:`normalize_pixels`, the two steps the training cache and collate functions take.
    """
    return normalize_pixels(square_pixels(image, size, max_pixels=max_pixels, name=name), mean, std)


def sniff_format(head: bytes) -> str | None:
    """The :data:`IMAGE_FORMATS` name whose magic bytes start ``head``, or None for anything else."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _error(
    message: str,
    image: str | PathLike[str],
    manifest: str | PathLike[str] | None,
    line: int | None,
) -> DataError:
    """Build a DataError located at the manifest row if there is one, else at the image."""
    if manifest is not None:
        return DataError(message, manifest, line)
    return DataError(message, image, line)


def _decode(
    stream: IO[bytes],
    name: str,
    size: int | None,
    max_pixels: int,
    manifest: str | PathLike[str] | None,
    line: int | None,
) -> np.ndarray:
    """Open lazily, check the header's pixel count, then decode, orient, convert and resize."""
    if size is not None and size <= 0:
        raise ValueError(f"size must be a positive int or None, got {size}")
    prefix = f"image {name}" if manifest is not None else "image"
    head = stream.read(_MAGIC_BYTES)
    stream.seek(0)
    image_format = sniff_format(head)
    if image_format is None:
        raise _error(
            f"{prefix} is not a readable image file: personae decodes only PNG, JPEG, WebP and GIF "
            f"(recognised by their first bytes), and these bytes start {head[:8]!r}",
            name,
            manifest,
            line,
        )
    try:
        # formats=[...]: Pillow may try only the sniffed decoder, never one chosen by the content
        with Image.open(stream, formats=[image_format]) as image:  # reads the header only
            width, height = image.size
            if width <= 0 or height <= 0:
                raise _error(f"{prefix} has an empty size {width}x{height}", name, manifest, line)
            if width * height > max_pixels:
                raise _error(
                    f"{prefix} is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels} (max_pixels); refusing to decode it",
                    name,
                    manifest,
                    line,
                )
            if size is not None:
                image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, >= size
            image.load()
            return _finish(image, size)
    except Image.DecompressionBombError as exc:
        raise _error(f"{prefix} is a decompression bomb: {exc}", name, manifest, line) from None
    except UnidentifiedImageError:
        raise _error(f"{prefix} is not a readable image file", name, manifest, line) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError) as exc:
        # a decoder that meets damaged data raises any of these; all mean "this file is broken"
        if isinstance(exc, DataError):
            raise
        raise _error(f"{prefix} is corrupt or truncated: {exc}", name, manifest, line) from None


def _finish(image: Image.Image, size: int | None) -> np.ndarray:
    """Apply EXIF orientation, convert to RGB and optionally crop/resize; return HWC uint8."""
    try:
        image = ImageOps.exif_transpose(image) or image
    except (ValueError, KeyError, TypeError, OSError, SyntaxError):
        pass  # malformed EXIF only loses the orientation hint; the pixels are fine
    image = _to_rgb(image)
    if size is not None:
        image = _center_square(image, size)
    array = np.array(image, dtype=np.uint8)  # a writable copy, safe for torch.from_numpy
    if array.ndim != 3 or array.shape[2] != 3:  # pragma: no cover - guarded by _to_rgb
        raise ValueError(f"unexpected decoded shape {array.shape}")
    return array


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; alpha is composited over a white background."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode.startswith("I;16"):
        high_byte = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        image = Image.fromarray(high_byte)  # 16-bit grey: keep the 8 most significant bits
    elif image.mode in ("I", "F"):
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _center_square(image: Image.Image, size: int) -> Image.Image:
    """Crop the largest centered square and resize it to ``size x size`` (bicubic)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))  # crop first: no bleed from outside
    return square.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)


def normalize_pixels(
    pixels: torch.Tensor,
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Map uint8 pixels ``(..., 3, H, W)`` to ``(x / 255 - mean) / std`` in ``dtype``."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"normalize_pixels expects uint8 pixels, got {pixels.dtype}")
    if pixels.ndim < 3 or pixels.shape[-3] != 3:
        raise ValueError(f"expected pixels shaped (..., 3, H, W), got {tuple(pixels.shape)}")
    mean_t = torch.tensor(mean, dtype=dtype, device=pixels.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=dtype, device=pixels.device).view(3, 1, 1)
    return pixels.to(dtype).div_(255.0).sub_(mean_t).div_(std_t)


def denormalize_pixels(
    values: torch.Tensor,
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
) -> torch.Tensor:
    """Invert :func:`normalize_pixels` back to uint8 ``(..., 3, H, W)`` (for reports and plots)."""
    mean_t = torch.tensor(mean, dtype=values.dtype, device=values.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=values.dtype, device=values.device).view(3, 1, 1)
    return (values * std_t + mean_t).mul(255.0).round().clamp(0, 255).to(torch.uint8)


def to_tensor(
    images: np.ndarray,
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
) -> torch.Tensor:
    """Turn uint8 HWC images ``(H, W, 3)`` or ``(B, H, W, 3)`` into normalized ``(B, 3, H, W)``."""
    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise TypeError(f"to_tensor expects uint8 images, got {array.dtype}")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected images shaped (H, W, 3) or (B, H, W, 3), got {array.shape}")
    pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)  # (B, 3, H, W)
    return normalize_pixels(pixels, mean, std)
