"""Where the random numbers of a generation come from.

A seed only reproduces an image if the same Gaussian numbers land in the same places. Each popular
tool draws them differently, so sdlab offers each tool's scheme:

- `per-image` (sdlab's default): image i of a batch has its own CPU generator seeded with `seed + i`,
  which hands out everything that image needs in diffusers' call order: its VAE posterior sample
  (img2img), its initial noise, each step's noise. An image is thus the same whatever batch it was
  made in, and a batch of one is exactly `diffusers`. Its initial and step noise are `a1111-cpu`'s.
- `diffusers`: one `torch.Generator("cpu")` seeded once; the initial latents are one
  `torch.randn((B, C, h, w))` draw and every later stochastic step draws the full batch shape again
  from the same generator (what diffusers' pipelines and schedulers do with a CPU generator).
- `a1111-cpu`: the AUTOMATIC1111 web UI with its RNG source set to CPU. Image i of a batch has its
  own generator seeded with `seed + i`, so an image does not depend on the batch it was made in;
  the initial noise and each step's noise are `torch.randn((C, h, w))` from that generator, stacked
  over the batch (the web UI's `ImageRNG.first()` / `next()`).
- `a1111-gpu`: the same per-image scheme with the numbers torch's CUDA generator gives for
  `torch.manual_seed(s); torch.randn(shape, device="cuda")` (the web UI's "NV" source), computed
  here on any device with Philox4x32-10 (`cuda_randn`).
- `comfy`: ComfyUI seeds the CPU generator with the seed and draws the whole batch's initial noise
  in one `torch.randn((B, C, h, w))`. Its ancestral samplers (`default_noise_sampler` in
  `comfy/k_diffusion/sampling.py`) seed a fresh generator with the same seed on the sampling
  device and draw the full batch shape per step. We reproduce the usual NVIDIA GPU case, CUDA
  numbers via `cuda_randn`; ComfyUI run on a CPU instead seeds its step generator with `seed + 1`.
  Its SDE samplers (Brownian-tree noise) are not covered by this module.

Variation seeds (the web UI's "Variation seed", `Variation`) belong to the per-image modes: the seed's
noise is bent towards a second seed's by spherical interpolation, and "Seed resize from" draws the
seed's noise at another size and pastes it, centred, into a draw of the right size.

CUDA reproduction (`a1111-gpu`, `comfy` steps). Torch's CUDA `randn` launches
`distribution_elementwise_grid_stride_kernel`: thread `i` runs `curand_init(seed, subsequence=i,
offset)` and its first `curand_normal4` value goes to element `i`. That holds while the tensor fits
in one pass of the grid (256 * blocks, capped at SMs * maxThreadsPerSM: 125,952 elements on an
RTX 3090, 270,336 on an H100); larger tensors are laid out differently on each GPU model, and no
device-independent answer exists for them. Each `randn` call advances torch's Philox offset by 4,
one 128-bit counter block. The Philox words are exact; the normals match CUDA's to about 1e-6,
because CUDA's Box-Muller uses the approximate `__sincosf` intrinsic and a 1-ulp `logf` that no
portable code reproduces bit for bit.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from numbers import Integral
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .config import NOISE_MODES
from .errors import InputError

PER_IMAGE_MODES = ("per-image", "a1111-cpu", "a1111-gpu")  # a generator per image: variation seeds work

# -- Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3", SC 2011)

# Round multipliers and Weyl key increments of Philox4x32 (Random123 `philox.h`): the increments
# are the golden ratio and sqrt(3) - 1 as 32-bit fractions.
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def philox4x32_10(counter: Sequence, key: Sequence) -> np.ndarray:
    """Philox4x32-10 of a batch of counters: four 32-bit words in, four out, under a 64-bit key.

    `counter` is four words (ints or equal-length integer arrays), `key` two words. Returns a
    (4, N) uint32 array. Products are taken in uint64 so that their high and low halves are exact.
    """
    c0, c1, c2, c3 = (np.asarray(word, dtype=np.uint64) & _MASK32 for word in counter)
    k0, k1 = (np.asarray(word, dtype=np.uint64) & _MASK32 for word in key)
    for round_index in range(PHILOX_ROUNDS):
        if round_index > 0:  # the key schedule: bump by the Weyl constants between rounds
            k0 = (k0 + np.uint64(PHILOX_W0)) & _MASK32
            k1 = (k1 + np.uint64(PHILOX_W1)) & _MASK32
        product0 = c0 * np.uint64(PHILOX_M0)
        product1 = c2 * np.uint64(PHILOX_M1)
        c0, c1, c2, c3 = (
            (product1 >> _SHIFT32) ^ c1 ^ k0,
            product1 & _MASK32,
            (product0 >> _SHIFT32) ^ c3 ^ k1,
            product0 & _MASK32,
        )
    words = np.broadcast_arrays(c0, c1, c2, c3)
    return np.stack([np.atleast_1d(w) for w in words]).astype(np.uint32)


# curand's float constants (`curand_normal_static.h`): CURAND_2POW32_INV is exactly 2**-32 as a
# float; CURAND_2POW32_INV_2PI is that times float(2*pi), rounded to float32 at compile time.
_TWO_POW32_INV = np.float32(2.3283064e-10)
_TWO_POW32_INV_2PI = np.float32(_TWO_POW32_INV * np.float32(6.2831855))


def _box_muller_sin(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The first output of curand's `_curand_box_muller(x, y)`: sqrt(-2 ln u) * sin(v), float32.

    u lies in (0, 1] and v in (0, 2pi]: each word is centred in its bucket of width 2**-32, so
    ln(u) is finite. The float32 steps that CUDA rounds exactly are reproduced exactly: the
    uint32 -> float conversion, u (its product is a power-of-two scaling), v as the fused
    multiply-add nvcc emits (the float64 product is exact), sqrt and the last product. logf and
    __sincosf, which CUDA computes approximately, are taken correctly rounded instead.
    """
    x32 = x.astype(np.float64).astype(np.float32)
    y32 = y.astype(np.float64).astype(np.float32)
    u = x32 * _TWO_POW32_INV + _TWO_POW32_INV / np.float32(2)
    v = (y32.astype(np.float64) * np.float64(_TWO_POW32_INV_2PI)
         + np.float64(_TWO_POW32_INV_2PI / np.float32(2))).astype(np.float32)
    log_u = np.log(u.astype(np.float64)).astype(np.float32)
    s = np.sqrt(np.float64(-2.0) * log_u.astype(np.float64)).astype(np.float32)
    sin_v = np.sin(v.astype(np.float64)).astype(np.float32)
    return s * sin_v


def cuda_randn(seed: int, shape: Sequence[int], draw: int = 0) -> torch.Tensor:
    """What `torch.manual_seed(seed); torch.randn(shape, device="cuda")` returns, on the CPU.

    `draw` counts the `randn` calls made on that generator before this one (each moves torch's
    Philox offset on by one counter block). Element i takes Philox counter (draw, i) under key
    `seed`, i.e. curand's state after `curand_init(seed, subsequence=i, offset=4 * draw)`.
    """
    numel = math.prod(shape)
    index = np.arange(numel, dtype=np.uint64)
    draw_words = (np.uint64(draw) & _MASK32, np.uint64(draw) >> _SHIFT32)
    counter = (draw_words[0], draw_words[1], index & _MASK32, index >> _SHIFT32)
    key = (np.uint64(seed) & _MASK32, np.uint64(seed) >> _SHIFT32)
    words = philox4x32_10(counter, key)
    normals = _box_muller_sin(words[0], words[1])
    return torch.from_numpy(normals.reshape(tuple(shape)))


# -- a generator for each image (the web UI's ImageRNG) -----------------------------------------


class CpuGenerator:
    """torch's CPU generator seeded with `seed`: each `randn` is its next draw."""

    def __init__(self, seed: int):
        self.generator = torch.Generator("cpu").manual_seed(seed)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator)


class CudaGenerator:
    """torch's CUDA generator seeded with `seed` (the web UI's "NV" source), computed by cuda_randn."""

    def __init__(self, seed: int):
        self.seed, self.draws = seed, 0

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        drawn = cuda_randn(self.seed, shape, draw=self.draws)
        self.draws += 1
        return drawn


@dataclass(frozen=True)
class Variation:
    """The web UI's variation seeds for one batch. Image i's initial noise is slerp(strength, its seed's
    noise, the noise of subseeds[i]); with `resize_from` (h, w), a latent size, the seed's noise is drawn
    at that size and pasted centred into the image's (its "Seed resize from")."""

    subseeds: Sequence[int] = ()
    strength: float = 0.0
    resize_from: Optional[tuple[int, int]] = None


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from `low` (t = 0) to `high` (t = 1) of one image's noise (C, h, w), as the
    web UI computes it: one angle per (channel, column), the norms taken down the rows (dim 1). Nearly
    parallel noises fall back to a linear mix with the web UI's weights, which are the other way round;
    kept, so that the same seeds give the same noise."""
    low_unit = low / low.norm(dim=1, keepdim=True)
    high_unit = high / high.norm(dim=1, keepdim=True)
    cos = (low_unit * high_unit).sum(1)  # (C, w)
    if cos.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = torch.acos(cos)
    return ((torch.sin((1 - t) * omega) / torch.sin(omega)).unsqueeze(1) * low
            + (torch.sin(t * omega) / torch.sin(omega)).unsqueeze(1) * high)


def _centred(size: int, inner: int) -> tuple[int, int, int]:
    """(start on the canvas, start in the pasted noise, length) of one axis of a centred paste; the web
    UI floors the offset, so an odd difference puts the extra row or column at the end."""
    offset = (size - inner) // 2
    length = inner if offset >= 0 else inner + 2 * offset
    return max(offset, 0), max(-offset, 0), length


def paste_centred(noise: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """`noise` (C, h', w') centred on `canvas` (C, h, w): cropped where it is larger, surrounded by the
    canvas where it is smaller."""
    (to_y, from_y, rows), (to_x, from_x, columns) = (_centred(canvas.shape[axis], noise.shape[axis]) for axis in (1, 2))
    pasted = canvas.clone()
    pasted[:, to_y:to_y + rows, to_x:to_x + columns] = noise[:, from_y:from_y + rows, from_x:from_x + columns]
    return pasted


def batch_seeds(seed: int, batch_size: int, variation: Optional[Variation] = None) -> list[int]:
    """Each image's seed, the web UI's rule: seed + i; with a variation strength every image keeps the
    seed and the variation seeds count up instead."""
    if variation is not None and variation.strength:
        return [seed] * batch_size
    return [seed + i for i in range(batch_size)]


class ImageNoise:
    """Image i of a batch draws from a generator of its own (`make_generator(seeds[i])`), so its numbers
    do not depend on the batch it is in: the web UI's ImageRNG, which sdlab's per-image modes share.

    `first()` is the initial noise, variation seeds applied; `draw(shape)` is every image's next draw.
    When the seed's noise is resized it comes from a fresh generator of the seed, and the image's own
    generator draws the canvas it is pasted on, as in the web UI.
    """

    def __init__(self, make_generator: Callable, seeds: Sequence[int], shape: Sequence[int],
                 variation: Optional[Variation] = None):
        self.make_generator = make_generator
        self.seeds = list(seeds)
        self.shape = tuple(shape)
        self.variation = variation or Variation()
        self.generators = [make_generator(seed) for seed in self.seeds]

    def draw(self, shape: Sequence[int]) -> torch.Tensor:
        """(B, *shape): the next draw of each image's generator."""
        return torch.stack([generator.randn(shape) for generator in self.generators])

    def first(self) -> torch.Tensor:
        """The initial noise (B, C, h, w)."""
        return torch.stack([self._first(i) for i in range(len(self.seeds))])

    def _first(self, i: int) -> torch.Tensor:
        variation = self.variation
        noise_shape = self.shape if variation.resize_from is None else (self.shape[0], *variation.resize_from)
        resized = noise_shape != self.shape
        if resized:
            noise = self.make_generator(self.seeds[i]).randn(noise_shape)
        else:
            noise = self.generators[i].randn(self.shape)
        if variation.strength:
            noise = slerp(variation.strength, noise, self.make_generator(variation.subseeds[i]).randn(noise_shape))
        if resized:
            noise = paste_centred(noise, self.generators[i].randn(self.shape))
        return noise


# -- noise sources of the tools ---------------------------------------------------------------------


class NoiseSource:
    """The Gaussian noise of one generation: the initial latents' noise, then one draw per step.

    `initial()` is drawn when the source is made, so it always comes first in the generators' order;
    `step_noise()` gives the next stochastic step's noise (ancestral / SDE samplers).
    Both return float32 CPU tensors of shape (B, C, h, w).
    """

    def __init__(self, mode: str, initial: torch.Tensor, next_step: Callable[[], torch.Tensor]):
        self.mode = mode
        self._initial = initial
        self._next_step = next_step

    def initial(self) -> torch.Tensor:
        return self._initial.clone()

    def step_noise(self) -> torch.Tensor:
        return self._next_step()


def image_noise(mode: str, seed: int, batch_size: int, shape: Sequence[int],
                variation: Optional[Variation] = None) -> ImageNoise:
    """The generators of a per-image mode (PER_IMAGE_MODES) for a batch, seeded by batch_seeds."""
    make_generator = CudaGenerator if mode == "a1111-gpu" else CpuGenerator
    return ImageNoise(make_generator, batch_seeds(seed, batch_size, variation), shape, variation)


def _diffusers(seed: int, batch_size: int, shape: tuple[int, ...]):
    generator = torch.Generator("cpu").manual_seed(seed)
    full_shape = (batch_size, *shape)
    draw = lambda: torch.randn(full_shape, generator=generator)  # noqa: E731
    return draw(), draw


def _comfy(seed: int, batch_size: int, shape: tuple[int, ...]):
    full_shape = (batch_size, *shape)
    initial = torch.randn(full_shape, generator=torch.Generator("cpu").manual_seed(seed))
    step_draws = itertools.count()  # a second generator, seeded afresh with the same seed
    return initial, lambda: cuda_randn(seed, full_shape, draw=next(step_draws))


_WHOLE_BATCH_MODES = {"diffusers": _diffusers, "comfy": _comfy}


def _is_count(value, least: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, Integral) and value >= least


def check_variation(mode: str, batch_size: int, variation: Optional[Variation]) -> None:
    """Variation seeds need a generator per image, and a variation seed for each image."""
    if variation is None:
        return
    strength = variation.strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise InputError(f"variation strength must be a number from 0 (the seed's noise) to 1 (the variation "
                         f"seed's), got {strength!r}")
    if (strength or variation.resize_from is not None) and mode not in PER_IMAGE_MODES:
        raise InputError(f"variation seeds and seed resize are the web UI's, made with a generator per image; "
                         f"noise mode {mode!r} has one for the whole batch: use {', '.join(PER_IMAGE_MODES)}")
    if strength:
        subseeds = list(variation.subseeds)
        if len(subseeds) != batch_size or not all(_is_count(s, 0) and s < 2**64 for s in subseeds):
            raise InputError(f"variation seeds must be {batch_size} integers from 0 to 2**64 - 1, got {subseeds!r}")
    if variation.resize_from is not None and (
            len(variation.resize_from) != 2 or not all(_is_count(n, 1) for n in variation.resize_from)):
        raise InputError(f"seed resize must be two positive sizes, got {variation.resize_from!r}")


def check_noise_request(mode: str, seed, batch_size, shape, variation: Optional[Variation] = None) -> None:
    """Refuse, with what to do, what noise_source could not draw."""
    if mode not in NOISE_MODES:
        raise InputError(f"unknown noise mode {mode!r}; choose one of: {', '.join(NOISE_MODES)}")
    if not _is_count(seed, 0):
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if not _is_count(batch_size, 1):
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(shape) != 3 or not all(_is_count(n, 1) for n in shape):
        raise InputError(f"noise shape must be three positive sizes (C, h, w), got {tuple(shape)!r}")
    check_variation(mode, batch_size, variation)
    # The web UI's seeds are 32-bit and image i of a batch uses seed + i; torch seeds are 64-bit.
    limit = 2**32 if mode.startswith("a1111") else 2**64
    if max(batch_seeds(seed, batch_size, variation)) >= limit:
        raise InputError(
            f"seed {seed} with batch size {batch_size} is out of range for {mode!r}: "
            f"seed + batch_size - 1 must be below {limit}"
        )


def noise_source(mode: str, seed: int, batch_size: int, shape: Sequence[int],
                 variation: Optional[Variation] = None) -> NoiseSource:
    """The noise a tool named by `mode` would use for `batch_size` latents of shape (C, h, w); `variation`:
    the web UI's variation seeds and seed resize (per-image modes only)."""
    check_noise_request(mode, seed, batch_size, shape, variation)
    seed, batch_size, shape = int(seed), int(batch_size), tuple(int(n) for n in shape)
    if mode in PER_IMAGE_MODES:
        images = image_noise(mode, seed, batch_size, shape, variation)
        return NoiseSource(mode, images.first(), lambda: images.draw(shape))
    initial, next_step = _WHOLE_BATCH_MODES[mode](seed, batch_size, shape)
    return NoiseSource(mode, initial, next_step)
