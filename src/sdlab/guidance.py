"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022, eq. 6, written for x0):

    D = D(x; sigma, uncond) + guidance_scale * (D(x; sigma, cond) - D(x; sigma, uncond))

The ε- and v-to-x0 maps are affine in the network output with the same x, so guiding the denoised
latents equals diffusers' guiding of `noise_pred`. Both halves go through the UNet as one batch,
unconditional first, as diffusers' StableDiffusionPipeline concatenates them.

Prompt editing makes the conditioning a function of the step (prompts.ScheduledConditioning). Samplers
only pass sigma, and some call the model more than once per step (Heun, DPM++ SDE, PLMS's first
step), so the step is read off the sigma schedule the sampler walks: a call at sigma belongs to step i
when sigmas[i] >= sigma > sigmas[i + 1]. Heun's corrector at sigmas[i + 1] therefore sees step i + 1's
text, the text of that noise level.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .errors import InputError
from .prompts import ScheduledConditioning

# Relative slack when matching a model call's sigma to the schedule's: the sampler passes the schedule's
# own float32 values, possibly through a dtype round trip; intermediate sigmas lie far from the nodes.
SIGMA_MATCH_TOLERANCE = 1e-5


def _as_cond(cond) -> dict:
    return dict(cond) if isinstance(cond, dict) else {"crossattn": cond}


def step_index(sigma, sigmas: torch.Tensor) -> int:
    """The 0-based sampling step a model call at `sigma` belongs to, for the decreasing schedule `sigmas`
    (steps + 1 values): the number of the schedule's inner sigmas at or above it."""
    value = float(torch.as_tensor(sigma).reshape(-1)[0])
    inner = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)[1:-1].cpu()
    return int((inner >= value * (1 - SIGMA_MATCH_TOLERANCE)).sum())


class CFGDenoiser(nn.Module):
    """`model(x, sigma) -> guided denoised`, around `denoiser(x, sigma, **cond)`.

    `cond`, `uncond`: the text embeddings (B, L, D), a ScheduledConditioning, or dicts of UNet keyword
    arguments such as {"crossattn": (B, L, D)}. `shared`: conditioning both halves get, e.g. `concat`
    (inpainting's mask and masked-image latents, (B, 5, h, w)) or `y` (the x4 upscaler's noise level, (B,)).
    `sigmas`: the schedule the sampler walks, needed when a ScheduledConditioning changes over the steps.
    A guidance_scale of 1 is the conditional model alone and skips the unconditional pass.
    `truncation`: CFG truncation, a fast mode (fast/modes.py): from step `truncation * steps` on, the
    conditional model alone, as at guidance_scale 1 (guidance sets the layout early; the last steps add
    detail it changes little). Needs `sigmas`, where the steps are counted; None guides every step.
    """

    def __init__(self, denoiser: nn.Module, cond, uncond, guidance_scale: float, *,
                 sigmas: Optional[torch.Tensor] = None, truncation: Optional[float] = None, **shared):
        super().__init__()
        self.denoiser = denoiser
        self.cond, self.uncond, self.shared = _as_cond(cond), _as_cond(uncond), shared
        self.guidance_scale = guidance_scale
        self.truncation = truncation
        self.sigmas = None if sigmas is None else torch.as_tensor(sigmas).detach().cpu()
        scheduled = [v for c in (self.cond, self.uncond) for v in c.values() if isinstance(v, ScheduledConditioning)]
        if self.sigmas is None and any(v.changes for v in scheduled):
            raise InputError("prompt editing changes the conditioning per step: pass the sampler's sigmas "
                             "(CFGDenoiser(..., sigmas=sampler_sigmas(...)))")
        if self.sigmas is None and truncation is not None:
            raise InputError("CFG truncation counts the steps: pass the sampler's sigmas with `truncation`")

    def conditioning(self, sigma) -> tuple[dict, dict]:
        """(cond, uncond) dicts of tensors for a model call at `sigma`."""
        step = 0 if self.sigmas is None else step_index(sigma, self.sigmas)

        def resolve(cond: dict) -> dict:
            return {k: v.at_step(step) if isinstance(v, ScheduledConditioning) else v for k, v in cond.items()}

        return resolve(self.cond), resolve(self.uncond)

    def guided(self, sigma) -> bool:
        """Whether a model call at `sigma` runs the unconditional pass too."""
        if self.guidance_scale == 1:
            return False
        return self.truncation is None or step_index(sigma, self.sigmas) < self.truncation * (len(self.sigmas) - 1)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        cond, uncond = self.conditioning(sigma)
        if not self.guided(sigma):
            return self.denoiser(x, sigma, **cond, **self.shared)
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        both = {key: torch.cat([uncond[key], cond[key]]) for key in cond}
        both.update({key: torch.cat([value, value]) for key, value in self.shared.items()})
        uncond_out, cond_out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        return uncond_out + self.guidance_scale * (cond_out - uncond_out)
