"""Rule-based judge of images of the shapes world: is the prompt's content in the picture?

The evaluator uses no learned model: it is a fixed set of rules over pixels (numpy and
``scipy.ndimage``), so it cannot share the biases of the teachers and students it judges, and its
verdicts do not drift between runs or machines. It is built for images from generative models,
which are blurrier and noisier than the renderer's, so every decision uses a cue that survives mild
blur and noise (soft coverage and moments rather than exact pixel counts).

Pipeline
--------
1. **Pixel colours.** Every object pixel of a render is an anti-aliased mix
   ``background + alpha * (colour - background)`` of the background and one palette colour.
   For every pixel and palette colour we fit ``alpha`` (least squares) and measure the residual
   distance to that mixing line. The pixel takes the colour with the smallest residual; it is
   foreground when ``alpha >= FOREGROUND_ALPHA`` and the residual is below ``MAX_RESIDUAL`` (pixels
   far from every mixing line are "off palette" and belong to no object). Fitting the mixing line,
   rather than the nearest palette colour, keeps half-covered edge pixels from being mistaken for
   a different, darker palette colour (half-covered cyan is nearer to blue than to cyan).
2. **Objects.** Connected components (8-connectivity) of each colour's foreground; components of
   fewer than ``MIN_COMPONENT_PIXELS`` pixels are noise and dropped.
3. **Attributes**, from the soft coverage ``alpha`` of the component and its one-pixel fringe,
   divided by the object's own peak coverage (so a faded or over-bright object measures the same):

   * *centre*: coverage-weighted centroid, in the renderer's convention (x right, y down, pixel
     ``i`` covers ``[i, i + 1)``, so its centre is ``i + 0.5``);
   * *size*: soft extent ``max(width, height)``, where the width is the sum over columns of the
     column's highest coverage: small objects are 6-8 px across, large 12-14 px;
   * *shape*: a triangle (apex up) has its mass widening downwards, measured by the ratio of the
     horizontal spread of the upper and lower halves and by the skewness of the vertical mass
     distribution; otherwise the normalised cross moment ``E[dx² dy²] / (E[dx²] E[dy²])`` tells a
     square (x and y independent: 1.0) from a circle (2/3).

Scoring (:func:`score_image`): each prompted object is matched to the largest detection of its
colour (the colours of a scene are distinct). **A prompted object with no detection of its colour
is wrong on every attribute**: colour, shape and size are False for it, and so is the scene's
relation. ``count`` checks that nothing else was drawn: exactly one detection per prompted colour
and none of any other colour. It is reported but is not part of ``all`` (compositional accuracy =
colour and shape and size and relation).

Measured on fresh renders (``tests/test_toy_evaluator.py`` and 3,000 further scenes): 100% ``all``
on clean renders, with Gaussian noise of std 8/255 or 16/255, with a Gaussian blur of sigma 0.7 px,
with contrast scaled by 0.7 or 1.2, and with a random colour cast of up to +-20 per channel; ~99%
at blur sigma 1.0 and ~93% at sigma 1.2 (small triangles, circles and squares become blobs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from senseflow.families.toy.world import BACKGROUND, COLOURS, SceneSpec, parse_prompt
from senseflow.metrics.coverage import mean_pairwise_distance
from senseflow.metrics.image_io import quantise

# --- thresholds -----------------------------------------------------------------------------------

# A pixel is part of an object when at least half of it is covered by the object's colour. This is
# the level set an anti-aliased edge crosses at the true boundary, so hard masks keep the true area,
# and blur (which spreads an edge symmetrically about that level) does not grow or shrink them.
FOREGROUND_ALPHA = 0.5

# Largest distance (0-255 RGB units) of a pixel from the background-to-colour mixing line for it to
# count as that colour. About half the distance between the two closest palette colours (blue and
# cyan, ~117 apart), so no pixel can be within it of two colours' pure tones, while noise of std 8
# (residual ~11) and moderate colour shifts of generated images stay well inside it.
MAX_RESIDUAL = 60.0

# Components smaller than this many pixels are noise or fringes, not objects. The smallest object,
# a small triangle (half-extent 3), covers ~17 px (~15 px after a mild blur); isolated noise
# specks or stray mis-coloured edge pixels are 1-3 px.
MIN_COMPONENT_PIXELS = 8

# Coverage is also read from this many pixels around a component's hard mask, where anti-aliased
# (alpha < 0.5) edge pixels lie, so moments and extents use the whole soft shape.
FRINGE_PIXELS = 1

# An object's coverage is divided by its own full-coverage level, this percentile of the coverage
# over its hard mask, before cues are measured: a faded (or over-saturated) object then has the same
# soft extent and moments as a pure-coloured one. A high percentile lands on interior pixels even
# for the smallest objects (most of whose pixels are edges), while ignoring single noisy maxima.
PEAK_PERCENTILE = 90.0

# Soft extent (pixels) above which an object is large. Small objects span 2 * [3, 4] = 6-8 px, large
# ones 2 * [6, 7] = 12-14 px. Blur shrinks the soft extent of large triangles most (their apex
# fades): measured on renders, small objects <= 8.3 px (noise std 8), large >= 10.4 px at blur sigma
# 0.7 and >= 9.7 px at sigma 1.0; 9.0 sits mid-way between the worst cases.
SIZE_EXTENT_SPLIT = 9.0

# Triangle cue: (1 - upper/lower horizontal spread ratio) - vertical skewness. For an apex-up
# triangle the two terms are ~0.45 and ~0.55 (sum 0.8-1.1 on clean or noisy renders); for circles
# and squares both are ~0 (|sum| <= 0.12 clean, noisy or blurred). Blur erodes a small triangle's
# cue most: measured minimum 0.44 at blur sigma 0.7 and 0.26 at sigma 1.0. 0.25 keeps both >= 0.1
# away from the symmetric shapes' range at sigma 0.7 and still catches triangles at sigma 1.0.
TRIANGLE_ASYMMETRY = 0.25

# Normalised cross moment E[dx² dy²] / (E[dx²] E[dy²]) above which a symmetric shape is a square:
# 1.0 for a square, 2/3 for a disc. Measured on renders: circles <= 0.73 clean, <= 0.79 with noise,
# <= 0.83 at blur sigma 0.7; squares >= 0.97 clean or noisy, >= 0.90 blurred; 0.87 splits the
# blurred gap (heavier blur, sigma >= 1, makes small circles and squares overlap).
SQUARE_CROSS_MOMENT = 0.87

# Pixel labels returned by :func:`label_pixels` besides palette indices 0..K-1.
BACKGROUND_LABEL = -1
OFF_PALETTE_LABEL = -2

PALETTE: tuple[str, ...] = tuple(COLOURS)
_PALETTE_RGB = np.array([COLOURS[c] for c in PALETTE], dtype=np.float64)  # [K, 3]
_BACKGROUND_RGB = np.array(BACKGROUND, dtype=np.float64)
_DIRECTIONS = _PALETTE_RGB - _BACKGROUND_RGB  # mixing-line direction per colour, [K, 3]
_DIRECTION_SQ = np.einsum("kc,kc->k", _DIRECTIONS, _DIRECTIONS)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Detection:
    """One object found in an image.

    ``cx, cy``: coverage-weighted centroid (x right, y down, pixel centres at ``i + 0.5``).
    ``area``: soft area (sum of coverage, pixels). ``bbox``: ``(x0, y0, x1, y1)`` of the hard mask,
    ends exclusive like slices. ``extent``, ``cross_moment``, ``asymmetry``: the cues that decided
    size and shape, kept for inspection.
    """

    colour: str
    shape: str
    size: str
    cx: float
    cy: float
    area: float
    bbox: tuple[int, int, int, int]
    extent: float = 0.0
    cross_moment: float = 0.0
    asymmetry: float = 0.0


@dataclass(frozen=True)
class ObjectScore:
    """How one prompted object fared: ``detection`` is None when its colour was not found."""

    detection: Detection | None
    shape: bool
    size: bool

    @property
    def found(self) -> bool:
        return self.detection is not None


@dataclass(frozen=True)
class ImageScore:
    """Per-attribute verdicts for one image against one scene.

    ``colour``: every prompted colour was found. ``shape`` / ``size``: every prompted object was found
    and has the prompted shape / size. ``relation``: None for one-object scenes, else both objects
    were found and the first is on the prompted side of the second. ``count``: nothing else was
    drawn (one detection per prompted colour, none of other colours); not part of ``all``.
    """

    colour: bool
    shape: bool
    size: bool
    relation: bool | None
    count: bool
    objects: tuple[ObjectScore, ...]
    detections: tuple[Detection, ...]

    @property
    def all(self) -> bool:
        """Compositional correctness: colour, shape, size and (for two objects) relation."""
        return self.colour and self.shape and self.size and self.relation is not False


# --- pixels -----------------------------------------------------------------------------------


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}; convert model outputs with to_uint8")
    return image


def mixing_coverage(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel and palette colour: coverage ``alpha`` and distance to the mixing line, [H, W, K] each."""
    offset = _check_image(image).astype(np.float64) - _BACKGROUND_RGB
    alpha = np.einsum("hwc,kc->hwk", offset, _DIRECTIONS) / _DIRECTION_SQ
    residual = offset[:, :, None, :] - alpha[..., None] * _DIRECTIONS
    return alpha, np.sqrt(np.einsum("hwkc,hwkc->hwk", residual, residual))


def label_pixels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label map ([H, W] int: palette index, BACKGROUND_LABEL or OFF_PALETTE_LABEL) and coverage [H, W, K]."""
    alpha, residual = mixing_coverage(image)
    best = np.argmin(residual, axis=-1)
    best_alpha = np.take_along_axis(alpha, best[..., None], axis=-1)[..., 0]
    best_residual = np.take_along_axis(residual, best[..., None], axis=-1)[..., 0]
    labels = np.full(best.shape, BACKGROUND_LABEL, dtype=np.int64)
    foreground = best_alpha >= FOREGROUND_ALPHA
    on_palette = best_residual <= MAX_RESIDUAL
    labels[foreground & on_palette] = best[foreground & on_palette]
    labels[foreground & ~on_palette] = OFF_PALETTE_LABEL
    return labels, alpha


# --- objects ----------------------------------------------------------------------------------


def _ratio(num: float, den: float, default: float) -> float:
    return num / den if den > 1e-12 else default


def _describe(weights: np.ndarray, x0: int, y0: int) -> dict[str, float]:
    """Centroid, soft area and extent, and the shape cues of a soft coverage patch at (x0, y0)."""
    h, w = weights.shape
    ys = np.arange(h, dtype=np.float64)[:, None] + y0 + 0.5
    xs = np.arange(w, dtype=np.float64)[None, :] + x0 + 0.5
    area = float(weights.sum())
    cx = float((weights * xs).sum() / area)
    cy = float((weights * ys).sum() / area)
    dx2 = (xs - cx) ** 2
    dy = ys - cy
    var_x = float((weights * dx2).sum() / area)
    var_y = float((weights * dy**2).sum() / area)
    cross = _ratio(float((weights * dx2 * dy**2).sum() / area), var_x * var_y, 1.0)
    skew = _ratio(float((weights * dy**3).sum() / area), var_y**1.5, 0.0)
    upper = weights * (dy < 0)
    lower = weights * (dy > 0)
    spread_upper = _ratio(float((upper * dx2).sum()), float(upper.sum()), 0.0)
    spread_lower = _ratio(float((lower * dx2).sum()), float(lower.sum()), 0.0)
    width_ratio = min(np.sqrt(_ratio(spread_upper, spread_lower, 1.0)), 2.0)
    extent = max(float(weights.max(axis=0).sum()), float(weights.max(axis=1).sum()))
    return {
        "cx": cx,
        "cy": cy,
        "area": area,
        "extent": extent,
        "cross_moment": cross,
        "asymmetry": (1.0 - width_ratio) - skew,
    }


def classify_shape(cross_moment: float, asymmetry: float) -> str:
    if asymmetry > TRIANGLE_ASYMMETRY:
        return "triangle"
    return "square" if cross_moment > SQUARE_CROSS_MOMENT else "circle"


def classify_size(extent: float) -> str:
    return "large" if extent > SIZE_EXTENT_SPLIT else "small"


def detect_objects(image: np.ndarray) -> list[Detection]:
    """Every object in an HxWx3 uint8 image, ordered by palette colour, then by decreasing area."""
    labels, alpha = label_pixels(image)
    height, width = labels.shape
    detections: list[Detection] = []
    for k in np.unique(labels[labels >= 0]):
        components, _ = ndimage.label(labels == k, structure=_EIGHT_CONNECTED)
        found: list[Detection] = []
        for index, box in enumerate(ndimage.find_objects(components), start=1):
            if box is None:
                continue
            mask_box = components[box] == index
            if int(mask_box.sum()) < MIN_COMPONENT_PIXELS:
                continue
            y0 = max(box[0].start - FRINGE_PIXELS, 0)
            y1 = min(box[0].stop + FRINGE_PIXELS, height)
            x0 = max(box[1].start - FRINGE_PIXELS, 0)
            x1 = min(box[1].stop + FRINGE_PIXELS, width)
            mask = components[y0:y1, x0:x1] == index
            fringe = ndimage.binary_dilation(mask, _EIGHT_CONNECTED, iterations=FRINGE_PIXELS)
            # The fringe takes only unlabelled pixels: never another object's pixels.
            support = mask | (fringe & (labels[y0:y1, x0:x1] < 0))
            coverage = alpha[y0:y1, x0:x1, k]
            peak = float(np.percentile(coverage[mask], PEAK_PERCENTILE))
            weights = np.clip(coverage / peak, 0.0, 1.0) * support
            cues = _describe(weights, x0, y0)
            found.append(
                Detection(
                    colour=PALETTE[k],
                    shape=classify_shape(cues["cross_moment"], cues["asymmetry"]),
                    size=classify_size(cues["extent"]),
                    bbox=(box[1].start, box[0].start, box[1].stop, box[0].stop),
                    **cues,
                )
            )
        detections.extend(sorted(found, key=lambda d: -d.area))
    return detections


def relation_between(first: Detection, second: Detection) -> str:
    """Where ``first`` lies relative to ``second``, along the axis of their larger centroid offset."""
    dx, dy = second.cx - first.cx, second.cy - first.cy
    if abs(dx) >= abs(dy):
        return "left" if dx > 0 else "right"
    return "above" if dy > 0 else "below"


# --- scoring ------------------------------------------------------------------------------------


def score_image(image: np.ndarray, scene: SceneSpec | str) -> ImageScore:
    """Judge one HxWx3 uint8 image against a scene (or a prompt of the grammar)."""
    if isinstance(scene, str):
        scene = parse_prompt(scene)
    detections = tuple(detect_objects(image))
    objects = []
    for spec in scene.objects:
        mine = [d for d in detections if d.colour == spec.colour]
        best = max(mine, key=lambda d: d.area) if mine else None
        objects.append(
            ObjectScore(
                detection=best,
                shape=best is not None and best.shape == spec.shape,
                size=best is not None and best.size == spec.size,
            )
        )
    relation: bool | None = None
    if scene.relation is not None:
        a, b = objects[0].detection, objects[1].detection
        relation = a is not None and b is not None and relation_between(a, b) == scene.relation
    prompted = {o.colour for o in scene.objects}
    count = len(detections) == len(prompted) and {d.colour for d in detections} == prompted
    return ImageScore(
        colour=all(o.found for o in objects),
        shape=all(o.shape for o in objects),
        size=all(o.size for o in objects),
        relation=relation,
        count=count,
        objects=tuple(objects),
        detections=detections,
    )


_ATTRIBUTES = ("colour", "shape", "size", "relation", "count", "all")


def _summary(scores: Sequence[ImageScore]) -> dict[str, float | int | None]:
    """Accuracy per attribute over ``scores``; None where no image has the attribute."""
    out: dict[str, float | int | None] = {"n": len(scores)}
    for name in _ATTRIBUTES:
        values = [getattr(s, name) for s in scores]
        values = [v for v in values if v is not None]
        out[name] = float(np.mean(values)) if values else None
    return out


def evaluate(images: np.ndarray, prompts: Sequence[str]) -> dict:
    """Score a batch of NxHxWx3 uint8 images against their prompts.

    Returns ``{"n": N, "single": {...}, "two": {...}, "overall": {...}}``; each group holds its
    image count ``n`` and accuracies in [0, 1] for ``colour``, ``shape``, ``size``, ``relation``
    (two-object images only; None in "single"), ``count`` and ``all`` (compositional accuracy).
    A group with no images has None accuracies.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected NxHxWx3 images, got shape {images.shape}")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    scenes = [parse_prompt(p) for p in prompts]
    scores = [score_image(image, scene) for image, scene in zip(images, scenes, strict=True)]
    return summarise(scores, scenes)


def summarise(scores: Sequence[ImageScore], scenes: Sequence[SceneSpec]) -> dict:
    """:func:`evaluate`'s summary of per-image scores (for callers that also keep the scores)."""
    single = [s for s, sc in zip(scores, scenes, strict=True) if len(sc.objects) == 1]
    two = [s for s, sc in zip(scores, scenes, strict=True) if len(sc.objects) == 2]
    return {"n": len(scores), "single": _summary(single), "two": _summary(two), "overall": _summary(scores)}


# --- model outputs --------------------------------------------------------------------------------


def to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """The toy world's quantisation of model outputs: [-1, 1] NCHW (or CHW) -> uint8 NHWC (HWC).

    ``round((clamp(x, -1, 1) + 1) * 127.5)`` with round-half-to-even, i.e. the project's shared
    ``quantise`` with the ``round`` rule: it inverts the renderer's ``v / 127.5 - 1`` exactly, which
    truncation would not. Non-finite values raise.
    """
    return quantise(x, rule="round")


def layout_vector(image: np.ndarray, prompt: str) -> np.ndarray | None:
    """The scene's layout: (cx, cy, extent) in pixels of each prompted object, in prompt order
    (the evaluator's detection of its colour); None when an object is not found."""
    objects = score_image(image, prompt).objects
    if not all(o.found for o in objects):
        return None
    return np.array([v for o in objects for v in (o.detection.cx, o.detection.cy, o.detection.extent)])


def layout_diversity(images: np.ndarray, prompts: Sequence[str], groups: int, per_group: int) -> dict:
    """Mean over prompts of the mean pairwise distance of :func:`layout_vector` among one prompt's
    images; ``images`` hold ``groups`` consecutive runs of ``per_group`` images of one prompt each.
    Images missing an object are left out, prompts with fewer than two layouts too."""
    per_prompt = []
    for i in range(groups):
        rows = range(i * per_group, (i + 1) * per_group)
        found = [v for j in rows if (v := layout_vector(images[j], prompts[j])) is not None]
        if len(found) >= 2:
            per_prompt.append(mean_pairwise_distance(np.stack(found)))
    return {
        "value": float(np.mean(per_prompt)) if per_prompt else None,
        "attributes": "(cx, cy, extent) in pixels of each prompted object, from the rule-based "
        "evaluator; images missing an object are left out",
        "prompts_used": len(per_prompt),
    }
