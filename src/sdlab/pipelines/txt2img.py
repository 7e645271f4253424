"""Text to image: noise -> denoising loop guided by the prompt -> VAE decode (common.generate as it is)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..config import DEFAULT_SAMPLER
from .common import GenerationResult, Pipeline, generate, image_seeds  # noqa: F401  (image_seeds: public here before)


def txt2img(
    pipe: Pipeline,
    prompt,
    negative_prompt="",
    *,
    steps: int = 20,
    guidance_scale: float = 7.0,
    seed: Optional[int] = None,
    width: Optional[int] = None,
    height: Optional[int] = None,
    batch_size: int = 1,
    sampler: str = DEFAULT_SAMPLER,
    noise: str = "diffusers",
    latents: Optional[torch.Tensor] = None,
    clip_skip: int = 1,
    eta: Optional[float] = None,
    callback: Optional[Callable[[dict], None]] = None,
    loras=(),
    lora_dirs=(),
    lora_mode: str = "merge",
    tiled_vae: Optional[bool] = None,
) -> GenerationResult:
    """Generate `batch_size` images for `prompt` (a string, or one per image).

    `latents` replaces the seeded initial noise (B, C, H/f, W/f), standard normal; `callback` gets the
    sampler's step dict ({'i', 'total', 'sigma', 'x', 'denoised'}) after every step. An inpainting
    checkpoint (9 input channels) paints the whole canvas, its mask all ones. LoRAs: `loras`
    ([file | (file, weight)]) and `<lora:name:weight>` tags in the prompt (files found by stem in
    `lora_dirs`), merged into the weights or applied on the fly (`lora_mode` "merge" | "dynamic").
    """
    return generate(
        pipe, prompt, negative_prompt, steps=steps, guidance_scale=guidance_scale, seed=seed, width=width,
        height=height, batch_size=batch_size, sampler=sampler, noise=noise, latents=latents, clip_skip=clip_skip,
        eta=eta, callback=callback, loras=loras, lora_dirs=lora_dirs, lora_mode=lora_mode,
        tiled_vae=tiled_vae,
    )
