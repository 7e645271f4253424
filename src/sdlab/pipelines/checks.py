"""The checks every pipeline makes of its settings before anything runs; each refusal says what to do."""

from __future__ import annotations

from typing import Optional

from ..errors import InputError
from ..noise import NOISE_MODES
from .pipeline import Pipeline


def check_side(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"{name} must be a positive integer (pixels), got {value!r}; "
                         "leave it out for the default size")


def check_size(width: int, height: int, factor: int) -> None:
    for name, value in (("width", width), ("height", height)):
        check_side(name, value)
        if value % factor:
            nearest = max(factor, round(value / factor) * factor)
            raise InputError(f"{name} {value} is not a multiple of {factor}; try {nearest}")


def size_or_default(pipe: Pipeline, width: Optional[int], height: Optional[int]) -> tuple[int, int]:
    """(width, height), a side left out (None) being the model's native resolution; both checked."""
    width = pipe.config.resolution if width is None else width
    height = pipe.config.resolution if height is None else height
    check_size(width, height, pipe.latent_factor)
    return width, height


def check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps <= 0:
        raise InputError(f"steps must be a positive integer, got {steps!r}")


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch size must be a positive integer, got {batch_size!r}")


def check_prompts(prompts: list[str], negative_prompts: list[str]) -> None:
    if all(not p.strip() for p in prompts) and all(not n.strip() for n in negative_prompts):
        raise InputError("the prompt is empty and there is no negative prompt: describe the image you want")


def check_noise(noise: str) -> None:
    if noise not in NOISE_MODES:
        raise InputError(f"unknown noise mode '{noise}'; choose one of: {', '.join(NOISE_MODES)}")


def check_self_attention_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise InputError(f"self-attention scale must be a number above 0 (1: the network as trained; 2 sharpens "
                         f"it, for a canvas larger than the model's own), got {scale!r}")


def check_strength(strength) -> None:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise InputError(f"denoising strength must be a number from 0 (keep the image) to 1 (repaint it fully), "
                         f"got {strength!r}")


def as_list(value, batch_size: int, name: str) -> list[str]:
    """One text per image: a string repeated over the batch, or a list of batch_size texts."""
    if isinstance(value, str):
        return [value] * batch_size
    value = list(value)
    if len(value) != batch_size:
        raise InputError(f"{name}: got {len(value)} texts for a batch of {batch_size}")
    return value
