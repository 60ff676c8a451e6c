"""PIL drawing of ``senseflow toy ablate``'s report images: the training curves (logged values), the
quality curves (each kept checkpoint measured, mean ± sd over seeds) and the sample grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: Logged values drawn as training curves: log.jsonl key -> title.
CURVES = (
    ("loss_dmd", "DMD loss (generator turns)"),
    ("loss_fake", "fake-score loss"),
    ("image_std", "image std"),
    ("isg_grad_ratio", "|grad ISG| / |grad DMD| on G's output"),
)
#: Measured values drawn as quality curves: curve-point key -> (title, scale).
QUALITY = (
    ("fid_teacher", "FID-T (lower is better)", 1.0),
    ("accuracy_all", "compositional accuracy (%)", 100.0),
    ("recall", "recall vs teacher (k = {k})", 1.0),
    ("diversity", "intra-prompt diversity (toy features)", 1.0),
    ("texture", "background texture (0-255)", 1.0),
)
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (0, 0, 0),
    (0, 0, 128),
    (128, 128, 0),
    (0, 128, 128),
    (230, 180, 0),
    (128, 0, 64),
    (100, 200, 120),
    (250, 150, 150),
    (90, 60, 0),
    (150, 150, 255),
    (255, 0, 255),
    (0, 200, 0),
    (180, 180, 180),
    (100, 0, 160),
)  # distinct colours: a report of up to 24 variants draws every line in its own
Series = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # x, mean, sd (or None)


def _smooth(y: np.ndarray) -> np.ndarray:
    w = max(1, len(y) // 40)
    if w == 1:
        return y
    kernel = np.ones(w) / w
    padded = np.concatenate([np.full(w - 1, y[0]), y])
    return np.convolve(padded, kernel, mode="valid")


def _mean_over_seeds(runs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The mean over seeds at the iterations every seed logged."""
    xs, mean, _ = mean_sd_over_seeds(runs)
    return xs, mean


def mean_sd_over_seeds(runs: list[tuple[np.ndarray, np.ndarray]]) -> Series:
    """Mean and sample sd (None for one seed) over seeds at the iterations every seed has."""
    common = set(runs[0][0].tolist())
    for x, _ in runs[1:]:
        common &= set(x.tolist())
    xs = np.array(sorted(common))
    if len(xs) == 0:
        return xs, np.array([]), None
    ys = np.array([np.interp(xs, x, y) for x, y in runs])
    return xs, ys.mean(axis=0), ys.std(axis=0, ddof=1) if len(runs) > 1 else None


def _finite(s: Series) -> Series:
    """The points of a series whose mean is a number (None became NaN: nothing measured there)."""
    x, m, sd = s
    keep = np.isfinite(m)
    return x[keep], m[keep], None if sd is None else np.nan_to_num(sd[keep])


def _panel(draw, box, title: str, series: dict[str, Series], colour_of, hlines: dict[str, float]) -> None:
    """One framed panel: a line per series (error bars where an sd is given), dashed references."""
    x0, y0, pw, ph = box
    draw.rectangle([x0, y0, x0 + pw, y0 + ph], outline=(0, 0, 0))
    draw.text((x0, y0 - 30), title, fill=(0, 0, 0))
    series = {k: _finite(s) for k, s in series.items()}
    series = {k: s for k, s in series.items() if len(s[0]) > 0}
    hlines = {k: v for k, v in hlines.items() if v is not None and np.isfinite(v)}
    if not series:
        draw.text((x0 + 10, y0 + ph // 2), "not logged", fill=(0, 0, 0))
        return
    xmax = max(float(s[0].max()) for s in series.values()) or 1.0
    lows = [float(np.min(m - (0 if sd is None else sd))) for _, m, sd in series.values()]
    highs = [float(np.max(m + (0 if sd is None else sd))) for _, m, sd in series.values()]
    lo, hi = min(lows + list(hlines.values())), max(highs + list(hlines.values()))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    draw.text((x0 + 3, y0 + 2), f"{hi:.3g}", fill=(90, 90, 90))
    draw.text((x0 + 3, y0 + ph - 14), f"{lo:.3g}", fill=(90, 90, 90))
    draw.text((x0, y0 + ph + 4), "0", fill=(0, 0, 0))
    draw.text((x0 + pw - 40, y0 + ph + 4), f"{int(xmax)} it", fill=(0, 0, 0))

    def point(a: float, b: float) -> tuple[float, float]:
        return x0 + pw * a / xmax, y0 + ph * (1 - (b - lo) / (hi - lo))

    for name, level in hlines.items():
        _, py = point(0.0, level)
        for a in range(0, pw, 10):
            draw.line([(x0 + a, py), (x0 + min(a + 5, pw), py)], fill=(60, 60, 60), width=1)
        draw.text((x0 + pw - 7 * len(name) - 4, py - 13), name, fill=(60, 60, 60))
    for key, (x, y, sd) in series.items():
        colour = colour_of(key)
        pts = [point(float(a), float(b)) for a, b in zip(x, y, strict=True)]
        if sd is not None:
            for a, b, s in zip(x, y, sd, strict=True):
                (px, top), (_, bottom) = point(float(a), float(b + s)), point(float(a), float(b - s))
                draw.line([(px, top), (px, bottom)], fill=colour, width=1)
                draw.line([(px - 3, top), (px + 3, top)], fill=colour, width=1)
                draw.line([(px - 3, bottom), (px + 3, bottom)], fill=colour, width=1)
        if len(pts) == 1:
            px, py = pts[0]
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        else:
            draw.line(pts, fill=colour, width=2)


def _figure(
    panels: list[tuple[str, dict[str, Series], dict[str, float]]], labels: dict[str, str], path: Path
):
    pw, ph, margin, per_row = 360, 240, 48, 3
    rows = -(-len(panels) // per_row)
    legend_h = 18 * len(labels) + 10
    width = min(len(panels), per_row) * (pw + margin) + margin
    canvas = Image.new("RGB", (width, rows * (ph + 2 * margin) + legend_h), "white")
    draw = ImageDraw.Draw(canvas)
    order = list(labels)

    def colour_of(key: str) -> tuple[int, int, int]:
        return PALETTE[order.index(key) % len(PALETTE)]

    for i, (title, series, hlines) in enumerate(panels):
        box = (margin + (i % per_row) * (pw + margin), margin + (i // per_row) * (ph + 2 * margin), pw, ph)
        _panel(draw, box, title, series, colour_of, hlines)
    ly = rows * (ph + 2 * margin)
    for j, key in enumerate(order):
        draw.line([(margin, ly + 18 * j + 6), (margin + 24, ly + 18 * j + 6)], fill=colour_of(key), width=3)
        draw.text((margin + 30, ly + 18 * j), labels[key], fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def plot_curves(
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], labels: dict[str, str], path: Path
) -> Path:
    """Training curves: one panel per logged value, one line per variant (mean over seeds, moving mean)."""
    panels = [
        (f"{title} (moving mean)", {v: (c[key][0], _smooth(c[key][1]), None) for v, c in curves.items()}, {})
        for key, title in CURVES
    ]
    return _figure(panels, {v: labels[v] for v in curves}, path)


def plot_quality(
    curves: dict[str, dict[str, Series]],
    labels: dict[str, str],
    path: Path,
    references: dict[str, dict[str, float]],
) -> Path:
    """Quality curves: one panel per measured value, one line per variant (mean ± sd over seeds at
    each measured checkpoint); ``references``: name -> {key: value} drawn as dashed lines."""
    from senseflow.metrics.coverage import DEFAULT_K

    panels = []
    for key, title, scale in QUALITY:
        title = title.format(k=DEFAULT_K)
        series = {
            v: (x, scale * m, None if sd is None else scale * sd)
            for v, c in curves.items()
            for x, m, sd in [c[key]]
        }
        hlines = {name: scale * vals[key] for name, vals in references.items() if vals.get(key) is not None}
        panels.append((title, series, hlines))
    return _figure(panels, {v: labels[v] for v in curves}, path)


def _grid(rows: dict[str, np.ndarray], path: Path) -> Path:
    from senseflow.viz import labelled_rows, save_image

    return save_image(labelled_rows(list(rows.values()), list(rows)), path)
