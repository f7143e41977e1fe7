"""mIoU-versus-clicks line plot drawn with Pillow.

Pillow is already a core dependency; matplotlib would be a ~40 MB optional extra for one line
chart, and the plot must be reproducible on any install that can run ``segany eval``, so the
chart is drawn directly: axes, grid, ticks, one coloured polyline with markers per series and a
legend.
"""
from __future__ import annotations

import io
from typing import Dict, Sequence

from PIL import Image, ImageDraw, ImageFont

from ..io import atomic_write_bytes

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def plot_miou(path, series: Dict[str, Sequence[float]], title: str = "mIoU vs. number of clicks", size=(900, 600)) -> None:
    """Write a PNG with one line per ``series`` (label -> mIoU after click 1..n) to ``path``."""
    if not series:
        raise ValueError("nothing to plot")
    W, H = size
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    f, fs = _font(16), _font(13)
    left, right, top, bottom = 70, 30, 50, 60
    pw, ph = W - left - right, H - top - bottom
    n = max(len(v) for v in series.values())
    lo = min(min(v) for v in series.values() if len(v))
    y_min = max(0.0, min(0.9, (int(lo * 10) / 10.0)))
    y_max = 1.0

    def X(i: float) -> float:  # click number 1..n
        return left + (i - 1) / max(1, n - 1) * pw

    def Y(v: float) -> float:
        return top + (y_max - v) / (y_max - y_min) * ph

    # grid and ticks
    step = 0.1 if y_max - y_min > 0.3 else 0.05
    v = y_min
    while v <= y_max + 1e-9:
        y = Y(v)
        d.line([(left, y), (left + pw, y)], fill=(225, 225, 225))
        d.text((left - 8, y), f"{v:.2f}", fill="black", font=fs, anchor="rm")
        v += step
    for i in range(1, n + 1):
        if n <= 10 or i == 1 or i % 2 == 0:
            x = X(i)
            d.line([(x, top), (x, top + ph)], fill=(240, 240, 240))
            d.text((x, top + ph + 6), str(i), fill="black", font=fs, anchor="mt")
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    d.text((left + pw / 2, H - 22), "number of clicks", fill="black", font=f, anchor="mm")
    d.text((left + pw / 2, 22), title, fill="black", font=f, anchor="mm")
    d.text((16, top + ph / 2), "mIoU", fill="black", font=f, anchor="lm")

    for k, (label, vals) in enumerate(series.items()):
        c = COLORS[k % len(COLORS)]
        pts = [(X(i + 1), Y(max(y_min, v))) for i, v in enumerate(vals)]
        if len(pts) > 1:
            d.line(pts, fill=c, width=3)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        # legend, bottom right inside the axes
        ly = top + ph - 22 * (len(series) - k)
        d.line([(left + pw - 250, ly), (left + pw - 220, ly)], fill=c, width=3)
        d.text((left + pw - 212, ly), label, fill="black", font=fs, anchor="lm")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
