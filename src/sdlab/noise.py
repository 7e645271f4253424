"""Where the random numbers of a generation come from.

A seed only reproduces an image if the same Gaussian numbers land in the same places. Each popular
tool draws them differently, so sdlab offers each tool's scheme:

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
from numbers import Integral
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import InputError

NOISE_MODES = ("diffusers", "a1111-cpu", "a1111-gpu", "comfy")

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


# -- noise sources of the four tools --------------------------------------------------------------


class NoiseSource:
    """The Gaussian noise of one generation: the initial latents' noise, then one draw per step.

    `initial()` is drawn when the source is made, so it always comes first in the generators'
    order; `step_noise()` gives the next stochastic step's noise (ancestral / SDE samplers).
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


def _diffusers(seed: int, batch_size: int, shape: tuple[int, ...]):
    generator = torch.Generator("cpu").manual_seed(seed)
    full_shape = (batch_size, *shape)
    draw = lambda: torch.randn(full_shape, generator=generator)  # noqa: E731
    return draw(), draw


def _a1111_cpu(seed: int, batch_size: int, shape: tuple[int, ...]):
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch_size)]
    draw = lambda: torch.stack([torch.randn(shape, generator=g) for g in generators])  # noqa: E731
    return draw(), draw


def _a1111_gpu(seed: int, batch_size: int, shape: tuple[int, ...]):
    draws = itertools.count()

    def draw():
        k = next(draws)
        return torch.stack([cuda_randn(seed + i, shape, draw=k) for i in range(batch_size)])

    return draw(), draw


def _comfy(seed: int, batch_size: int, shape: tuple[int, ...]):
    full_shape = (batch_size, *shape)
    initial = torch.randn(full_shape, generator=torch.Generator("cpu").manual_seed(seed))
    step_draws = itertools.count()  # a second generator, seeded afresh with the same seed
    return initial, lambda: cuda_randn(seed, full_shape, draw=next(step_draws))


_MODES = {"diffusers": _diffusers, "a1111-cpu": _a1111_cpu, "a1111-gpu": _a1111_gpu, "comfy": _comfy}


def _check(mode: str, seed, batch_size, shape) -> None:
    if mode not in _MODES:
        raise InputError(f"unknown noise mode {mode!r}; choose one of: {', '.join(NOISE_MODES)}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(shape) != 3 or not all(isinstance(n, Integral) and n > 0 for n in shape):
        raise InputError(f"noise shape must be three positive sizes (C, h, w), got {tuple(shape)!r}")
    # The web UI's seeds are 32-bit and image i of a batch uses seed + i; torch seeds are 64-bit.
    limit = 2**32 if mode.startswith("a1111") else 2**64
    if seed + batch_size - 1 >= limit:
        raise InputError(
            f"seed {seed} with batch size {batch_size} is out of range for {mode!r}: "
            f"seed + batch_size - 1 must be below {limit}"
        )


def noise_source(mode: str, seed: int, batch_size: int, shape: Sequence[int]) -> NoiseSource:
    """The noise a tool named by `mode` would use for `batch_size` latents of shape (C, h, w)."""
    _check(mode, seed, batch_size, shape)
    seed, batch_size, shape = int(seed), int(batch_size), tuple(int(n) for n in shape)
    initial, next_step = _MODES[mode](seed, batch_size, shape)
    return NoiseSource(mode, initial, next_step)
