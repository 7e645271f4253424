"""Tiled VAE: encode and decode images whose full-resolution activations do not fit in memory at once.

Cutting an image into tiles and running the autoencoder on each leaves seams for two reasons:
convolutions near a tile's edge see zero padding instead of the neighbouring pixels, and every
GroupNorm normalises with statistics of its tile instead of the whole image. Blending overlapping
tiles with feathered weights hides the first and only softens the second. Here both are removed, so
the tiled result is the untiled one up to floating-point summation order:

1. The VAE's modules run in the order and lists of `Encoder.stages()` / `Decoder.stages()`. A list
   with attention (the mid block's, which is global) runs on the whole latent, which has f^2 times
   fewer pixels than the image; every other list runs in tiles.
2. For each list every tile owns a core and copies, from the list's whole input, its core plus a
   margin as wide as the list's receptive field (one pixel per 3x3 conv), so the core comes out
   exactly as the untiled modules compute it. The cores are then put together as the next list's
   input. Lists end where the activation is smallest (at the low-resolution side of each resampler),
   so margins stay a few pixels wide and what is put together is small.
3. Within a list, the tiles go through one module at a time, each module's own forward. GroupNorm
   statistics come from the whole image: `vae.norm_statistics` lets a module's GroupNorms be given
   their mean and variance. A module with n GroupNorms runs n + 1 times over the tiles: run k stops
   at the k-th GroupNorm, whose statistics, pooled over all tiles' cores (Chan, Golub & LeVeque
   1979), the later runs are given; the last run gives the output. For a ResnetBlock the stopped runs
   cost half a block (the first stops before any work). This is the two-pass GroupNorm of the
   "multidiffusion" tiled VAE, done module by module.

Between modules each tile holds one activation, about one full-size activation of the list in all,
where the untiled network holds five or six at its widest level (tests/test_tiling.py measures both).
Tile sizes are in latent pixels (`tile=64` is 512 image pixels for SD). When to tile is decided with
the device's free memory in `devices.wants_tiled_vae`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import torch
from torch import nn

from ..config import VAEConfig
from ..devices import VAE_TILE, wants_tiled_vae
from ..errors import InputError
from .vae import (
    AttnBlock, AutoencoderKL, DiagonalGaussian, Downsample, GroupNorm, Statistics, Upsample, norm_statistics,
)

TILE = VAE_TILE  # latent pixels per tile side (512 px for a factor-8 VAE)


@dataclass(frozen=True)
class Box:
    """Rows [top, bottom) and columns [left, right) of an image, at some resolution."""

    top: int
    bottom: int
    left: int
    right: int

    def scaled(self, num: int, den: int = 1) -> "Box":
        return Box(self.top * num // den, self.bottom * num // den, self.left * num // den, self.right * num // den)

    def grown(self, margin: int, height: int, width: int) -> "Box":
        """This box with `margin` more pixels on each side, clipped to a (height, width) image."""
        return Box(max(0, self.top - margin), min(height, self.bottom + margin),
                   max(0, self.left - margin), min(width, self.right + margin))

    def inside(self, outer: "Box") -> tuple[slice, slice]:
        """Slices that cut this box out of a tensor covering `outer`."""
        return slice(self.top - outer.top, self.bottom - outer.top), slice(self.left - outer.left, self.right - outer.left)


def tile_grid(height: int, width: int, tile: int) -> list[Box]:
    """Cores of at most `tile` pixels a side covering a (height, width) image, as equal as possible."""
    def cuts(length: int) -> list[int]:
        n = math.ceil(length / tile)
        return [round(k * length / n) for k in range(n + 1)]

    rows, cols = cuts(height), cuts(width)
    return [Box(t, b, l, r) for t, b in zip(rows, rows[1:]) for l, r in zip(cols, cols[1:])]


# -- whole-image GroupNorm across tiles ----------------------------------------------------------------

Report = tuple[int, torch.Tensor, torch.Tensor]  # pixel count, mean, var over one tile's core


def _pool(reports: list[Report]) -> Statistics:
    """Mean and variance of the union of the tiles' cores from each core's (count, mean, var), in float64."""
    total = sum(count for count, _, _ in reports)
    mean = sum(count * m for count, m, _ in reports) / total
    var = sum(count * (v + (m - mean) ** 2) for count, m, v in reports) / total
    return mean, var


class _StatisticsWanted(Exception):
    """Stops a module's forward at the first GroupNorm whose whole-image statistics are not known yet."""


@dataclass
class _Tile:
    core: Box  # the latent pixels this tile owns
    extent: Box  # what x covers, at `scale` pixels per latent pixel
    scale: int
    x: torch.Tensor  # (B, C, extent height, extent width)


def _run_module(module: nn.Module, tiles: list[_Tile]) -> None:
    """`tile.x = module(tile.x)` for every tile, its GroupNorms normalising with the whole image's
    statistics: one run over the tiles per GroupNorm learns its statistics, a last run gives the output."""
    known: dict[GroupNorm, Statistics] = {}
    while True:
        reports: list[Report] = []
        wanted: Optional[GroupNorm] = None
        for tile in tiles:
            rows, cols = tile.core.scaled(tile.scale).inside(tile.extent)

            def statistics(norm: GroupNorm, x: torch.Tensor) -> Statistics:
                if norm in known:
                    return known[norm]
                mean, var = norm.moments(x[..., rows, cols])
                reports.append(((rows.stop - rows.start) * (cols.stop - cols.start), mean.double(), var.double()))
                raise _StatisticsWanted(norm)

            try:
                with norm_statistics(module, statistics):
                    out = module(tile.x)
            except _StatisticsWanted as stop:
                wanted = stop.args[0]
                continue
            ratio = Fraction(out.shape[-2], tile.x.shape[-2])  # 2 after an upsampler, 1/2 after a downsampler
            tile.extent = tile.extent.scaled(ratio.numerator, ratio.denominator)
            tile.scale = tile.scale * ratio.numerator // ratio.denominator
            tile.x = out  # the tile's input is freed here
            del out
        if wanted is None:
            return
        if len(reports) != len(tiles):
            raise RuntimeError("tiles disagree on the number of GroupNorms")
        known[wanted] = _pool(reports)


def _margin(stage: list[nn.Module]) -> int:
    """Pixels of context each tile needs on every side, at the stage's input resolution: one per 3x3
    conv (its kernel radius), counted at the resolution the convs run at."""
    convs = [m for module in stage for m in module.modules() if isinstance(m, nn.Conv2d)]
    reach = sum(conv.kernel_size[0] // 2 for conv in convs)
    if any(isinstance(module, Upsample) for module in stage):
        return -(-reach // 2)  # the convs run at twice the input's resolution
    if any(isinstance(module, Downsample) for module in stage):
        return reach + reach % 2  # tiles stay on the stride-2 grid
    return reach


def _is_global(stage: list[nn.Module]) -> bool:
    """Whether the stage has attention, whose every output pixel depends on the whole input."""
    return any(isinstance(m, AttnBlock) for module in stage for m in module.modules())


def _cut(whole: torch.Tensor, cores: list[Box], size: tuple[int, int], margin: int) -> list[_Tile]:
    """Tiles of `whole` (at some multiple of the latent `size`): each core plus `margin`, copied (a
    view would keep the whole tensor alive)."""
    height, width = whole.shape[-2:]
    scale = height // size[0]
    tiles = []
    for core in cores:
        extent = core.scaled(scale).grown(margin, height, width)
        rows, cols = extent.inside(Box(0, height, 0, width))
        tiles.append(_Tile(core, extent, scale, whole[..., rows, cols].clone()))
    return tiles


def _assemble(tiles: list[_Tile], size: tuple[int, int]) -> torch.Tensor:
    """The tiles' cores as one tensor."""
    first = tiles[0]
    whole = first.x.new_empty(*first.x.shape[:2], size[0] * first.scale, size[1] * first.scale)
    for tile in tiles:
        box = tile.core.scaled(tile.scale)
        rows, cols = box.inside(tile.extent)
        whole[..., box.top:box.bottom, box.left:box.right] = tile.x[..., rows, cols]
    return whole


def _run_stages(stages: list[list[nn.Module]], x: torch.Tensor, size: tuple[int, int], tile: int) -> torch.Tensor:
    """The stages in order: those with attention on the whole tensor, the others in tiles of `tile`
    latent pixels. x is at some multiple of the latent `size`."""
    cores = tile_grid(*size, tile)
    h = x
    del x
    for stage in stages:
        if _is_global(stage):
            for module in stage:
                h = module(h)
            continue
        tiles = _cut(h, cores, size, _margin(stage))
        del h  # each tile has its copy
        for module in stage:
            _run_module(module, tiles)
        h = _assemble(tiles, size)
        del tiles
    return h


def _check_tile(tile: int) -> None:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise InputError(f"tile must be a positive number of latent pixels, got {tile!r}")


@torch.no_grad()
def decode_tiled(vae: AutoencoderKL, latents: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """`vae.decode(latents)`, the full-resolution levels run in tiles of `tile` latent pixels a side.

    latents: unscaled (B, z, h, w); returns images (B, 3, h * f, w * f), the untiled decode's values.
    """
    _check_tile(tile)
    return _run_stages(vae.decoder.stages(), vae.post_quant_conv(latents), tuple(latents.shape[-2:]), tile)


@torch.no_grad()
def encode_tiled(vae: AutoencoderKL, images: torch.Tensor, tile: int = TILE) -> DiagonalGaussian:
    """`vae.encode(images)`, the full-resolution levels run in tiles of `tile` latent pixels
    (tile * f image pixels) a side. images: (B, 3, H, W) in [-1, 1], H and W multiples of f."""
    _check_tile(tile)
    f = vae.config.downsample_factor
    height, width = images.shape[-2:]
    if height % f or width % f:
        raise InputError(f"tiled encoding needs image sides that are multiples of {f}, got {width}x{height}")
    moments = _run_stages(vae.encoder.stages(), images, (height // f, width // f), tile)
    return DiagonalGaussian(vae.quant_conv(moments))


class TiledVAE(nn.Module):
    """`vae` with `encode`/`decode` in tiles, always (`tiled=True`), never (False) or when
    `devices.wants_tiled_vae` says so (None: large images, or too little free memory).

    A drop-in for the pipeline's VAE: `dataclasses.replace(pipe, vae=TiledVAE(pipe.vae))` makes
    latents.decode_latents and encode_images tile without changing them.
    """

    def __init__(self, vae: AutoencoderKL, tiled: Optional[bool] = None, tile: int = TILE):
        super().__init__()
        self.vae, self.tiled, self.tile = vae, tiled, tile

    @property
    def config(self) -> VAEConfig:
        return self.vae.config

    def _tiles(self, x: torch.Tensor, height: int, width: int) -> bool:
        return wants_tiled_vae(self.config, height, width, x.shape[0], x.dtype, x.device, self.tiled)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        f = self.config.downsample_factor
        if self._tiles(latents, latents.shape[-2] * f, latents.shape[-1] * f):
            return decode_tiled(self.vae, latents, self.tile)
        return self.vae.decode(latents)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        if self._tiles(images, *images.shape[-2:]):
            return encode_tiled(self.vae, images, self.tile)
        return self.vae.encode(images)
