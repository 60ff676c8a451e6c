"""PIL drawing of ``senseflow toy ablate``'s report images: the training curves and the sample grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CURVES = (
    ("loss_dmd", "DMD loss (generator turns)"),
    ("loss_fake", "fake-score loss"),
    ("image_std", "image std"),
)
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
)


def _smooth(y: np.ndarray) -> np.ndarray:
    w = max(1, len(y) // 40)
    if w == 1:
        return y
    kernel = np.ones(w) / w
    padded = np.concatenate([np.full(w - 1, y[0]), y])
    return np.convolve(padded, kernel, mode="valid")


def _mean_over_seeds(runs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The mean over seeds at the iterations every seed logged."""
    common = set(runs[0][0].tolist())
    for x, _ in runs[1:]:
        common &= set(x.tolist())
    xs = np.array(sorted(common))
    if len(xs) == 0:
        return xs, np.array([])
    ys = [np.interp(xs, x, y) for x, y in runs]
    return xs, np.mean(ys, axis=0)


def plot_curves(
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], labels: dict[str, str], path: Path
):
    """Training curves (one panel per logged value, one line per variant), drawn with PIL."""
    pw, ph, margin = 360, 240, 48
    legend_h = 18 * len(curves) + 10
    canvas = Image.new("RGB", (len(CURVES) * (pw + margin) + margin, ph + 2 * margin + legend_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (key, title) in enumerate(CURVES):
        x0, y0 = margin + i * (pw + margin), margin
        draw.rectangle([x0, y0, x0 + pw, y0 + ph], outline=(0, 0, 0))
        draw.text((x0, y0 - 30), f"{title} (moving mean)", fill=(0, 0, 0))
        series = {v: c[key] for v, c in curves.items() if len(c[key][0]) > 0}
        if not series:
            draw.text((x0 + 10, y0 + ph // 2), "not logged", fill=(0, 0, 0))
            continue
        smoothed = {v: (x, _smooth(y)) for v, (x, y) in series.items()}
        xmax = max(float(x.max()) for x, _ in smoothed.values()) or 1.0
        lo = min(float(y.min()) for _, y in smoothed.values())
        hi = max(float(y.max()) for _, y in smoothed.values())
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        draw.text((x0 + 3, y0 + 2), f"{hi:.3g}", fill=(90, 90, 90))
        draw.text((x0 + 3, y0 + ph - 14), f"{lo:.3g}", fill=(90, 90, 90))
        draw.text((x0, y0 + ph + 4), "0", fill=(0, 0, 0))
        draw.text((x0 + pw - 40, y0 + ph + 4), f"{int(xmax)} it", fill=(0, 0, 0))
        for v, (x, y) in smoothed.items():
            colour = PALETTE[list(curves).index(v) % len(PALETTE)]
            pts = [
                (x0 + pw * float(a) / xmax, y0 + ph * (1 - (float(b) - lo) / (hi - lo)))
                for a, b in zip(x, y, strict=True)
            ]
            if len(pts) == 1:
                px, py = pts[0]
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
            else:
                draw.line(pts, fill=colour, width=2)
    ly = ph + 2 * margin
    for j, v in enumerate(curves):
        colour = PALETTE[j % len(PALETTE)]
        draw.line([(margin, ly + 18 * j + 6), (margin + 24, ly + 18 * j + 6)], fill=colour, width=3)
        draw.text((margin + 30, ly + 18 * j), labels[v], fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _grid(rows: dict[str, np.ndarray], path: Path) -> Path:
    from senseflow.viz import labelled_rows, save_image

    return save_image(labelled_rows(list(rows.values()), list(rows)), path)
