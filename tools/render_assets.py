"""Render the scene-world emoji asset pack (atlas PNG + objects.json) from Noto Color Emoji.

Run ``python tools/render_assets.py`` on a machine with the font installed
(Debian/Ubuntu: ``apt-get install fonts-noto-color-emoji``). The package itself only reads the
committed output in ``assets/``, so nobody needs the font to use it.
"""

from __future__ import annotations

import argparse
import json
import math
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from personae.world.catalog import ASSETS_DIR, ATLAS_FILE, GLYPH_PX, OBJECTS_FILE

DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
ATLAS_COLUMNS = 16
FONT_SIZE = 109  # the only size at which the CBDT bitmaps of Noto Color Emoji load

# (name, code point, plural or "" for the regular English plural), by category. Names are chosen
# so that no name (or plural) is a word-for-word part of another, none is the plural of another,
# and none uses a number, position or setting word: a caption or a reply can then be parsed
# back into objects with a plain word-boundary match.
CATALOG: dict[str, list[tuple[str, int, str]]] = {
    "animals": [
        ("dog", 0x1F415, ""), ("cat", 0x1F408, ""), ("mouse", 0x1F401, "mice"),
        ("rabbit", 0x1F407, ""), ("horse", 0x1F40E, ""), ("cow", 0x1F404, ""),
        ("pig", 0x1F416, ""), ("sheep", 0x1F411, "sheep"), ("chicken", 0x1F414, ""),
        ("duck", 0x1F986, ""), ("penguin", 0x1F427, ""), ("turtle", 0x1F422, ""),
        ("snake", 0x1F40D, ""), ("elephant", 0x1F418, ""), ("monkey", 0x1F412, ""),
        ("owl", 0x1F989, ""), ("fish", 0x1F41F, "fish"), ("whale", 0x1F40B, ""),
        ("butterfly", 0x1F98B, "butterflies"), ("snail", 0x1F40C, ""),
        ("octopus", 0x1F419, "octopuses"), ("giraffe", 0x1F992, ""), ("camel", 0x1F42B, ""),
        ("crab", 0x1F980, ""),
    ],
    "food": [
        ("red apple", 0x1F34E, ""), ("banana", 0x1F34C, ""), ("watermelon", 0x1F349, ""),
        ("lemon", 0x1F34B, ""), ("pear", 0x1F350, ""), ("peach", 0x1F351, "peaches"),
        ("strawberry", 0x1F353, "strawberries"), ("pineapple", 0x1F34D, ""),
        ("carrot", 0x1F955, ""), ("tomato", 0x1F345, "tomatoes"), ("avocado", 0x1F951, "avocados"),
        ("potato", 0x1F954, "potatoes"), ("loaf of bread", 0x1F35E, "loaves of bread"),
        ("croissant", 0x1F950, ""), ("pizza", 0x1F355, ""), ("hamburger", 0x1F354, ""),
        ("doughnut", 0x1F369, ""), ("cookie", 0x1F36A, ""), ("birthday cake", 0x1F382, ""),
        ("cupcake", 0x1F9C1, ""), ("ice cream", 0x1F368, ""), ("lollipop", 0x1F36D, ""),
        ("mango", 0x1F96D, "mangoes"), ("egg", 0x1F95A, ""), ("sandwich", 0x1F96A, "sandwiches"),
    ],
    "plants": [
        ("fir tree", 0x1F332, ""), ("palm tree", 0x1F334, ""), ("leafy tree", 0x1F333, ""),
        ("cactus", 0x1F335, "cacti"), ("sunflower", 0x1F33B, ""), ("tulip", 0x1F337, ""),
        ("rose", 0x1F339, ""), ("hibiscus", 0x1F33A, "hibiscuses"),
        ("cherry blossom", 0x1F338, ""), ("clover", 0x1F340, ""),
        ("maple leaf", 0x1F341, "maple leaves"),
        ("fallen leaf", 0x1F342, "fallen leaves"), ("mushroom", 0x1F344, ""),
        ("seedling", 0x1F331, ""), ("bouquet", 0x1F490, ""), ("potted plant", 0x1FAB4, ""),
        ("daisy", 0x1F33C, "daisies"), ("wilted flower", 0x1F940, ""),
        ("sheaf of rice", 0x1F33E, "sheaves of rice"),
    ],
    "vehicles": [
        ("car", 0x1F697, ""), ("taxi", 0x1F695, ""), ("bus", 0x1F68C, "buses"),
        ("fire engine", 0x1F692, ""), ("ambulance", 0x1F691, ""), ("truck", 0x1F69A, ""),
        ("tractor", 0x1F69C, ""), ("bicycle", 0x1F6B2, ""), ("motorcycle", 0x1F3CD, ""),
        ("scooter", 0x1F6F5, ""), ("airplane", 0x2708, ""), ("helicopter", 0x1F681, ""),
        ("rocket", 0x1F680, ""), ("sailboat", 0x26F5, ""), ("speedboat", 0x1F6A4, ""),
        ("ship", 0x1F6A2, ""), ("locomotive", 0x1F682, ""), ("tram", 0x1F68A, ""),
        ("canoe", 0x1F6F6, ""), ("flying saucer", 0x1F6F8, ""), ("bullet train", 0x1F685, ""),
    ],
    "buildings": [
        ("house", 0x1F3E0, ""), ("castle", 0x1F3F0, ""), ("post office", 0x1F3E3, ""),
        ("hospital", 0x1F3E5, ""), ("bank", 0x1F3E6, ""), ("hotel", 0x1F3E8, ""),
        ("school", 0x1F3EB, ""), ("department store", 0x1F3EC, ""),
        ("factory", 0x1F3ED, "factories"),
        ("church", 0x26EA, "churches"), ("mosque", 0x1F54C, ""), ("office building", 0x1F3E2, ""),
        ("tent", 0x26FA, ""), ("hut", 0x1F6D6, ""), ("fountain", 0x26F2, ""),
        ("ferris wheel", 0x1F3A1, ""), ("roller coaster", 0x1F3A2, ""), ("stadium", 0x1F3DF, ""),
        ("classical building", 0x1F3DB, ""), ("synagogue", 0x1F54D, ""),
    ],
    "weather and sky": [
        ("sun", 0x2600, ""), ("moon", 0x1F319, ""), ("star", 0x2B50, ""), ("cloud", 0x2601, ""),
        ("rainbow", 0x1F308, ""), ("umbrella", 0x2614, ""), ("snowflake", 0x2744, ""),
        ("lightning bolt", 0x26A1, ""), ("tornado", 0x1F32A, "tornadoes"),
        ("water drop", 0x1F4A7, ""), ("comet", 0x2604, ""), ("flame", 0x1F525, ""),
        ("planet", 0x1FA90, ""), ("snowman", 0x26C4, "snowmen"), ("cyclone", 0x1F300, ""),
        ("ocean wave", 0x1F30A, ""), ("volcano", 0x1F30B, "volcanoes"),
        ("thermometer", 0x1F321, ""),
    ],
    "tools and objects": [
        ("hammer", 0x1F528, ""), ("wrench", 0x1F527, "wrenches"), ("key", 0x1F511, ""),
        ("pair of scissors", 0x2702, "pairs of scissors"), ("light bulb", 0x1F4A1, ""),
        ("flashlight", 0x1F526, ""), ("padlock", 0x1F512, ""),
        ("magnifying glass", 0x1F50D, "magnifying glasses"), ("hourglass", 0x231B, "hourglasses"),
        ("alarm clock", 0x23F0, ""), ("telephone", 0x260E, ""), ("laptop", 0x1F4BB, ""),
        ("book", 0x1F4D6, ""), ("pencil", 0x270F, ""), ("paintbrush", 0x1F58C, "paintbrushes"),
        ("axe", 0x1FA93, "axes"), ("magnet", 0x1F9F2, ""), ("ladder", 0x1FA9C, ""),
        ("bucket", 0x1FAA3, ""), ("candle", 0x1F56F, ""), ("backpack", 0x1F392, ""),
        ("camera", 0x1F4F7, ""), ("television", 0x1F4FA, ""), ("bell", 0x1F514, ""),
        ("compass", 0x1F9ED, "compasses"), ("broom", 0x1F9F9, ""), ("crown", 0x1F451, ""),
        ("gem", 0x1F48E, ""),
    ],
    "sports and toys": [
        ("soccer ball", 0x26BD, ""), ("basketball", 0x1F3C0, ""),
        ("american football", 0x1F3C8, ""), ("baseball", 0x26BE, ""),
        ("tennis racket", 0x1F3BE, ""),
        ("kite", 0x1FA81, ""), ("yo-yo", 0x1FA80, "yo-yos"), ("teddy bear", 0x1F9F8, ""),
        ("puzzle piece", 0x1F9E9, ""), ("game die", 0x1F3B2, "game dice"), ("balloon", 0x1F388, ""),
        ("skateboard", 0x1F6F9, ""), ("ice skate", 0x26F8, ""), ("roller skate", 0x1F6FC, ""),
        ("trophy", 0x1F3C6, "trophies"), ("medal", 0x1F3C5, ""), ("boxing glove", 0x1F94A, ""),
        ("ping pong paddle", 0x1F3D3, ""), ("fishing rod", 0x1F3A3, ""), ("pinata", 0x1FA85, ""),
        ("nesting doll", 0x1FA86, ""), ("magic wand", 0x1FA84, ""),
        ("game controller", 0x1F3AE, ""), ("dartboard", 0x1F3AF, ""), ("guitar", 0x1F3B8, ""),
        ("drum", 0x1F941, ""), ("trumpet", 0x1F3BA, ""), ("violin", 0x1F3BB, ""),
        ("sled", 0x1F6F7, ""),
    ],
}


def regular_plural(name: str) -> str:
    """The regular English plural of the last word of ``name``."""
    if name.endswith(("s", "x", "z", "ch", "sh")):
        return name + "es"
    if name.endswith("y") and name[-2:-1] not in tuple("aeiou"):
        return name[:-1] + "ies"
    return name + "s"


def indefinite_article(name: str) -> str:
    """'a' or 'an' by sound: vowel letters take 'an', as does a silent h (hourglass)."""
    return "an" if name[0] in "aeiou" or name.startswith("hour") else "a"


def catalog_entries() -> list[dict]:
    """The catalog as the list of JSON records written to objects.json (atlas order)."""
    entries = []
    for category, rows in CATALOG.items():
        for name, codepoint, plural in rows:
            entries.append({
                "name": name,
                "plural": plural or regular_plural(name),
                "article": indefinite_article(name),
                "category": category,
                "codepoint": f"U+{codepoint:04X}",
                "unicode_name": unicodedata.name(chr(codepoint)),
                "index": len(entries),
            })
    return entries


def render_glyph(font: ImageFont.FreeTypeFont, char: str, size: int = GLYPH_PX) -> Image.Image:
    """Draw one emoji, crop it to its bounding box and fit it, centred, in a size x size RGBA."""
    canvas = Image.new("RGBA", (192, 192), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((24, 24), char, font=font, embedded_color=True)
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        raise ValueError(f"the font has no glyph for U+{ord(char[0]):04X}")
    glyph = canvas.crop(bbox)
    scale = size / max(glyph.size)
    fitted = glyph.resize(
        (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
        Image.Resampling.LANCZOS,
    )
    cell = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    cell.paste(fitted, ((size - fitted.width) // 2, (size - fitted.height) // 2))
    return cell


def render_atlas(font_path: Path, entries: list[dict]) -> Image.Image:
    """Render every catalog entry into one atlas of GLYPH_PX cells, ATLAS_COLUMNS per row."""
    font = ImageFont.truetype(str(font_path), FONT_SIZE)
    rows = math.ceil(len(entries) / ATLAS_COLUMNS)
    atlas = Image.new("RGBA", (ATLAS_COLUMNS * GLYPH_PX, rows * GLYPH_PX), (0, 0, 0, 0))
    for entry in entries:
        glyph = render_glyph(font, chr(int(entry["codepoint"][2:], 16)))
        if np.asarray(glyph)[..., 3].max() == 0:
            raise ValueError(f"{entry['name']} rendered empty")
        row, col = divmod(entry["index"], ATLAS_COLUMNS)
        atlas.paste(glyph, (col * GLYPH_PX, row * GLYPH_PX))
    return atlas


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: render the atlas and write objects.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--font", type=Path, default=DEFAULT_FONT, help="NotoColorEmoji.ttf")
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="asset directory")
    args = parser.parse_args(argv)
    if not args.font.is_file():
        parser.error(f"--font {args.font} not found (apt-get install fonts-noto-color-emoji)")
    entries = catalog_entries()
    atlas = render_atlas(args.font, entries)
    args.out.mkdir(parents=True, exist_ok=True)
    # A 256-colour palette keeps the committed atlas ~130 kB instead of ~700 kB; at the cell
    # sizes scenes use (a third of 48-96 px) the difference is invisible.
    palette = atlas.quantize(256, method=Image.Quantize.FASTOCTREE)
    palette.save(args.out / ATLAS_FILE, optimize=True)
    text = json.dumps(entries, indent=1, ensure_ascii=False) + "\n"
    (args.out / OBJECTS_FILE).write_text(text, encoding="utf-8")
    print(f"wrote {len(entries)} glyphs to {args.out}")


if __name__ == "__main__":
    main()
