"""Inpainting pieces the shared run applies: latent blending outside a mask for ordinary UNets, and the
all-paint conditioning an inpainting UNet gets when it runs without a mask."""

from __future__ import annotations

import torch

from .latents import encode_posterior
from .pipeline import Pipeline


class KeepOutsideMask(torch.nn.Module):
    """Inpainting with any UNet: outside the mask, the original latents noised to the current sigma
    replace what the sampler made, so only the masked area is generated.

    diffusers' StableDiffusionInpaintPipeline does this for 4-channel UNets after every scheduler step,
    `(1 - mask) * add_noise(image_latents, noise, t_next) + mask * latents`; the next model call is the
    first place a denoiser sees that step's result. The samplers hand the model the very tensor they
    step, so the blend is written into it in place and the sampler carries the blended latents on.
    The first call sees the sampler's own start, as diffusers' first step does; `finish` blends the
    returned latents with the clean originals, as diffusers' last step does.
    """

    def __init__(self, model, latents: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.model, self.latents, self.noise, self.mask = model, latents, noise, mask
        self.calls = 0

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if self.calls:
            s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
            x.copy_((1 - self.mask) * (self.latents + self.noise * s) + self.mask * x)
        self.calls += 1
        return self.model(x, sigma)

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        return (1 - self.mask) * self.latents + self.mask * latents


def unmasked_concat(pipe: Pipeline, batch_size: int, width: int, height: int) -> torch.Tensor:
    """(B, 5, h, w) for an inpainting UNet used without a mask (txt2img, img2img): everything is to be
    painted (mask 1) and the masked image is all grey (0 in [-1, 1]), as the web UI conditions them."""
    pixels = torch.zeros(1, 3, height, width)
    grey = encode_posterior(pipe, pixels).mode().float() * pipe.config.vae.scaling_factor  # (1, 4, h, w)
    h, w = grey.shape[-2:]
    return torch.cat([torch.ones(1, 1, h, w), grey.cpu()], dim=1).expand(batch_size, -1, -1, -1)
