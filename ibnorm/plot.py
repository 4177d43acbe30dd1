"""A loss-curve PNG drawn with Pillow (already installed with torchvision), no plotting library needed."""

from __future__ import annotations

import io


def loss_curve_png(losses: list[float], evals: list[dict], width: int = 800, height: int = 450) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 70, width - 20, 30, height - 50
    values = list(losses) + [e["loss"] for e in evals]
    if not values:
        values = [0.0, 1.0]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        hi = lo + 1.0
    steps = max(len(losses), max((e["step"] for e in evals), default=1), 1)

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (right - left) * step / steps, bottom - (bottom - top) * (value - lo) / (hi - lo))

    draw.rectangle([left, top, right, bottom], outline="black")
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        y = xy(0, v)[1]
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((5, y - 6), f"{v:.3f}", fill="black")
    for i in range(5):
        s = steps * i / 4
        x = xy(s, lo)[0]
        draw.text((x - 10, bottom + 8), f"{int(s)}", fill="black")
    if len(losses) > 1:
        draw.line([xy(i + 1, l) for i, l in enumerate(losses)], fill=(31, 119, 180), width=2)
    for e in evals:
        x, y = xy(e["step"], e["loss"])
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(214, 39, 40))
    draw.text((left, 8), "training loss (blue) and held-out loss (red) by step", fill="black")
    draw.text((width // 2 - 15, height - 22), "step", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
