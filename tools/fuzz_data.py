"""Mutation fuzzing of personae's data parsers: images, cards (JSON and PNG), manifest and dialogue rows.

Each input is a seed file with random byte flips, insertions, deletions and truncations. An
outcome is ``ok`` (parsed), ``error`` (the parser's documented error: DataError / CardError) or
``crash`` (any other exception); a call slower than ``--slow`` seconds counts as a hang. Prints one
JSON line per parser. Developer tool (not shipped); the figures go in docs/lab.

    PYTHONPATH=src python tools/fuzz_data.py --inputs 5000 --seed 0
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import random
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from personae.data.cards import CharacterCard, load_card, save_card_png
from personae.data.dialogues import parse_dialogue
from personae.data.images import load_image_bytes
from personae.data.jsonl import load_json_object
from personae.errors import DataError


def _encoded(fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    picture = Image.radial_gradient("L").resize((48, 32)).convert("RGB")
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _seeds() -> dict[str, list[bytes]]:
    """Seed inputs per parser: valid files of each accepted format, and foreign ones for images."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n"
    images = [_encoded(f) for f in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM")] + [eps]
    card = CharacterCard(name="Aria", description="d " * 40, tags=["a", "b"], extensions={"x": {"y": [1, 2.5]}})
    with tempfile.TemporaryDirectory() as folder:
        save_card_png(card, Path(folder) / "c.png", Image.new("RGB", (16, 16), (9, 99, 199)))
        png_card = (Path(folder) / "c.png").read_bytes()
    json_card = json.dumps(card.to_json()).encode()
    pair = json.dumps({"image": "a.png", "caption": "a dog on the beach", "scene_id": "s1", "meta": {"k": [1]}})
    dialogue = json.dumps({"character": "aria", "turns": [{"user": "hi", "reply": "hello"}], "split": "val"})
    return {"image": images, "card-png": [png_card], "card-json": [json_card],
            "manifest-row": [pair.encode()], "dialogue-row": [dialogue.encode()]}


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """A few random byte edits, sometimes a truncation, sometimes deep nesting or an odd literal."""
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):  # mostly small edits: most inputs stay near-valid
        if not out:
            break
        at = rng.randrange(len(out))
        choice = rng.random()
        if choice < 0.5:
            out[at] = rng.randrange(256)
        elif choice < 0.7:
            del out[at : at + rng.randint(1, 16)]
        elif choice < 0.85:
            out[at:at] = rng.choice([b"[" * 500, b"NaN", b"1e999", b"\\ud800", b"{", b"\xff", b'"', b"\x00"])
        else:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    if rng.random() < 0.2:
        out = out[: rng.randrange(len(out) + 1)]
    return bytes(out)


def _fix_png_crcs(data: bytes) -> bytes:
    """Recompute every PNG chunk's CRC, so that mutations reach the decoders past the CRC check."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    out, pos = bytearray(data[:8]), 8
    while pos + 12 <= len(data):
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        end = pos + 12 + length
        if end > len(data):
            break
        body = data[pos + 4 : end - 4]  # type and data
        out += data[pos : pos + 4] + body + struct.pack(">I", zlib.crc32(body))
        pos = end
    return bytes(out + data[pos:])


def _parsers() -> dict[str, Callable[[bytes], object]]:
    where = Path("fuzz.jsonl")
    return {
        "image": lambda raw: load_image_bytes(raw, name="fuzz", size=16),
        "card-png": lambda raw: load_card(raw, name="fuzz"),
        "card-json": lambda raw: load_card(raw, name="fuzz"),
        "manifest-row": lambda raw: load_json_object(raw.decode("utf-8", "replace"), where, 1),
        "dialogue-row": lambda raw: parse_dialogue(raw.decode("utf-8", "replace"), where, 1, check_images=False),
    }


def fuzz(inputs: int, seed: int, slow: float) -> list[dict[str, object]]:
    """Run ``inputs`` mutated inputs through each parser; one summary dict per parser."""
    rng = random.Random(seed)
    results = []
    for parser_name, parse in _parsers().items():
        seeds = _seeds()[parser_name]
        outcomes: collections.Counter[str] = collections.Counter()
        crashes: collections.Counter[str] = collections.Counter()
        slowest = 0.0
        for _ in range(inputs):
            raw = _mutate(rng.choice(seeds), rng)
            if rng.random() < 0.7:
                raw = _fix_png_crcs(raw)
            start = time.perf_counter()
            try:
                parse(raw)
                outcomes["ok"] += 1
            except DataError:
                outcomes["error"] += 1
            except Exception as exc:  # noqa: BLE001 - what the fuzzer looks for: anything undocumented
                outcomes["crash"] += 1
                crashes[f"{type(exc).__name__}: {str(exc)[:60]}"] += 1
            elapsed = time.perf_counter() - start
            slowest = max(slowest, elapsed)
            outcomes["hang"] += elapsed > slow
        results.append({"parser": parser_name, "inputs": inputs, **outcomes, "slowest_s": round(slowest, 3),
                        "crash_kinds": dict(crashes.most_common(5))})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=2000, help="mutated inputs per parser")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the mutations")
    parser.add_argument("--slow", type=float, default=1.0, help="seconds after which a call counts as a hang")
    args = parser.parse_args()
    for row in fuzz(args.inputs, args.seed, args.slow):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
