"""The forward process: an image encoded by the model's VAE, noised to chosen timesteps by the model's
own schedule, and decoded again: the lectures' "noise amount" strip, in pixel and in latent space.

DDPM's closed form (Ho et al. 2020, eq. 4): `z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps`, with a_t the
cumulative product of (1 - beta) (schedules.alphas_cumprod) and one eps for every t, so the strip shows
the same noise growing. z0 is the posterior mean of the VAE's encoder, scaled as the UNet sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import InputError
from ..pipelines.images import load_image, resize_image, to_pixels
from ..pipelines.latents import decode_latents, encode_posterior
from ..schedules import alphas_cumprod
from .sheets import channel_picture, labelled_grid

LATENT_LIMIT = 3.0  # the channel pictures' black and white, in the scaled latents' (about unit) standard deviations


@dataclass
class NoiseStrip:
    original: Image.Image  # the image as encoded (resized to the model's resolution)
    timesteps: list[int]
    alphas: list[float]  # a_t at each timestep
    clean_latents: torch.Tensor  # z0 (1, C, h, w), scaled
    latents: torch.Tensor  # z_t (T, C, h, w) for each timestep
    images: list[Image.Image]  # each z_t decoded


def parse_timesteps(text: str, count: int) -> list[int]:
    """`--at 0,100,999` as integers in [0, count - 1]."""
    try:
        timesteps = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--at takes whole timesteps separated by commas, like 0,250,999, got '{text}'") from None
    if not timesteps:
        raise InputError("--at needs at least one timestep, like 0,250,999")
    outside = [t for t in timesteps if not 0 <= t < count]
    if outside:
        raise InputError(f"timesteps must be from 0 to {count - 1} (the model's schedule), got {outside[0]}")
    return timesteps


@torch.no_grad()
def forward_noise(pipe, image, timesteps: list[int], seed: int = 0) -> NoiseStrip:
    """`image` (a path or PIL image) encoded, noised to each of `timesteps` with one seeded eps, decoded."""
    image = load_image(image, "image")
    size = pipe.config.resolution
    image = resize_image(image, size, size, "crop")
    count = pipe.config.schedule.num_train_timesteps
    for t in timesteps:
        if not 0 <= t < count:
            raise InputError(f"timesteps must be from 0 to {count - 1} (the model's schedule), got {t}")
    z0 = encode_posterior(pipe, to_pixels(image)).mean.float().cpu() * pipe.config.vae.scaling_factor
    eps = torch.randn(z0.shape, generator=torch.Generator("cpu").manual_seed(seed))
    a = alphas_cumprod(pipe.config.schedule)[timesteps]  # (T,)
    latents = a.sqrt()[:, None, None, None] * z0 + (1 - a).sqrt()[:, None, None, None] * eps
    images = [decode_latents(pipe, z[None])[0] for z in latents]
    return NoiseStrip(image, list(timesteps), a.tolist(), z0, latents, images)


def latent_mosaic(latents: torch.Tensor, limit: float = LATENT_LIMIT) -> Image.Image:
    """(C, h, w) latents as one picture: each channel in greyscale (channel_picture), tiled in a square."""
    channels = latents.shape[0]
    side = int(channels**0.5 + 0.999)
    rows = -(-channels // side)
    h, w = latents.shape[1:]
    mosaic = Image.new("RGB", (side * w + side - 1, rows * h + rows - 1), (255, 255, 255))
    for c in range(channels):
        mosaic.paste(channel_picture(latents[c], limit), (c % side * (w + 1), c // side * (h + 1)))
    return mosaic


def noise_strip_picture(strip: NoiseStrip) -> Image.Image:
    """The original, then each timestep: decoded pixels above, the latent channels below."""
    clean = latent_mosaic(strip.clean_latents[0])
    labels = ["original"] + [f"t = {t}\nabar {a:.3f}" for t, a in zip(strip.timesteps, strip.alphas)]
    pixels_row = [strip.original] + strip.images
    latent_row = [clean] + [latent_mosaic(z) for z in strip.latents]
    size = strip.original.size
    return labelled_grid([pixels_row, [tile.resize(size, Image.Resampling.NEAREST) for tile in latent_row]],
                         column_labels=labels, row_labels=["decoded", "latent\nchannels"],
                         title="Forward diffusion: sqrt(abar) z0 + sqrt(1 - abar) eps")
