"""Pictures a training run leaves behind: image grids and loss curves, drawn with PIL alone."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..inside import sheets

CURVE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def tensor_to_image(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB image."""
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy(), "RGB")


def _wrap(text: str, width: int, draw: ImageDraw.ImageDraw, font, max_lines: int = 3) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    return lines[:max_lines]


FONT_SIZE = 12  # Pillow's default 10 px renders some spaces zero-width ("sdlabtrain unet")
LINE_HEIGHT = 14


def image_grid(images: Sequence[Image.Image], columns: int, labels: Sequence[str] = (), pad: int = 2,
               min_side: int = 128) -> Image.Image:
    """Images (all one size) in rows of `columns`, enlarged (nearest neighbour, whole factors) to at
    least `min_side` so small training images stay legible, with wrapped labels under them."""
    factor = max(1, math.ceil(min_side / max(images[0].size)))
    images = [image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST) for image in images]
    width, height = images[0].size
    font = sheets.font(FONT_SIZE)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(label, width, measure, font) for label in labels]
    label_height = LINE_HEIGHT * max((len(lines) for lines in wrapped), default=0) + (2 if wrapped else 0)
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (width + pad) + pad, rows * (height + label_height + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = pad + (i % columns) * (width + pad), pad + (i // columns) * (height + label_height + pad)
        grid.paste(image, (x, y))
        for k, line in enumerate(wrapped[i] if i < len(wrapped) else []):
            draw.text((x, y + height + 1 + LINE_HEIGHT * k), line, fill=(0, 0, 0), font=font)
    return grid


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing, debiased)."""
    out, average = [], 0.0
    for i, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** (i + 1)))
    return out


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    """Round values to label the y axis: 1-2-5 per decade (log), or about six steps (linear)."""
    if log:
        for mantissas in ((1, 2, 5), range(1, 10)):  # every integer mantissa where a range is under one 1-2-5 step
            ticks = [m * 10.0**e for e in range(math.floor(lo), math.ceil(hi) + 1) for m in mantissas
                     if lo <= math.log10(m * 10.0**e) <= hi]
            if len(ticks) >= 2:
                return ticks
        return [v for v in _ticks(10.0**lo, 10.0**hi, False) if v > 0]  # a narrow range: evenly spaced values
    raw = (hi - lo) / 6
    step = min((m * 10.0 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [v for v in np.arange(math.ceil(lo / step) * step, hi + step / 2, step) if v <= hi + step * 1e-6]


def curve_panel(name: str, curve: Sequence[tuple[int, float]], size=(800, 220)) -> Image.Image:
    """One logged value against the step: raw values faint, smoothed bold. The y axis is logarithmic
    when every value is positive (losses), linear otherwise (e.g. a GAN's generator term)."""
    width, height = size
    left, right, top, bottom = 64, 16, 22, 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = sheets.font(FONT_SIZE)
    curve = [(s, v) for s, v in curve if math.isfinite(v)]
    if not curve:
        draw.text((left, 6), f"{name}: no data yet", fill=(0, 0, 0), font=font)
        return image
    draw.text((left, 6), f"{name}  (last {curve[-1][1]:.4g}, step {curve[-1][0]})", fill=(0, 0, 0), font=font)
    log = all(v > 0 for _, v in curve)
    scale = math.log10 if log else (lambda v: v)
    s_min, s_max = curve[0][0], curve[-1][0]
    lo, hi = min(scale(v) for _, v in curve), max(scale(v) for _, v in curve)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    s_span = max(s_max - s_min, 1)

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (step - s_min) / s_span * (width - left - right),
                top + (hi - scale(value)) / (hi - lo) * (height - top - bottom))

    draw.rectangle((left, top, width - right, height - bottom), outline=(0, 0, 0))
    for value in _ticks(lo, hi, log):
        y = xy(s_min, value)[1]
        draw.line((left + 1, y, width - right - 1, y), fill=(225, 225, 225))
        draw.text((4, y - 6), f"{value:.3g}", fill=(0, 0, 0), font=font)
    for tick in np.linspace(s_min, s_max, 6):
        x = xy(tick, curve[0][1])[0]
        draw.line((x, height - bottom, x, height - bottom + 4), fill=(0, 0, 0))
        draw.text((x - 12, height - bottom + 6), f"{int(round(tick))}", fill=(0, 0, 0), font=font)
    colour = CURVE_COLOURS[0]
    raw = [xy(s, v) for s, v in curve]
    if len(raw) > 1:
        draw.line(raw, fill=tuple(int(c + (255 - c) * 0.7) for c in colour), width=1)
        draw.line([xy(s, v) for (s, _), v in zip(curve, smooth([v for _, v in curve]))], fill=colour, width=2)
    else:
        x, y = raw[0]
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    return image


def loss_plot(curves: dict[str, Sequence[tuple[int, float]]], title: str = "") -> Image.Image:
    """Every logged value in its own panel, "loss" first, under a title line."""
    names = sorted(curves, key=lambda name: name != "loss")
    panels = [curve_panel(name, curves[name]) for name in names] or [curve_panel("loss", [])]
    image = Image.new("RGB", (panels[0].width, 20 + sum(p.height for p in panels)), "white")
    ImageDraw.Draw(image).text((8, 4), title, fill=(0, 0, 0), font=sheets.font(FONT_SIZE))
    y = 20
    for panel in panels:
        image.paste(panel, (0, y))
        y += panel.height
    return image
