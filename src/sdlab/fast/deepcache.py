"""DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"): the deep UNet
features change little from one denoising step to the next, so run the whole UNet every N-th call and,
on the calls between, only its shallow branch at full resolution, reusing the deep features of the last
whole call (models/unet.py, DeepFeatures).

The schedule counts model calls, not sampler steps, so every sampler gets it alike (Heun's two calls a
step are two calls): after each whole call, N - 1 shallow ones. When cfg-trunc drops the unconditional
pass the batch halves: the count goes on, the shallow calls on the conditional half of the cached
features (guidance.CFGDenoiser stacks the unconditional batch first, the conditional second, so the
halved call's inputs are the second half of the cached call's). A call whose latents differ from the
cached call's in any other way (hires fix changes the size) runs whole and starts the count again.

`whole_above`: calls at a timestep above it all run whole (the first share S of the steps,
`--fast deepcache:N:D:S`). The first steps decide the layout, and their deep features change fastest, so caching
there costs the most (docs/performance-fast-modes.md); after them the count starts from the last whole call.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..config import ScheduleConfig
from ..errors import InputError
from ..models.unet import DeepFeatures
from ..schedules import sigma_to_t


class DeepCacheUNet(nn.Module):
    """`unet(x, timesteps, **cond)` that runs whole on calls 0, N, 2N, ... and shallow on the others
    (after the calls above timestep `whole_above`, all whole). With interval 1 every call is whole: the
    exact network."""

    def __init__(self, unet: nn.Module, interval: int, depth: int = 1, whole_above: Optional[float] = None):
        super().__init__()
        deepest = len(unet.input_blocks) - 1
        if interval < 1:
            raise InputError(f"deepcache:N needs N >= 1, got {interval}")
        if not 0 <= depth <= deepest:
            raise InputError(f"deepcache depth {depth} is beyond this UNet's skip connections (0 to {deepest})")
        self.unet = unet
        self.interval = interval
        self.cache = DeepFeatures(depth)
        self.whole_above = whole_above
        self.shallow_calls = 0  # since the last whole call
        self.shape = None

    @property
    def config(self):
        return self.unet.config

    def forward(self, x: torch.Tensor, timesteps, **cond) -> torch.Tensor:
        warming_up = self.whole_above is not None and float(torch.as_tensor(timesteps).max()) > self.whole_above
        if self._halved_to_the_conditional_pass(x) and not warming_up and self.shallow_calls < self.interval - 1:
            self.cache.features = self.cache.features[x.shape[0]:]
            self.shape = x.shape
        if x.shape != self.shape or warming_up or self.shallow_calls == self.interval - 1:
            self.shape, self.shallow_calls = x.shape, 0
            self.cache.features = None  # this call runs whole and keeps its deep features
        else:
            self.shallow_calls += 1
        return self.unet(x, timesteps, **cond, deep_cache=self.cache)

    def _halved_to_the_conditional_pass(self, x: torch.Tensor) -> bool:
        """Whether `x` is half the batch of the cached call, otherwise alike: CFG truncation's first
        conditional-only call."""
        return (self.shape is not None and self.cache.features is not None and x.dim() == len(self.shape)
                and 2 * x.shape[0] == self.shape[0] and x.shape[1:] == self.shape[1:])


def whole_above_timestep(share: float, sigmas, schedule: ScheduleConfig, quantize: bool) -> Optional[float]:
    """DeepCacheUNet's `whole_above` for `deepcache:N:D:S`: the UNet timestep of the first step after the
    first share S of the sampler's steps (counted as CFG truncation counts them), as the Denoiser feeds it
    (`quantize`: rounded). None for S = 0, where no step is kept whole."""
    if not share:
        return None
    if sigmas is None:
        raise InputError("deepcache:N:D:S counts the steps: pass the sampler's sigmas")
    sigmas = torch.as_tensor(sigmas).detach().cpu().reshape(-1)
    first_cached = min(math.ceil(share * (len(sigmas) - 1)), len(sigmas) - 1)
    return float(sigma_to_t(sigmas[first_cached:first_cached + 1], schedule, quantize))
