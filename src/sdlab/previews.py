"""A cheap look at the picture a sampler is heading for: the step's predicted clean latents (the step
dict's `denoised`) turned into RGB by one linear map per pixel, instead of the VAE's decoder.

Each latent pixel of SD's VAE sums up an f x f patch of the image (f = 8), and its channels are close
to a linear code of that patch's colour; the popular web UI's "Approx cheap" preview is a fixed 4 x 3
matrix for SD's own VAE. We fit ours to whatever VAE the model has, by least squares, once when the
model loads: a few small random latents are decoded by the model's own VAE, each image is averaged
down to latent resolution, and the map (a C x 3 matrix and a bias) sends each latent pixel to its
patch's mean colour. The latents are smooth random fields (coarse noise, bilinearly enlarged), which
fit better than pixel-wise noise: a sampler's predictions are smooth too. The previews are at latent
resolution (1/f of the image's sides): blurred, in the right colours and places, for the cost of one
small matrix product. How close they come depends on how linear the decoder is; tests/test_previews.py
measures it for the bundled model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

FIT_IMAGES = 6  # random latents the map is fitted on
FIT_LATENT_SIZE = 16  # their side in latent pixels: 128 px images for SD, so the fit costs a few small decodes


@dataclass(frozen=True)
class LatentPreview:
    """latents (B, C, h, w), scaled as the UNet sees them -> RGB images (h, w), by `weight` and `bias`."""

    weight: torch.Tensor  # (C, 3): each latent channel's contribution to R, G, B in [-1, 1]
    bias: torch.Tensor  # (3,)

    def rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, h, w) in [-1, 1]."""
        latents = latents.detach().float().cpu()
        return (torch.einsum("bchw,cr->brhw", latents, self.weight) + self.bias[None, :, None, None]).clamp(-1, 1)

    def __call__(self, latents: torch.Tensor) -> list[Image.Image]:
        array = ((self.rgb(latents) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def smooth_random_latents(count: int, channels: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(count, channels, size, size) standard-normal-ish latents that vary smoothly: noise on grids of
    2 x 2 to 8 x 8 cells, bilinearly enlarged and rescaled to unit standard deviation."""
    latents = []
    for i in range(count):
        cells = 2 + (3 * i) % 7
        coarse = torch.randn((1, channels, cells, cells), generator=generator)
        field = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        latents.append(field / field.std())
    return torch.cat(latents)


@torch.no_grad()
def fit_latent_preview(vae: torch.nn.Module, latent_channels: int, downsample_factor: int, scaling_factor: float,
                       seed: int = 0) -> LatentPreview:
    """The least-squares linear map from `vae`'s scaled latents to the mean colour of each latent
    pixel's patch of the decoded image (module docstring). `vae.decode` takes unscaled latents."""
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = smooth_random_latents(FIT_IMAGES, latent_channels, FIT_LATENT_SIZE, generator)
    parameter = next(vae.parameters())
    images = vae.decode((latents / scaling_factor).to(parameter.device, parameter.dtype)).float().cpu().clamp(-1, 1)
    patch_colours = F.avg_pool2d(images, downsample_factor)  # (N, 3, h, w)
    inputs = latents.permute(0, 2, 3, 1).reshape(-1, latent_channels)
    inputs = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1)  # (N*h*w, C + 1): the last column fits the bias
    targets = patch_colours.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(inputs.double(), targets.double()).solution.float()  # (C + 1, 3)
    return LatentPreview(weight=solution[:latent_channels].contiguous(), bias=solution[latent_channels].contiguous())


def fit_for_pipeline(pipe) -> LatentPreview:
    """fit_latent_preview for a loaded pipeline's VAE."""
    vae = getattr(pipe.vae, "vae", pipe.vae)  # a TiledVAE wraps the model's own
    return fit_latent_preview(vae, pipe.config.latent_channels, pipe.config.vae.downsample_factor,
                              pipe.config.vae.scaling_factor)
