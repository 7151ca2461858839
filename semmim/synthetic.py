"""The embedded default data: procedural pictures of coloured shapes with captions that describe them.

No download and no files: scene ``i`` of split ``s`` is a pure function of (seed, split, i). A scene holds
1-3 objects, each a (size, colour, shape) placed in a distinct cell of a 3x3 grid (with jitter), on a
grey background with a little noise. The caption names every object with its size, colour, shape and
position, e.g. ``"a large red circle in the top left and a small blue square on the right"`` — so
image-text retrieval is learnable, and needs colour, shape *and* layout. Position phrases use "left" /
"right" so a horizontal flip only has to swap those two words.

Zero-shot classes are the shape names; a scene is labelled when all its objects share one shape.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 30),
    "purple": (145, 55, 200),
    "orange": (250, 135, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SIZES = {"small": 0.11, "large": 0.2}  # radius as a fraction of the image side
# (row, col) of the 3x3 grid -> phrase; rows top..bottom, cols left..right.
POSITIONS = {
    (0, 0): "in the top left",
    (0, 1): "at the top",
    (0, 2): "in the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "in the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right",
}
SPLITS = {"train": 0, "val": 1, "test": 2}
# Zero-shot prompts: one per (size, colour), averaged per class, in the captions' own words.
PROMPT_TEMPLATES = [f"a {size} {colour} {{name}}" for size in SIZES for colour in COLOURS]


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: size word, colour word, shape word, grid cell, jittered centre (0..1)."""

    size: str
    colour: str
    shape: str
    cell: tuple[int, int]
    centre: tuple[float, float]


def _rng(seed: int, split: str, index: int) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    digest = hashlib.blake2b(
        f"shapes:{seed}:{SPLITS[split]}:{index}".encode(), digest_size=8
    ).digest()
    return random.Random(int.from_bytes(digest, "little"))


def scene(seed: int, split: str, index: int) -> list[SceneObject]:
    """The objects of scene ``index`` (deterministic)."""
    rng = _rng(seed, split, index)
    count = rng.choices((1, 2, 3), weights=(0.25, 0.4, 0.35))[0]
    cells = rng.sample(sorted(POSITIONS), count)
    objects = []
    for cell in cells:
        row, col = cell
        jitter = (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05))
        centre = ((col + 0.5) / 3 + jitter[0], (row + 0.5) / 3 + jitter[1])
        objects.append(
            SceneObject(
                rng.choice(sorted(SIZES)),
                rng.choice(sorted(COLOURS)),
                rng.choice(SHAPES),
                cell,
                centre,
            )
        )
    return objects


def caption(objects: list[SceneObject]) -> str:
    """English caption naming every object's size, colour, shape and position."""
    parts = [f"a {o.size} {o.colour} {o.shape} {POSITIONS[o.cell]}" for o in objects]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def label(objects: list[SceneObject]) -> int:
    """Index into :data:`SHAPES` when all objects share one shape, else -1 (no class)."""
    shapes = {o.shape for o in objects}
    return SHAPES.index(shapes.pop()) if len(shapes) == 1 else -1


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    if shape == "star":
        points = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = np.deg2rad(-90 + 36 * k)
            points.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
        return points
    if shape == "cross":
        t = r * 0.35
        return [
            (cx - t, cy - r),
            (cx + t, cy - r),
            (cx + t, cy - t),
            (cx + r, cy - t),
            (cx + r, cy + t),
            (cx + t, cy + t),
            (cx + t, cy + r),
            (cx - t, cy + r),
            (cx - t, cy + t),
            (cx - r, cy + t),
            (cx - r, cy - t),
            (cx - t, cy - t),
        ]
    raise ValueError(f"unknown shape {shape!r}")


def render(seed: int, split: str, index: int, size: int = 128) -> Image.Image:
    """Render scene ``index`` as an RGB image of ``size`` x ``size`` (drawn at 2x, then downsampled)."""
    rng = _rng(seed, split, index)
    objects = scene(seed, split, index)
    big = size * 2
    grey = rng.randint(95, 165)
    image = Image.new("RGB", (big, big), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    for o in objects:
        cx, cy, r = o.centre[0] * big, o.centre[1] * big, SIZES[o.size] * big
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[o.colour])
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=COLOURS[o.colour])
    image = image.resize((size, size), Image.LANCZOS)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 6, (size, size, 3))
    array = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(array)
