"""Seeds and the random numbers they give: which seed each image gets, and every draw of one generation."""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

from ..errors import InputError
from ..noise import noise_source


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise InputError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
    return int(seed)


def random_seed() -> int:
    return random.randrange(2**32)  # the web UI's seeds are 32-bit, so every tool can take ours


def resolve_seed(seed: Optional[int]) -> int:
    """The seed a run uses: `seed` checked, or a fresh random one when None. A pipeline that runs
    several passes or draws numbers of its own resolves it once and hands the result on."""
    return check_seed(random_seed() if seed is None else seed)


def image_seeds(seed: int, batch_size: int, noise: str) -> list[int]:
    """The seed each image of a batch is reproduced with: the web UI gives image i seed+i."""
    if noise.startswith("a1111"):
        return [seed + i for i in range(batch_size)]
    return [seed] * batch_size


class NoiseDraws:
    """Every random number of one generation, drawn in the order its tool draws them.

    `noise="diffusers"`: one CPU generator seeded once hands out everything in call order, as in
    diffusers' pipelines. Its img2img pipeline draws the init image's VAE posterior sample, then the
    initial noise, then each stochastic step's noise; its inpainting pipeline draws [the init image's
    posterior sample,] the initial noise, the masked image's posterior sample, then the steps. A
    pipeline's `prepare` calls `posterior` and `initial` in that order.
    The other modes draw the initial and step noise as their tool does (noise.py) and take the
    posterior's mean: the web UI samples it from torch's global RNG, which its seed does not fix.
    `latents`, when given, replace the initial noise (it is still drawn, so the steps' noise stays put).
    """

    def __init__(self, mode: str, seed: int, batch_size: int, shape: tuple, latents: Optional[torch.Tensor] = None):
        self.shape = (batch_size, *shape)
        self._latents = latents
        self._initial = None
        if mode == "diffusers":
            self._generator = torch.Generator("cpu").manual_seed(seed)
            self._source = None
        else:
            self._generator = None
            self._source = noise_source(mode, seed, batch_size, shape)

    def posterior(self, shape) -> Optional[torch.Tensor]:
        """Standard-normal eps for a VAE posterior sample mean + std * eps; None: take the mean."""
        if self._generator is None:
            return None
        return torch.randn(tuple(shape), generator=self._generator)

    def initial(self) -> torch.Tensor:
        """The initial noise (B, C, h, w), drawn on the first call."""
        if self._initial is None:
            drawn = self._source.initial() if self._source else torch.randn(self.shape, generator=self._generator)
            self._initial = drawn if self._latents is None else self._latents.float().cpu()
        return self._initial

    def step(self) -> torch.Tensor:
        """The next stochastic step's noise (B, C, h, w)."""
        self.initial()
        if self._source is not None:
            return self._source.step_noise()
        return torch.randn(self.shape, generator=self._generator)
