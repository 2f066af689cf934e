"""Tests for image decoding: conversions, resizing, limits, corrupt files, normalization."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from personae.chat.session import ChatSession
from personae.data.cards import CharacterCard, save_card_png
from personae.data.image_cache import ImageCache
from personae.data.images import (
    IMAGE_MEAN,
    IMAGE_STD,
    denormalize_pixels,
    load_image,
    load_image_bytes,
    model_pixels,
    normalize_pixels,
    square_pixels,
    to_tensor,
)
from personae.data.roleplay import collate_roleplay
from personae.data.tokenizer import train_tokenizer
from personae.errors import DataError
from personae.models.model import PersonaeModel
from personae.serve.characters import CharacterRegistry
from personae.serve.completions import CompletionService
from personae.serve.settings import ServeSettings
from tests.conftest import micro_config


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


def _wide_picture() -> np.ndarray:
    """A 24x48 picture whose centred square differs from its sides, so a stretch cannot pass for a crop."""
    rng = np.random.default_rng(7)
    picture = rng.integers(0, 256, size=(24, 48, 3), dtype=np.uint8)
    picture[:, :12] = (255, 0, 0)  # the sides: pure red, cropped away by the square treatment
    picture[:, 36:] = (0, 0, 255)
    return picture


def test_square_pixels_crops_every_kind_of_source_the_same_way(tmp_path: Path) -> None:
    picture = _wide_picture()
    path = tmp_path / "wide.png"
    Image.fromarray(picture).save(path)
    from_file = square_pixels(path, 16)
    assert from_file.dtype == torch.uint8 and from_file.shape == (3, 16, 16)
    for source in (path.read_bytes(), picture, Image.fromarray(picture), str(path)):
        assert torch.equal(square_pixels(source, 16), from_file)
    crop = Image.fromarray(picture[:, 12:36]).resize((16, 16), Image.Resampling.BICUBIC, reducing_gap=3.0)
    assert torch.equal(from_file, torch.from_numpy(np.array(crop)).permute(2, 0, 1))  # cropped, not stretched
    stretched = np.asarray(Image.fromarray(picture).resize((16, 16)))
    assert not np.array_equal(np.asarray(crop), stretched)
    assert torch.equal(model_pixels(path, 16), normalize_pixels(from_file))
    with pytest.raises(TypeError, match="PIL image"):
        square_pixels(3.0, 16)  # type: ignore[arg-type]


def test_chat_server_and_training_give_the_model_the_same_tensor(tmp_path: Path) -> None:
    """One non-square picture as a training row, a chat image, a chat avatar, a server upload and a card avatar."""
    picture = _wide_picture()
    path = tmp_path / "wide.png"
    Image.fromarray(picture).save(path)
    model = PersonaeModel(micro_config().model)
    size = model.cfg.vision.image_size
    tokenizer = train_tokenizer(["Mira looks at the lighthouse.", "What do you see?"] * 20, vocab_size=300)

    cache = ImageCache([path], size, progress=False)  # training: decoded once, normalised in collate
    item = {"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([6, 7]), "index": 0, "image": cache[0]}
    training = collate_roleplay([item], pad_id=0)["pixel_values"][0]  # (3, S, S)

    card = CharacterCard(name="Mira", description="a keeper", avatar=picture)
    session = ChatSession(model, tokenizer, card)
    chat_avatar = session.pixels[0]
    session.set_image(path)
    chat_image = session.pixels[0]

    run = tmp_path / "run"
    save_card_png(card, run / "characters" / "mira.png")
    registry = CharacterRegistry(run, image_size=size)
    server_avatar = registry.pixels(registry.get("mira"))
    service = CompletionService(model, tokenizer, registry, ServeSettings(), include_examples=False)
    data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    server_upload = service._image(data_url, "messages[0].content[1].image_url.url")

    assert training.shape == (3, size, size)
    for name, pixels in {"chat avatar": chat_avatar, "chat image": chat_image, "server avatar": server_avatar,
                         "server upload": server_upload}.items():
        assert torch.equal(pixels, training), name


def _encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_only_png_jpeg_webp_and_gif_are_decoded() -> None:
    picture = Image.new("RGB", (6, 4), (10, 200, 30))
    for fmt in ("PNG", "JPEG", "WEBP", "GIF"):
        assert load_image_bytes(_encoded(picture, fmt, **({"quality": 100} if fmt != "PNG" else {}))).shape == (4, 6, 3)
    for fmt in ("BMP", "TIFF", "PPM", "ICO", "TGA", "PCX"):  # Pillow reads them all; personae does not
        data = _encoded(picture, fmt)
        with pytest.raises(DataError, match=r"not a readable image file: personae decodes only PNG, JPEG") as info:
            load_image_bytes(data, name=f"upload.{fmt.lower()}")
        assert str(info.value).startswith(f"upload.{fmt.lower()}")


def test_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    out = load_image_bytes(buffer.getvalue())
    assert out[0, 0].tolist() == [255, 0, 0]


def test_no_foreign_program_or_other_decoder_sees_the_bytes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from PIL import EpsImagePlugin

    def no_ghostscript(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ghostscript was asked to parse an input")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs")  # as if Ghostscript were installed
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
           b"%%EndComments\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")
    (tmp_path / "chat.png").write_bytes(eps)
    with pytest.raises(DataError, match="not a readable image file") as info:
        load_image(tmp_path / "chat.png")
    assert info.value.path == tmp_path / "chat.png"
    with pytest.raises(DataError, match="not a readable image file"):
        square_pixels(eps, 8, name="request image")
    # AVIF and DDS headers (formats some Pillow builds half-support) are refused up front too
    avif = b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(64)
    dds = b"DDS |\x00\x00\x00" + bytes(120)
    for data in (avif, dds):
        with pytest.raises(DataError, match="not a readable image file"):
            load_image_bytes(data, name="x")


def test_a_png_named_anything_is_still_only_decoded_as_png(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    real_open = Image.open

    def spy(fp: object, mode: str = "r", formats: object = None) -> Image.Image:
        seen.append(formats)
        return real_open(fp, mode, formats)

    monkeypatch.setattr(Image, "open", spy)
    load_image_bytes(_encoded(Image.new("RGB", (2, 2)), "PNG"))
    assert seen == [["PNG"]]
