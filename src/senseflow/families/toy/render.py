"""Rendering scenes of the shapes world to small RGB images.

Shapes are drawn with 4x4 supersampling so edges are anti-aliased like a real photo's, and object
placement is random but always satisfies the prompt: the two objects never touch, and for a
relation the displacement along its axis dominates the other axis, so "left of" is unambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from senseflow.families.toy.world import BACKGROUND, COLOURS, SceneSpec

IMAGE_SIZE = 32
SUPERSAMPLE = 4
# Half-extent (pixels) of each size class, drawn uniformly from these ranges.
HALF_EXTENT = {"small": (3.0, 4.0), "large": (6.0, 7.0)}
MIN_GAP = 2.0  # pixels between the bounding boxes of two objects
DOMINANCE = 1.5  # relation axis displacement >= DOMINANCE * off-axis displacement
MAX_TRIES = 100_000


@dataclass(frozen=True)
class Placement:
    """Where an object was drawn: centre (x right, y down) and half-extent, in pixels."""

    cx: float
    cy: float
    half: float


def _coverage(shape: str, p: Placement, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, from a SUPERSAMPLE x SUPERSAMPLE grid."""
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)
    dx, dy = x - p.cx, y - p.cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= p.half**2
    elif shape == "square":
        inside = (np.abs(dx) <= p.half) & (np.abs(dy) <= p.half)
    elif shape == "triangle":  # apex up, base at the bottom, base width = height
        rel = (dy + p.half) / (2 * p.half)  # 0 at the apex, 1 at the base
        inside = (rel >= 0) & (rel <= 1) & (np.abs(dx) <= rel * p.half)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def _relation_holds(relation: str, a: Placement, b: Placement) -> bool:
    dx, dy = b.cx - a.cx, b.cy - a.cy  # from the first object to the second
    gap = a.half + b.half + MIN_GAP
    if relation == "left":  # first is left of second
        return dx >= gap and dx >= DOMINANCE * abs(dy)
    if relation == "right":
        return -dx >= gap and -dx >= DOMINANCE * abs(dy)
    if relation == "above":  # image y grows downwards
        return dy >= gap and dy >= DOMINANCE * abs(dx)
    if relation == "below":
        return -dy >= gap and -dy >= DOMINANCE * abs(dx)
    raise ValueError(f"unknown relation {relation!r}")


def _random_placement(size_class: str, rng: np.random.Generator, size: int) -> Placement:
    lo, hi = HALF_EXTENT[size_class]
    half = float(rng.uniform(lo, hi))
    margin = half + 1.0
    return Placement(
        cx=float(rng.uniform(margin, size - margin)), cy=float(rng.uniform(margin, size - margin)), half=half
    )


def place(scene: SceneSpec, rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[Placement, ...]:
    """Placements drawn uniformly from all that satisfy the scene (rejection sampling).

    Two large objects in one relation fit only in a thin band (about 1 try in 150 is accepted),
    hence the generous MAX_TRIES; a failure is then practically impossible rather than rare.
    """
    if scene.relation is None:
        return (_random_placement(scene.objects[0].size, rng, size),)
    for _ in range(MAX_TRIES):
        a = _random_placement(scene.objects[0].size, rng, size)
        b = _random_placement(scene.objects[1].size, rng, size)
        if _relation_holds(scene.relation, a, b):
            return a, b
    raise RuntimeError(f"could not place {scene.prompt!r} in a {size}x{size} image")


def render(
    scene: SceneSpec, rng: np.random.Generator, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, tuple[Placement, ...]]:
    """Return an HxWx3 uint8 image of the scene and where each object was placed."""
    placements = place(scene, rng, size)
    image = np.empty((size, size, 3), dtype=np.float64)
    image[:] = BACKGROUND
    for obj, p in zip(scene.objects, placements, strict=True):
        cov = _coverage(obj.shape, p, size)[..., None]
        image = image * (1.0 - cov) + np.asarray(COLOURS[obj.colour], dtype=np.float64) * cov
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), placements


def render_batch(scenes: list[SceneSpec], rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render several scenes into an NxHxWx3 uint8 array."""
    return np.stack([render(s, rng, size)[0] for s in scenes])
