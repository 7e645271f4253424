"""Seeds and the random numbers they give: which seed each image gets, and every draw of one generation."""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

from ..errors import InputError
from ..noise import PER_IMAGE_MODES, Variation, batch_seeds, check_noise_request, check_variation, image_noise, noise_source


def check_seed(seed, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise InputError(f"{name} must be an integer from 0 to 2**64 - 1, got {seed!r}")
    return int(seed)


def random_seed() -> int:
    return random.randrange(2**32)  # the web UI's seeds are 32-bit, so every tool can take ours


def resolve_seed(seed: Optional[int], name: str = "seed") -> int:
    """The seed a run uses: `seed` checked, or a fresh random one when None. A pipeline that runs
    several passes or draws numbers of its own resolves it once and hands the result on."""
    return check_seed(random_seed() if seed is None else seed, name)


def image_seeds(seed: int, batch_size: int, noise: str, variation: Optional[Variation] = None) -> list[int]:
    """The seed each image of a batch is reproduced with, alone or in any batch. A generator per image
    (PER_IMAGE_MODES) gives image i seed + i, as the web UI does (with a variation strength every image
    keeps the seed); a whole-batch generator's images are reproduced by the batch, all under its seed."""
    if noise in PER_IMAGE_MODES:
        return batch_seeds(seed, batch_size, variation)
    return [seed] * batch_size


def variation_subseeds(subseed: int, batch_size: int) -> list[int]:
    """The web UI's variation seeds: image i of a batch gets subseed + i, whatever the strength."""
    return [subseed + i for i in range(batch_size)]


def resolve_subseed(subseed: Optional[int], strength) -> Optional[int]:
    """The variation seed a run uses: checked, or random when None; left as it is at strength 0, where
    it changes nothing (the web UI then neither uses nor records it)."""
    return resolve_seed(subseed, "variation seed") if strength else subseed


def seed_variation(subseed: Optional[int], strength, resize_from, batch_size: int,
                   latent_factor: int) -> Optional[Variation]:
    """The web UI's variation settings of one batch as a noise.Variation, None when there are none.
    `subseed` is resolved (resolve_subseed); `resize_from` is (width, height) in pixels, which the
    web UI divides by the VAE's factor, rounding down."""
    if not strength and resize_from is None:
        return None
    latent_size = None
    if resize_from is not None:
        sides = tuple(resize_from) if isinstance(resize_from, (tuple, list)) else ()
        if len(sides) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= latent_factor
                                      for n in sides):
            raise InputError(f"seed resize from must be (width, height), each at least {latent_factor} px, "
                             f"got {resize_from!r}")
        latent_size = (sides[1] // latent_factor, sides[0] // latent_factor)
    subseeds = variation_subseeds(subseed, batch_size) if strength else ()
    return Variation(subseeds, strength, latent_size)


class NoiseDraws:
    """Every random number of one generation, drawn in the order its tool draws them.

    `noise="diffusers"`: one CPU generator seeded once hands out everything in call order, as in
    diffusers' pipelines. Its img2img pipeline draws the init image's VAE posterior sample, then the
    initial noise, then each stochastic step's noise; its inpainting pipeline draws [the init image's
    posterior sample,] the initial noise, the masked image's posterior sample, then the steps. A
    pipeline's `prepare` calls `posterior` and `initial` in that order.
    `noise="per-image"`: the same order, each image drawing its own numbers from its own generator
    (noise.ImageNoise), so that image i of a batch is the image of seed + i alone.
    The other modes draw the initial and step noise as their tool does (noise.py) and take the
    posterior's mean: the web UI samples it from torch's global RNG, which its seed does not fix.
    `variation`: the web UI's variation seeds (per-image modes). `latents`, when given, replace the
    initial noise (it is still drawn, so the steps' noise stays put).
    """

    def __init__(self, mode: str, seed: int, batch_size: int, shape: tuple, latents: Optional[torch.Tensor] = None,
                 variation: Optional[Variation] = None):
        check_variation(mode, batch_size, variation)
        self.shape = (batch_size, *shape)
        self._latents = latents
        self._initial = None
        self._generator = self._images = self._source = None
        if mode == "diffusers":
            self._generator = torch.Generator("cpu").manual_seed(seed)
        elif mode == "per-image":
            check_noise_request(mode, seed, batch_size, shape, variation)
            self._images = image_noise(mode, seed, batch_size, shape, variation)
        else:
            self._source = noise_source(mode, seed, batch_size, shape, variation)

    def posterior(self, shape) -> Optional[torch.Tensor]:
        """Standard-normal eps for a VAE posterior sample mean + std * eps; None: take the mean.

        `shape` is (N, ...) for N = 1 image shared by the batch or one per image; per-image noise gives
        (batch_size, ...) either way, each image sampling the posterior with its own generator."""
        if self._images is not None:
            return self._images.draw(tuple(shape)[1:])
        if self._generator is None:
            return None
        return torch.randn(tuple(shape), generator=self._generator)

    def initial(self) -> torch.Tensor:
        """The initial noise (B, C, h, w), drawn on the first call."""
        if self._initial is None:
            if self._images is not None:
                drawn = self._images.first()
            elif self._source is not None:
                drawn = self._source.initial()
            else:
                drawn = torch.randn(self.shape, generator=self._generator)
            self._initial = drawn if self._latents is None else self._latents.float().cpu()
        return self._initial

    def step(self) -> torch.Tensor:
        """The next stochastic step's noise (B, C, h, w)."""
        self.initial()
        if self._images is not None:
            return self._images.draw(self.shape[1:])
        if self._source is not None:
            return self._source.step_noise()
        return torch.randn(self.shape, generator=self._generator)
