"""Procedurally drawn scene-world backgrounds ("settings"), each drawn with numpy at any size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Color = tuple[int, int, int]
DrawFn = Callable[[int, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Setting:
    """A named background: how to draw it and the phrases captions use for it."""

    name: str
    places: tuple[str, ...]  # adverbial phrases: "on the beach", "at night"
    views: tuple[str, ...]  # noun phrases: "a beach scene", "a snowy landscape"
    draw: DrawFn

    def render(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """Draw the background as a (size, size, 3) uint8 image."""
        image = self.draw(size, rng)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8, image.shape
        return image


# -- drawing helpers: images are float32 (S, S, 3) in 0..255 until _finish ----------------------


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1]: ys and xs, both (S, S), so every mask is (S, S)."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    return ys, xs


def _gradient(size: int, top: Color, bottom: Color) -> np.ndarray:
    """A vertical gradient from top colour to bottom colour."""
    ys, _ = _grid(size)
    t = ys[..., None]  # (S, 1, 1)
    image = (1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32)
    return np.broadcast_to(image, (size, size, 3)).copy()


def _wave(size: int, rng: np.random.Generator, base: float, amp: float, freq: float) -> np.ndarray:
    """A mask (S, S) of pixels below a sine skyline y = base + amp * sin(...) with random phase."""
    ys, xs = _grid(size)
    phase = rng.uniform(0, 2 * np.pi)
    return ys > base + amp * np.sin(2 * np.pi * freq * xs + phase)


def _disc(size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """A mask (S, S) of a disc with centre and radius in [0, 1] units."""
    ys, xs = _grid(size)
    return (xs - cx) ** 2 + (ys - cy) ** 2 < radius**2


def _speckle(image: np.ndarray, rng: np.random.Generator, where: np.ndarray, density: float,
             colors: list[Color]) -> None:
    """Set a random fraction of the pixels in ``where`` to random colours (stars, flowers)."""
    hits = where & (rng.random(where.shape) < density)
    picks = rng.integers(0, len(colors), size=int(hits.sum()))
    image[hits] = np.array(colors, np.float32)[picks]


def _finish(image: np.ndarray, rng: np.random.Generator, noise: float = 3.0) -> np.ndarray:
    """Add a little pixel noise (so no two draws are identical) and convert to uint8."""
    image = image + rng.normal(0.0, noise, image.shape).astype(np.float32)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


# -- the settings -------------------------------------------------------------------------------


def draw_beach(size: int, rng: np.random.Generator) -> np.ndarray:
    """Blue sky, a band of sea with foam, and sand below a wavy shoreline."""
    ys, xs = _grid(size)
    image = _gradient(size, (115, 185, 240), (195, 228, 250))
    sea = ys > 0.40 + rng.uniform(-0.03, 0.03)
    image[sea] = _gradient(size, (15, 80, 150), (45, 150, 200))[sea]
    ripples = sea & (np.sin(2 * np.pi * (ys * 14 + 0.08 * np.sin(xs * 9))) > 0.85)
    image[ripples] += 30
    sand = _wave(size, rng, 0.62, 0.03, rng.uniform(1, 2.5))
    foam = _wave(size, rng, 0.60, 0.03, 1.5) & ~sand
    image[foam & sea] = (235, 245, 250)
    image[sand] = (236, 210, 160)
    return _finish(image, rng, noise=4.0)


def draw_forest(size: int, rng: np.random.Generator) -> np.ndarray:
    """Dark green undergrowth, brown trunks and round canopies of several greens."""
    ys, xs = _grid(size)
    image = _gradient(size, (35, 85, 45), (15, 45, 25))
    image[ys[:, 0] > 0.82] = (70, 52, 30)
    for x in rng.uniform(0.05, 0.95, size=rng.integers(5, 8)):
        trunk = (np.abs(xs - x) < rng.uniform(0.02, 0.035)) & (ys > 0.3) & (ys < 0.88)
        image[trunk] = (92, 60, 32)
    greens = [(30, 110, 40), (55, 140, 50), (20, 90, 35), (75, 150, 60)]
    for _ in range(14):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0.0, 0.42), rng.uniform(0.08, 0.16)
        image[_disc(size, cx, cy, r)] = greens[rng.integers(len(greens))]
    return _finish(image, rng)


def draw_night(size: int, rng: np.random.Generator) -> np.ndarray:
    """A dark blue sky scattered with small stars above a black hilly horizon."""
    ys, _ = _grid(size)
    image = _gradient(size, (4, 6, 28), (30, 32, 85))
    _speckle(image, rng, ys < 0.8, 0.02, [(255, 255, 230), (200, 210, 255), (170, 170, 190)])
    image[_wave(size, rng, 0.84, 0.04, rng.uniform(1, 2))] = (8, 12, 18)
    return _finish(image, rng, noise=2.0)


def draw_snow(size: int, rng: np.random.Generator) -> np.ndarray:
    """A pale grey-blue sky, blue-grey distant hills, white snowfields and falling snow."""
    image = _gradient(size, (165, 185, 212), (215, 225, 238))
    image[_wave(size, rng, 0.45, 0.06, rng.uniform(1, 2))] = (185, 198, 218)
    ground = _wave(size, rng, 0.6, 0.05, rng.uniform(0.5, 1.5))
    image[ground] = _gradient(size, (255, 255, 255), (225, 235, 248))[ground]
    _speckle(image, rng, ~ground, 0.03, [(255, 255, 255)])
    return _finish(image, rng, noise=2.0)


def draw_city(size: int, rng: np.random.Generator) -> np.ndarray:
    """A dusk-orange sky behind grey buildings with lit windows, and a road with a dashed line."""
    ys, xs = _grid(size)
    image = _gradient(size, (245, 140, 90), (250, 205, 150))
    px = np.arange(size)
    windows = ((px[:, None] * 6 // size) % 2 == 0) & ((px[None, :] * 12 // size) % 2 == 0)
    left = 0.0
    while left < 1.0:
        width = rng.uniform(0.1, 0.22)
        top = rng.uniform(0.2, 0.6)
        body = (xs >= left) & (xs < left + width - 0.01) & (ys > top) & (ys < 0.88)
        image[body] = (rng.integers(60, 115),) * 3
        lit = rng.uniform(0.3, 0.8) > rng.random((size, size))
        image[body & windows & lit] = (255, 215, 110)
        left += width
    road = ys[:, 0] >= 0.88
    image[road] = (48, 48, 54)
    dashes = (np.abs(ys - 0.94) < 0.012) & ((px[None, :] * 8 // size) % 2 == 0)
    image[dashes] = (240, 240, 240)
    return _finish(image, rng)


def draw_desert(size: int, rng: np.random.Generator) -> np.ndarray:
    """A hot pale sky above layered orange sand dunes."""
    image = _gradient(size, (250, 205, 135), (255, 238, 200))
    layers = [(0.5, (232, 178, 96)), (0.65, (214, 150, 72)), (0.8, (240, 190, 110))]
    for base, color in layers:
        image[_wave(size, rng, base, rng.uniform(0.03, 0.07), rng.uniform(0.7, 1.8))] = color
    return _finish(image, rng, noise=4.0)


def draw_meadow(size: int, rng: np.random.Generator) -> np.ndarray:
    """A light blue sky over two rolling green hills dotted with flowers."""
    image = _gradient(size, (95, 165, 235), (175, 215, 245))
    image[_wave(size, rng, 0.48, 0.06, rng.uniform(0.6, 1.4))] = (120, 190, 85)
    near = _wave(size, rng, 0.66, 0.05, rng.uniform(0.6, 1.4))
    image[near] = (78, 158, 55)
    flowers = [(230, 50, 60), (250, 220, 60), (255, 255, 255), (170, 90, 210)]
    _speckle(image, rng, near, 0.05, flowers)
    return _finish(image, rng)


def draw_kitchen(size: int, rng: np.random.Generator) -> np.ndarray:
    """A cream tiled wall above a wooden counter with a dark edge and grain."""
    ys, xs = _grid(size)
    tiles = rng.integers(6, 10)
    image = np.empty((size, size, 3), np.float32)
    image[:] = (240, 232, 212)
    grout = (((ys * tiles) % 1.0) < 0.08) | (((xs * tiles) % 1.0) < 0.08)
    image[grout] = (200, 190, 170)
    counter = ys[:, 0] > 0.68
    grain = np.sin(2 * np.pi * (ys * 30 + 0.15 * np.sin(xs * 7 + rng.uniform(0, 6))))
    wood = np.array((172, 116, 66), np.float32) + 14 * grain[..., None]
    image[counter] = wood[counter]
    image[(ys[:, 0] > 0.68) & (ys[:, 0] < 0.72)] = (115, 75, 42)
    return _finish(image, rng)


def draw_underwater(size: int, rng: np.random.Generator) -> np.ndarray:
    """Teal water fading to deep blue, light rays, seaweed and a sandy floor."""
    ys, xs = _grid(size)
    image = _gradient(size, (25, 165, 190), (5, 50, 105))
    rays = (np.sin(2 * np.pi * (xs * 4 + ys * 1.5 + rng.uniform(0, 1))) > 0.75) & (ys < 0.75)
    image[rays] += 22
    floor = _wave(size, rng, 0.86, 0.03, rng.uniform(1, 2))
    for x in rng.uniform(0.05, 0.95, size=rng.integers(3, 6)):
        sway = x + 0.025 * np.sin(ys * 25 + rng.uniform(0, 6))
        weed = (np.abs(xs - sway) < 0.018) & (ys > rng.uniform(0.5, 0.7))
        image[weed] = (30, 130, 70)
    _speckle(image, rng, ~floor, 0.006, [(200, 240, 255)])
    image[floor] = (205, 188, 130)
    return _finish(image, rng)


def draw_classroom(size: int, rng: np.random.Generator) -> np.ndarray:
    """A yellow wall with a framed green chalkboard (with chalk marks) and a plank floor."""
    ys, xs = _grid(size)
    image = np.empty((size, size, 3), np.float32)
    image[:] = (236, 214, 150)
    top, bottom = rng.uniform(0.08, 0.14), rng.uniform(0.5, 0.58)
    frame = (xs > 0.08) & (xs < 0.92) & (ys > top) & (ys < bottom)
    board = (xs > 0.11) & (xs < 0.89) & (ys > top + 0.03) & (ys < bottom - 0.03)
    image[frame] = (125, 82, 42)
    image[board] = (38, 84, 58)
    chalk_rows = np.sin(2 * np.pi * ys * rng.uniform(10, 16)) > 0.9
    _speckle(image, rng, board & chalk_rows, 0.5, [(220, 225, 220)])
    floor = ys[:, 0] > 0.8
    planks = ((xs * 5) % 1.0) < 0.05
    image[floor] = (152, 102, 60)
    image[floor[:, None] & planks] = (110, 72, 40)
    return _finish(image, rng)


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("beach", ("on the beach", "at the beach", "by the sea"),
                ("a beach scene", "a sandy beach"), draw_beach),
        Setting("forest", ("in the forest", "in the woods"),
                ("a forest scene", "a green forest"), draw_forest),
        Setting("night", ("at night", "under the night sky", "on a starry night"),
                ("a night scene", "a starry night sky"), draw_night),
        Setting("snow", ("in the snow", "in a snowy landscape", "on a snowy day"),
                ("a snowy scene", "a snowy landscape"), draw_snow),
        Setting("city", ("in the city", "on a city street", "downtown"),
                ("a city scene", "a city street at dusk"), draw_city),
        Setting("desert", ("in the desert", "among the sand dunes"),
                ("a desert scene", "a sandy desert"), draw_desert),
        Setting("meadow", ("in the meadow", "on a grassy meadow", "in a green field"),
                ("a meadow scene", "a grassy meadow"), draw_meadow),
        Setting("kitchen", ("in the kitchen", "in a kitchen", "in a tiled kitchen"),
                ("a kitchen scene", "a tiled kitchen"), draw_kitchen),
        Setting("underwater", ("under the sea", "underwater", "on the sea floor"),
                ("an underwater scene", "the bottom of the sea"), draw_underwater),
        Setting("classroom", ("in the classroom", "in a classroom", "by the chalkboard"),
                ("a classroom scene", "a bright classroom"), draw_classroom),
    )
}
