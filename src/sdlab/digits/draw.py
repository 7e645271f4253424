"""Drawing digits with sdlab's own samplers: the network goes behind denoisers.Denoiser (SD's epsilon
wrapper, in pixel space instead of latent space) and guidance.CFGDenoiser, whose conditioning here is
the digit label {"labels": (B,)} instead of text embeddings; then any sampler of sdlab.samplers runs it."""

from __future__ import annotations

import io
import os
from typing import Callable, Optional, Sequence

import torch
from PIL import Image

from ..config import ScheduleConfig
from ..denoisers import Denoiser
from ..errors import InputError
from ..guidance import CFGDenoiser
from ..outputs import write_file
from ..samplers import resolve_sampler, sample
from . import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS
from .model import NULL_LABEL, DigitsNet

SCHEDULE = ScheduleConfig()  # SD's scaled-linear schedule (sigma 0.03 to 14.6): ample noise for [-1, 1] pixels
SCALE = 8  # screen pixels per digit pixel in the pictures


def check_digit(digit) -> int:
    if not (isinstance(digit, int) or (isinstance(digit, str) and digit.strip().isdigit())) or not 0 <= int(digit) <= 9:
        raise InputError(f"the digit must be one of 0-9, got '{digit}'")
    return int(digit)


@torch.no_grad()
def draw_digits(net: DigitsNet, digits: Sequence[int], seed: int = 0, guidance_scale: float = DEFAULT_GUIDANCE,
                steps: int = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER,
                callback: Optional[Callable[[dict], None]] = None) -> torch.Tensor:
    """(B, 1, 8, 8) drawings in [-1, 1], one per entry of `digits`, from seeded noise."""
    labels = torch.tensor([check_digit(d) for d in digits], dtype=torch.long)
    spec = resolve_sampler(sampler)
    denoiser = Denoiser(net, SCHEDULE, "epsilon", quantize=spec.quantize)
    model = CFGDenoiser(denoiser, {"labels": labels}, {"labels": torch.full_like(labels, NULL_LABEL)}, guidance_scale)
    side = net.config.side
    noise = torch.randn((len(labels), 1, side, side), generator=torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed + 1)
    step_noise = lambda: torch.randn(noise.shape, generator=generator)  # noqa: E731 (stochastic samplers, seeded)
    return sample(spec, model, noise, SCHEDULE, steps, callback=callback, step_noise=step_noise).clamp(-1, 1)


def digit_picture(pixels: torch.Tensor, scale: int = SCALE) -> Image.Image:
    """One (1, h, w) drawing in [-1, 1] as dark ink on white paper, each pixel a `scale`-wide square."""
    values = ((1 - pixels.clamp(-1, 1)[0]) * 127.5).round().byte().numpy()
    image = Image.fromarray(values, mode="L")
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def grid_picture(drawings: torch.Tensor, columns: int, scale: int = SCALE, gap: int = 2) -> Image.Image:
    """(B, 1, h, w) drawings tiled row by row, `columns` per row, on a grey background."""
    pictures = [digit_picture(d, scale) for d in drawings]
    width, height = pictures[0].size
    rows = (len(pictures) + columns - 1) // columns
    grid = Image.new("L", (columns * (width + gap) + gap, rows * (height + gap) + gap), 160)
    for i, picture in enumerate(pictures):
        grid.paste(picture, (gap + (i % columns) * (width + gap), gap + (i // columns) * (height + gap)))
    return grid.convert("RGB")


class TrajectoryRecorder:
    """A sampler callback keeping, per step, the current noisy drawing (scaled to unit variance, as the
    network sees it) and the predicted clean drawing; `frames()` puts them side by side, a row per digit."""

    def __init__(self):
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, info: dict) -> None:
        scaled = info["x"] / (float(info["sigma"]) ** 2 + 1) ** 0.5
        self.steps.append((scaled.clone(), info["denoised"].clone()))

    def frames(self, final: torch.Tensor) -> list[Image.Image]:
        pairs = self.steps + [(final, final)]
        return [grid_picture(torch.stack([t for pair in zip(x, d) for t in pair]), columns=2) for x, d in pairs]


def save_animation(frames: list[Image.Image], path: str, frame_ms: int = 120) -> str:
    """An animated GIF or WebP of `frames`, the last held for a second; written atomically."""
    fmt = {".gif": "GIF", ".webp": "WEBP"}.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise InputError(f"the trajectory must be a .gif or .webp file, got '{path}'")
    buffer = io.BytesIO()
    durations = [frame_ms] * (len(frames) - 1) + [1000]
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    write_file(buffer.getvalue(), path)  # atomic, with the usual file mode
    return path

