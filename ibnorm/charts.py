"""Small PNG charts drawn with Pillow (no plotting library is a dependency): lines with bands,
points with error bars and arrows."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


@dataclass
class Series:
    label: str
    x: list[float]
    y: list[float]
    lo: list[float] | None = None  # band / error bar bounds
    hi: list[float] | None = None
    points: bool = False  # markers instead of a line
    xerr: list[float] | None = None
    arrows: list[tuple[int, int]] = field(default_factory=list)  # (from index, to index) within this series


@dataclass
class Chart:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    logx: bool = False
    hlines: list[tuple[str, float]] = field(default_factory=list)
    links: list[tuple[float, float, float, float]] = field(default_factory=list)  # grey arrows (x0, y0) → (x1, y1)


def _text(s: str) -> str:
    """Pillow's built-in font has no Greek letters or arrows."""
    for a, b in (("λ", "lambda"), ("σ", "sigma"), ("→", "->"), ("Δ", "delta")):
        s = s.replace(a, b)
    return s


def _bounds(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    return lo - pad, hi + pad


def render(chart: Chart, width: int = 900, height: int = 520) -> bytes:
    """The chart as PNG bytes."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img, "RGBA")
    left, right, top, bottom = 80, width - 230, 35, height - 55
    fx = (lambda v: math.log10(v)) if chart.logx else (lambda v: v)
    xs = [fx(v) for s in chart.series for v in s.x if v is not None and (v > 0 or not chart.logx)]
    xs += [fx(v + e) for s in chart.series if s.xerr for v, e in zip(s.x, s.xerr)]
    xs += [fx(v - e) for s in chart.series if s.xerr for v, e in zip(s.x, s.xerr) if v - e > 0 or not chart.logx]
    ys = [v for s in chart.series for v in (s.y + (s.lo or []) + (s.hi or []))] + [v for _, v in chart.hlines]
    x0, x1 = _bounds(xs)
    y0, y1 = _bounds(ys)

    def xy(x: float, y: float) -> tuple[float, float]:
        return (left + (right - left) * (fx(x) - x0) / (x1 - x0), bottom - (bottom - top) * (y - y0) / (y1 - y0))

    draw.rectangle([left, top, right, bottom], outline="black")
    for i in range(5):
        yv, xv = y0 + (y1 - y0) * i / 4, x0 + (x1 - x0) * i / 4
        py = bottom - (bottom - top) * i / 4
        draw.text((5, py - 6), f"{yv:.4g}", fill="black")
        px = left + (right - left) * i / 4
        draw.text((px - 15, bottom + 6), f"{(10 ** xv if chart.logx else xv):.3g}", fill="black")
    for k, (label, v) in enumerate(chart.hlines):
        py = xy(10 ** x0 if chart.logx else x0, v)[1]
        draw.line([left, py, right, py], fill=(90, 90, 90), width=1)
        draw.text((left + 5, py - 12), _text(label), fill=(90, 90, 90))
    for a0, b0, a1, b1 in chart.links:
        _arrow(draw, xy(a0, b0), xy(a1, b1), (150, 150, 150))
    for k, s in enumerate(chart.series):
        _draw_series(draw, s, PALETTE[k % len(PALETTE)], xy)
        draw.rectangle([right + 15, top + 18 * k + 3, right + 27, top + 18 * k + 13], fill=PALETTE[k % len(PALETTE)])
        draw.text((right + 32, top + 18 * k), _text(s.label)[:28], fill="black")
    draw.text((left, 10), _text(chart.title), fill="black")
    draw.text(((left + right) // 2 - 40, height - 25), _text(chart.xlabel) + (" (log scale)" if chart.logx else ""), fill="black")
    draw.text((5, 18), _text(chart.ylabel), fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _draw_series(draw, s: Series, color: tuple[int, int, int], xy) -> None:
    pts = [xy(x, y) for x, y in zip(s.x, s.y)]
    if s.lo and s.hi and not s.points and len(pts) > 1:
        poly = [xy(x, v) for x, v in zip(s.x, s.hi)] + [xy(x, v) for x, v in reversed(list(zip(s.x, s.lo)))]
        draw.polygon(poly, fill=(*color, 50))  # translucent: overlapping seed bands stay visible
    if not s.points and len(pts) > 1:
        draw.line(pts, fill=color, width=2)
    for i, (px, py) in enumerate(pts):
        if s.points or len(pts) == 1:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
        if s.points and s.lo and s.hi:
            draw.line([xy(s.x[i], s.lo[i]), xy(s.x[i], s.hi[i])], fill=color)
        if s.points and s.xerr:
            draw.line([xy(s.x[i] - s.xerr[i], s.y[i]), xy(s.x[i] + s.xerr[i], s.y[i])], fill=color)
    for a, b in s.arrows:
        _arrow(draw, pts[a], pts[b], color)


def _arrow(draw, p: tuple[float, float], q: tuple[float, float], color) -> None:
    draw.line([p, q], fill=color, width=1)
    ang = math.atan2(q[1] - p[1], q[0] - p[0])
    for da in (2.6, -2.6):
        draw.line([q, (q[0] + 8 * math.cos(ang + da), q[1] + 8 * math.sin(ang + da))], fill=color, width=1)
