"""Text to image: noise -> denoising loop guided by the prompt -> VAE decode."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..errors import InputError
from ..infotext import format_infotext
from ..noise import noise_source
from ..samplers import resolve_sampler, sample
from .common import (
    GenerationResult, Pipeline, as_list, check_noise, check_prompts, check_size, check_steps,
    decode_latents, encode_text, generation_params, make_denoiser, random_seed,
)


def image_seeds(seed: int, batch_size: int, noise: str) -> list[int]:
    """The seed each image of a batch is reproduced with: the web UI gives image i seed+i."""
    if noise.startswith("a1111"):
        return [seed + i for i in range(batch_size)]
    return [seed] * batch_size


@torch.no_grad()
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
    sampler: str = "Euler a",
    noise: str = "diffusers",
    latents: Optional[torch.Tensor] = None,
    clip_skip: int = 1,
    eta: Optional[float] = None,
    callback: Optional[Callable[[dict], None]] = None,
) -> GenerationResult:
    """Generate `batch_size` images for `prompt` (a string, or one per image).

    `latents` replaces the seeded initial noise (B, C, H/f, W/f), standard normal; `callback` gets the
    sampler's step dict ({'i', 'total', 'sigma', 'x', 'denoised'}) after every step.
    """
    width = width or pipe.config.resolution
    height = height or pipe.config.resolution
    check_size(width, height, pipe.latent_factor)
    check_steps(steps)
    check_noise(noise)
    spec = resolve_sampler(sampler)
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    prompts = as_list(prompt, batch_size, "prompt")
    negatives = as_list(negative_prompt, batch_size, "negative prompt")
    check_prompts(prompts, negatives)
    seed = random_seed() if seed is None else int(seed)
    if seed < 0:
        raise InputError(f"seed must be non-negative, got {seed}")

    shape = (pipe.config.latent_channels, height // pipe.latent_factor, width // pipe.latent_factor)
    source = noise_source(noise, seed, batch_size, shape)
    if latents is None:
        latents = source.initial()
    elif tuple(latents.shape) != (batch_size, *shape):
        raise InputError(f"latents must have shape {(batch_size, *shape)}, got {tuple(latents.shape)}")

    cond, uncond = encode_text(pipe, prompts, negatives, clip_skip)
    model = make_denoiser(pipe, cond, uncond, guidance_scale, sampler=spec)
    latents = sample(
        spec, model, latents.to(pipe.device, torch.float32), pipe.config.schedule, steps,
        step_noise=lambda: source.step_noise().to(pipe.device), eta=eta, callback=callback,
    )
    images = decode_latents(pipe, latents)

    infotexts = []
    for i, image_seed in enumerate(image_seeds(seed, batch_size, noise)):
        params = generation_params(
            pipe, steps=steps, sampler=spec.name, guidance_scale=guidance_scale, seed=image_seed,
            width=width, height=height, noise=noise, clip_skip=clip_skip, batch_size=batch_size,
            batch_pos=i, extra={"Eta": eta},
        )
        infotexts.append(format_infotext(prompts[i], negatives[i], params))
    return GenerationResult(images, infotexts, image_seeds(seed, batch_size, noise), latents)
