"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022, eq. 6, written for x0):

    D = D(x; sigma, uncond) + guidance_scale * (D(x; sigma, cond) - D(x; sigma, uncond))

The ε- and v-to-x0 maps are affine in the network output with the same x, so guiding the denoised
latents equals diffusers' guiding of `noise_pred`. Both halves go through the UNet as one batch,
unconditional first, as diffusers' StableDiffusionPipeline concatenates them.
"""

from __future__ import annotations

import torch
from torch import nn


def _as_cond(cond) -> dict:
    return dict(cond) if isinstance(cond, dict) else {"crossattn": cond}


class CFGDenoiser(nn.Module):
    """`model(x, sigma) -> guided denoised`, around `denoiser(x, sigma, **cond)`.

    `cond`, `uncond`: the text embeddings (B, L, D), or dicts of UNet keyword arguments such as
    {"crossattn": (B, L, D)}. `shared`: conditioning both halves get, e.g. `concat` (inpainting's mask
    and masked-image latents, (B, 5, h, w)) or `y` (the x4 upscaler's noise level, (B,)).
    A guidance_scale of 1 is the conditional model alone and skips the unconditional pass.
    """

    def __init__(self, denoiser: nn.Module, cond, uncond, guidance_scale: float, **shared):
        super().__init__()
        self.denoiser = denoiser
        self.cond, self.uncond, self.shared = _as_cond(cond), _as_cond(uncond), shared
        self.guidance_scale = guidance_scale

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if self.guidance_scale == 1:
            return self.denoiser(x, sigma, **self.cond, **self.shared)
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        both = {key: torch.cat([self.uncond[key], self.cond[key]]) for key in self.cond}
        both.update({key: torch.cat([value, value]) for key, value in self.shared.items()})
        uncond, cond = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)
