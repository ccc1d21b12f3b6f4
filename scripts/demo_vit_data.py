"""Shapes scenes of varied layouts for training and probing the demo ViT (``scripts/demo_vit.py``).

A scene is a list of objects ``{"color", "shape", "x", "y", "r"}`` in frame units (0..1: the centre,
and the half-extent ``r``, as :func:`pipelines.data.shapes.render` draws them), drawn in one of
four ways (:data:`VARIANTS`):

- ``quickstart``: exactly the files ``vqa-data shapes`` writes (its 3×3 grid, 96 px, the dark
  background, JPEG quality 95);
- ``grid``: the same grid scenes, rendered like the other layouts below;
- ``big``: one shape whose extent is 56–96% of the frame;
- ``scatter``: 1 to 4 shapes at random places, each from 8 px to nearly the whole image (extent
  log-uniform from 1/6 of the frame, 8 px of the model's 48, or 8 px of the image if that is more,
  up to 90% of the frame), not overlapping, with their centres in distinct cells of the 3×3 grid.

The per-cell targets say which object is centred in which grid cell, so the centres of ``big`` and
``scatter`` shapes keep 2 px (of 48) away from the cell borders, as the grid's do: a centre on a
border would make the target a coin toss. All but ``quickstart`` are rendered at a random side of
32 to 256 px (log-uniform; 48 to 256 for the grid, whose smallest shapes would otherwise be under
8 px) on a plain or a noisy background (a colour away from every shape colour; noise: fine Gaussian grain plus coarse
blotches), saved as JPEG (quality 75–95), and then go through exactly what ``embed`` does to a file:
:func:`embed.open_rgb` (with its JPEG draft decode) and timm's eval transform of the model (bicubic
resize to 48 px). Every scene is a function of a string seed.
"""

import io
import math
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.data import shapes  # noqa: E402

COLORS = list(shapes.COLORS)
SHAPES = list(shapes.SHAPES)
GRID = shapes.GRID
CELLS = GRID * GRID
MAX_COUNT = 9  # count classes 0..9
LAYOUTS = ("quickstart", "grid", "big", "scatter")
BACKGROUNDS = ("plain", "noisy")
# Probe rows and training mixture: (layout, background) -> share of the training scenes.
VARIANTS = {("quickstart", "plain"): 0.2,
            ("grid", "plain"): 0.075, ("grid", "noisy"): 0.075,
            ("big", "plain"): 0.1, ("big", "noisy"): 0.1,
            ("scatter", "plain"): 0.225, ("scatter", "noisy"): 0.225}
RENDER_SIZES = {"grid": (48, 256), "big": (32, 256), "scatter": (32, 256)}
MIN_PIXELS = 8  # the smallest shape, in the model's 48-px input and in the image
MODEL_SIZE = 48
MAX_EXTENT = 0.9  # a square as large as the frame would be all background
BORDER = 2 / MODEL_SIZE  # how close a centre may come to a grid cell's border
MIN_BACKGROUND_DISTANCE = 120  # RGB distance of a background colour from every shape colour


# -- layouts ---------------------------------------------------------------------------------------

def grid_scene(rng: random.Random, size: int) -> list:
    """The quickstart's scene (2..6 objects on the 3×3 grid), in frame units."""
    return [{"color": o["color"], "shape": o["shape"], "x": o["x"] / GRID, "y": o["y"] / GRID, "r": o["r"] / GRID}
            for o in shapes._scene(rng)]


def big_scene(rng: random.Random, size: int) -> list:
    """One shape filling most of the frame."""
    r = rng.uniform(0.28, 0.48)
    x, y = _centre(rng, r)
    return [{"color": rng.choice(COLORS), "shape": rng.choice(SHAPES), "x": x, "y": y, "r": r}]


def scatter_scene(rng: random.Random, size: int) -> list:
    """1..4 shapes at random places and sizes (at least 8 px in the model's input and in the image of
    side ``size``); no overlaps, centres in distinct grid cells."""
    smallest = MIN_PIXELS / min(size, MODEL_SIZE)  # extent, in frame units
    objects = []
    for _ in range(rng.randint(1, 4)):
        for _ in range(50):
            r = math.exp(rng.uniform(math.log(smallest), math.log(MAX_EXTENT))) / 2
            x, y = _centre(rng, r)
            if all(math.hypot(x - o["x"], y - o["y"]) > 1.1 * (r + o["r"]) and cell(x, y) != cell(o["x"], o["y"])
                   for o in objects):
                objects.append({"color": rng.choice(COLORS), "shape": rng.choice(SHAPES), "x": x, "y": y, "r": r})
                break
    return objects


def _centre(rng: random.Random, r: float) -> tuple:
    """A centre keeping a shape of half-extent ``r`` inside the frame and off the cell borders."""
    def coordinate():
        while True:
            v = rng.uniform(r, 1 - r)
            if all(abs(v - k / GRID) >= BORDER for k in range(1, GRID)):
                return v
    return coordinate(), coordinate()


SCENES = {"grid": grid_scene, "big": big_scene, "scatter": scatter_scene}


def cell(x: float, y: float) -> int:
    """The 3×3 grid cell (row-major) holding the point ``(x, y)`` of the frame."""
    return min(int(y * GRID), GRID - 1) * GRID + min(int(x * GRID), GRID - 1)


# -- rendering -------------------------------------------------------------------------------------

def background_color(rng: random.Random) -> tuple:
    """A colour far from every shape colour (the quickstart's dark grey a third of the time)."""
    if rng.random() < 1 / 3:
        return shapes.BACKGROUND
    while True:
        c = tuple(rng.randrange(256) for _ in range(3))
        if min(math.dist(c, p) for p in shapes.COLORS.values()) >= MIN_BACKGROUND_DISTANCE:
            return c


def noise_field(rng: random.Random, size: int) -> np.ndarray:
    """``(size, size, 3)`` float noise: Gaussian grain plus blotches (a coarse grid, upsampled)."""
    g = np.random.default_rng(rng.randrange(2**32))
    fine = g.normal(0, rng.uniform(8, 40), (size, size, 3))
    n = rng.randint(3, 10)
    coarse = g.normal(0, rng.uniform(0, 30), (n, n, 3))
    up = np.stack([np.asarray(Image.fromarray(coarse[..., c].astype(np.float32), mode="F")
                              .resize((size, size), Image.BICUBIC)) for c in range(3)], -1)
    return fine + up


def render(objects: list, size: int, background: tuple, noise: np.ndarray | None = None) -> Image.Image:
    """The scene as a ``size``×``size`` RGB image; ``noise`` is added to the background only."""
    ss = max(1, min(shapes.SUPERSAMPLE, 512 // size))  # smooth edges without huge canvases
    big = size * ss
    img = Image.new("RGB", (big, big), background)
    mask = Image.new("L", (big, big), 0)
    for o in objects:
        cx, cy, r = o["x"] * big, o["y"] * big, o["r"] * big
        for canvas, fill in ((img, shapes.COLORS[o["color"]]), (mask, 255)):
            draw = ImageDraw.Draw(canvas)
            if o["shape"] == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            else:
                draw.polygon(shapes._polygon(o["shape"], cx, cy, r), fill=fill)
    img = img.resize((size, size), Image.LANCZOS)
    if noise is None:
        return img
    alpha = np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float32)[..., None] / 255
    out = np.asarray(img, dtype=np.float32) + (1 - alpha) * noise  # (size, size, 3)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def draw(seed: str, layout: str, background: str) -> tuple:
    """One scene: ``(JPEG bytes, objects)``."""
    rng = random.Random(seed)
    if layout == "quickstart":
        objects = grid_scene(rng, 96)
        img, quality = shapes.render([{**o, "x": o["x"] * GRID, "y": o["y"] * GRID, "r": o["r"] * GRID}
                                      for o in objects], 96), 95
    else:
        lo, hi = RENDER_SIZES[layout]
        size = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        objects = SCENES[layout](rng, size)
        noise = noise_field(rng, size) if background == "noisy" else None
        img, quality = render(objects, size, background_color(rng), noise), rng.randint(75, 95)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), objects


# -- targets ---------------------------------------------------------------------------------------

def targets(objects: list) -> dict:
    """What the heads and the probes predict, as int arrays.

    ``cell_color``/``cell_shape`` (9 each): the colour/shape class (0 = empty) of the object whose
    centre lies in each grid cell, row-major; ``count``: the number of objects; ``occupied`` (9):
    which cells hold an object's centre; ``colors`` (6)/``shapes`` (5): which colours and shapes
    occur.
    """
    t = {"cell_color": np.zeros(CELLS, np.int64), "cell_shape": np.zeros(CELLS, np.int64),
         "count": np.int64(len(objects)), "occupied": np.zeros(CELLS, np.int64),
         "colors": np.zeros(len(COLORS), np.int64), "shapes": np.zeros(len(SHAPES), np.int64)}
    for o in objects:
        c = cell(o["x"], o["y"])
        t["cell_color"][c] = 1 + COLORS.index(o["color"])
        t["cell_shape"][c] = 1 + SHAPES.index(o["shape"])
        t["occupied"][c] = 1
        t["colors"][COLORS.index(o["color"])] = 1
        t["shapes"][SHAPES.index(o["shape"])] = 1
    return t


class Pixels:
    """Bytes -> the model's uint8 input ``(3, 48, 48)``, decoded and resized exactly as ``embed`` does."""

    def __init__(self, pil_transform):
        from embed.decode import draft_target_of

        self.transform, self.draft = pil_transform, draft_target_of(pil_transform)

    def __call__(self, data: bytes):
        from embed import open_rgb

        return self.transform(open_rgb(data, draft_target=self.draft))


def draw_set(prefix: str, variants: list, pixels: Pixels, start: int = 0) -> tuple:
    """Scenes ``f"{prefix}:{start + i}"``, the ``i``-th of layout and background ``variants[i]``.

    Returns:
        ``(x, t)``: uint8 pixels ``(N, 3, 48, 48)`` and a dict of stacked target tensors.
    """
    import torch

    xs, ts = [], []
    for i, (layout, background) in enumerate(variants):
        data, objects = draw(f"{prefix}:{start + i}", layout, background)
        xs.append(pixels(data))
        ts.append(targets(objects))
    return torch.stack(xs), {k: torch.from_numpy(np.stack([t[k] for t in ts])) for k in ts[0]}
