"""Tests for image decoding: conversions, resizing, limits, corrupt files, normalization."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from personae.data.images import (
    IMAGE_MEAN,
    IMAGE_STD,
    denormalize_pixels,
    load_image,
    load_image_bytes,
    normalize_pixels,
    to_tensor,
)
from personae.errors import DataError


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _patch_png_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite a PNG's IHDR width/height (with a valid CRC), leaving the pixel data as is."""
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + data[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return data[:16] + ihdr + crc + data[33:]


def test_rgb_round_trip_exact(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, pixels)
    out[0, 0] = 0  # writable


def test_mode_conversions() -> None:
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    out = load_image_bytes(_png_bytes(rgba))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # transparent -> white
    np.testing.assert_array_equal(out[0, 1], [10, 20, 30])
    half = load_image_bytes(_png_bytes(Image.new("RGBA", (1, 1), (0, 0, 0, 128))))
    assert 126 <= int(half[0, 0, 0]) <= 128
    grey = load_image_bytes(_png_bytes(Image.new("L", (3, 2), 77)))
    assert grey.shape == (2, 3, 3) and (grey == 77).all()
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    np.testing.assert_array_equal(load_image_bytes(_png_bytes(palette))[1, 1], [200, 100, 50])
    grey16 = Image.fromarray(np.full((2, 2), 0xAB00, dtype=np.uint16))
    assert (load_image_bytes(_png_bytes(grey16)) == 0xAB).all()


def test_center_crop_then_resize() -> None:
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, 20:40] = 255  # the centered square is white, the sides black
    out = load_image_bytes(_png_bytes(Image.fromarray(wide)), size=8)
    assert out.shape == (8, 8, 3)
    assert out.min() >= 250
    jpeg = io.BytesIO()
    Image.new("RGB", (300, 100), (0, 128, 255)).save(jpeg, format="JPEG", quality=95)
    small = load_image_bytes(jpeg.getvalue(), size=16)
    assert small.shape == (16, 16, 3)
    assert np.abs(small.astype(int) - [0, 128, 255]).max() <= 6
    with pytest.raises(ValueError, match="size"):
        load_image_bytes(jpeg.getvalue(), size=0)


def test_missing_corrupt_and_truncated_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image file not found"):
        load_image(tmp_path / "absent.png")
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(1).bytes(500))
    with pytest.raises(DataError, match="not a readable image") as info:
        load_image(tmp_path / "noise.png")
    assert info.value.path == tmp_path / "noise.png"
    noisy = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _png_bytes(Image.fromarray(noisy))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(DataError, match="empty image data"):
        load_image_bytes(b"")


def test_errors_point_at_manifest_line(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError) as info:
        load_image(tmp_path / "bad.png", manifest=tmp_path / "pairs.jsonl", line=17)
    assert str(info.value).startswith(f"{tmp_path / 'pairs.jsonl'}:17: image {tmp_path / 'bad.png'}")


def test_decompression_bomb_rejected_before_decoding() -> None:
    header_lies = _patch_png_size(_png_bytes(Image.new("RGB", (1, 1))), 5000, 5000)
    # The pixel data is 1x1: if anything decoded it, we would see a truncation error instead.
    with pytest.raises(DataError, match=r"5000x5000 = 25000000 pixels, over the limit"):
        load_image_bytes(header_lies, name="bomb.png")
    huge = _patch_png_size(_png_bytes(Image.new("RGB", (1, 1))), 100_000, 100_000)
    with pytest.raises(DataError, match="bomb.png"):
        load_image_bytes(huge, name="bomb.png", max_pixels=10**12)  # Pillow's own guard
    ok = _png_bytes(Image.new("RGB", (40, 30)))
    assert load_image_bytes(ok, max_pixels=1200).shape == (30, 40, 3)
    with pytest.raises(DataError, match="over the limit of 1199"):
        load_image_bytes(ok, max_pixels=1199)


def test_to_tensor_normalization_and_inverse() -> None:
    images = np.random.default_rng(3).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    values = to_tensor(images)
    assert values.shape == (2, 3, 4, 5) and values.dtype == torch.float32
    expected = (images[1, 2, 3, 0] / 255.0 - IMAGE_MEAN[0]) / IMAGE_STD[0]
    assert values[1, 0, 2, 3].item() == pytest.approx(expected, abs=1e-5)
    assert to_tensor(images[0]).shape == (1, 3, 4, 5)
    back = denormalize_pixels(values)
    torch.testing.assert_close(back, torch.from_numpy(images).permute(0, 3, 1, 2))
    with pytest.raises(TypeError):
        to_tensor(images.astype(np.float32))
    with pytest.raises(TypeError):
        normalize_pixels(torch.zeros(3, 2, 2))
