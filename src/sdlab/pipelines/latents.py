"""Between pixels and latents: the VAE's encode and decode as the pipelines use them, tiled when asked
or when the image is large."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .pipeline import Pipeline


def with_tiled_vae(pipe: Pipeline, tiled_vae: Optional[bool], width: int, height: int, batch_size: int) -> Pipeline:
    """The pipeline with its VAE tiling as `tiled_vae` says (None: above a megapixel or when an untiled
    pass would not fit). Checked now, so a size that cannot fit fails before sampling."""
    from ..devices import wants_tiled_vae
    from ..models.tiling import TiledVAE

    vae = pipe.vae.vae if isinstance(pipe.vae, TiledVAE) else pipe.vae
    vae_dtype = next(vae.parameters()).dtype
    tiled = wants_tiled_vae(pipe.config.vae, height, width, batch_size, vae_dtype, pipe.device, tiled_vae)
    return dataclasses.replace(pipe, vae=TiledVAE(vae, tiled))


@torch.no_grad()
def decode_latents(pipe: Pipeline, latents: torch.Tensor) -> list[Image.Image]:
    """(B, C, h, w) scaled latents -> B images, decoded one at a time as the web UI decodes them: a batched
    convolution may round differently from a single one, and an image must not depend on its batch."""
    vae = pipe.vae
    vae_dtype = next(vae.parameters()).dtype
    scaled = latents.to(pipe.device, vae_dtype) / pipe.config.vae.scaling_factor
    images = torch.cat([vae.decode(scaled[i:i + 1]) for i in range(scaled.shape[0])])
    # the same rounding as diffusers' image processor, so images compare bit for bit
    array = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]


@torch.no_grad()
def encode_images(pipe: Pipeline, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f), sampled from the VAE's posterior."""
    return encode_posterior(pipe, images).sample(generator).to(pipe.dtype) * pipe.config.vae.scaling_factor


@torch.no_grad()
def encode_posterior(pipe: Pipeline, images: torch.Tensor):
    """(B, 3, H, W) in [-1, 1] -> the VAE's posterior q(z | x) (models/vae.py DiagonalGaussian), unscaled."""
    vae = pipe.vae
    vae_dtype = next(vae.parameters()).dtype
    return vae.encode(images.to(pipe.device, vae_dtype))
