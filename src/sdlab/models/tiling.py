"""Tiled VAE: encode and decode images whose full-resolution activations do not fit in memory at once.

Cutting an image into tiles and running the autoencoder on each leaves seams for two reasons:
convolutions near a tile's edge see zero padding instead of the neighbouring pixels, and every
GroupNorm normalises with statistics of its tile instead of the whole image. Blending overlapping
tiles with feathered weights hides the first and only softens the second. Here both are removed, so
the tiled result is the untiled one up to floating-point summation order:

1. Only the full-resolution levels run in tiles. The mid blocks, whose self-attention is global, and
   the 1x1 quant convs run on the whole latent, which has f^2 times fewer pixels than the image.
2. The levels run one after another. At each level every tile owns a core and copies, from the
   level's whole input, its core plus a margin as wide as the level's receptive field (one pixel per
   3x3 conv), so the core comes out exactly as the untiled level computes it. The cores are then put
   together as the next level's input. Margins stay a few pixels wide, where tiles that went through
   all levels at once would need the receptive field of the whole network (75 image pixels for SD's
   encoder) and hold that much more.
3. GroupNorm statistics come from the whole image: each tile runs as a generator up to its next
   GroupNorm, yields the mean and variance over its core, and resumes with the statistics pooled over
   all tiles (Chan, Golub & LeVeque 1979). This is the two-pass GroupNorm of the "multidiffusion"
   tiled VAE, done layer by layer.

Between GroupNorms each tile holds its activation (two inside a ResnetBlock), about two full-size
activations of the level in all, where the untiled network holds five or six at its widest level
(tests/test_tiling.py measures both). Tile sizes are in latent pixels (`tile=64` is 512 image pixels
for SD).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Generator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from ..errors import InputError
from .vae import AutoencoderKL, DiagonalGaussian

TILE = 64  # latent pixels per tile side (512 px for a factor-8 VAE)
AUTO_TILE_PIXELS = 1024 * 1024  # above one megapixel, SD's untiled fp32 decode needs several GiB


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

Stats = tuple[torch.Tensor, torch.Tensor]  # mean, var: (B, groups) float64
Report = tuple[int, torch.Tensor, torch.Tensor]  # pixel count, mean, var over one tile's core


def _group_norm(norm: nn.GroupNorm, x: torch.Tensor, core: tuple[slice, slice]) -> Generator[Report, Stats, torch.Tensor]:
    """`norm(x)` with statistics of the whole image: reports this tile's core, receives the pooled stats."""
    b, c, h, w = x.shape
    groups = x.view(b, norm.num_groups, c // norm.num_groups, h, w)
    core_values = groups[..., core[0], core[1]].float()
    var, mean = torch.var_mean(core_values, dim=(2, 3, 4), correction=0)
    count = core_values[0, 0].numel()
    del core_values
    mean, var = yield count, mean.double(), var.double()
    scale = torch.rsqrt(var + norm.eps).float()[..., None, None, None]
    # one new tile-sized tensor, the rest in place: per-tile temporaries add to every tile's state
    normed = (groups.float() - mean.float()[..., None, None, None]).mul_(scale).view(b, c, h, w)
    return normed.mul_(norm.weight[:, None, None]).add_(norm.bias[:, None, None]).to(x.dtype)


def _pool(reports: list[Report]) -> Stats:
    """Mean and variance of the union of the tiles' cores from each core's (count, mean, var)."""
    total = sum(count for count, _, _ in reports)
    mean = sum(count * m for count, m, _ in reports) / total
    var = sum(count * (v + (m - mean) ** 2) for count, m, v in reports) / total
    return mean, var


def run_synchronised(programs: list[Generator]) -> list:
    """Advance every tile to its next GroupNorm, pool their statistics, resume them; return their results.

    Every tile runs the same layers, so all reach each GroupNorm and the end together."""
    reports = [next(program) for program in programs]
    while True:
        stats = _pool(reports)
        reports, results = [], []
        for program in programs:
            try:
                reports.append(program.send(stats))
            except StopIteration as finished:
                results.append(finished.value)
        if results:
            if reports:
                raise RuntimeError("tiles disagree on the number of GroupNorms")
            return results


def _resnet_block(block: nn.Module, x: torch.Tensor, core: tuple[slice, slice]):
    """ResnetBlock.forward for one tile; the shortcut is taken early so the (wider) input can be freed."""
    h = yield from _group_norm(block.norm1, x, core)
    skip = block.nin_shortcut(x)
    del x
    h = block.conv1(F.silu(h, inplace=True))
    h = yield from _group_norm(block.norm2, h, core)
    return block.conv2(F.silu(h, inplace=True)).add_(skip)


def _blocks(blocks: nn.ModuleList, h: torch.Tensor, core: tuple[slice, slice]):
    """The ResnetBlocks of one level. `h = yield from f(h)` would keep the old `h` alive in this frame
    until f returns, so each generator is made first and the reference dropped: a tile then holds one
    activation (two inside a block) between GroupNorms, not one per nesting level."""
    for block in blocks:
        program = _resnet_block(block, h, core)
        del h
        h = yield from program
    return h


def _tile_input(source: torch.Tensor, extent: Box, size: tuple[int, int]) -> torch.Tensor:
    """A copy of `extent` out of `source` (a view would keep the whole stage's tensor alive)."""
    rows, cols = extent.inside(Box(0, size[0], 0, size[1]))
    return source[..., rows, cols].clone()


def _assemble(cores: list[Box], outputs: list[torch.Tensor], scale: int, size: tuple[int, int]) -> torch.Tensor:
    """The tiles' cores (latent boxes, outputs at `scale` pixels per latent pixel) as one tensor."""
    first = outputs[0]
    whole = first.new_empty(*first.shape[:2], size[0] * scale, size[1] * scale)
    for core, output in zip(cores, outputs):
        box = core.scaled(scale)
        whole[..., box.top:box.bottom, box.left:box.right] = output
    return whole


def _decode_tile(decoder: nn.Module, i: int, source: torch.Tensor, core: Box, size: tuple[int, int]):
    """Up level i of the decoder for one tile: the level above's upsampler, level i's ResnetBlocks, and
    at level 0 norm_out and conv_out. `source` is the whole input of the stage (the mid block's output,
    or level i+1's before its upsampler); returns the tile's core at level i's resolution."""
    levels = len(decoder.up)
    scale = 2 ** (levels - 1 - i)  # level-i pixels per latent pixel
    upsample = i < levels - 1
    convs = 2 * len(decoder.up[i].block) + upsample + (i == 0)  # 3x3 convs from the tile's input to its output
    in_scale = scale // 2 if upsample else scale
    extent = core.scaled(in_scale).grown(-(-convs // 2) if upsample else convs, size[0] * in_scale, size[1] * in_scale)
    x = _tile_input(source, extent, (size[0] * in_scale, size[1] * in_scale))
    del source
    if upsample:
        x, extent = decoder.up[i + 1].upsample(x), extent.scaled(2)
    here = core.scaled(scale).inside(extent)
    program = _blocks(decoder.up[i].block, x, here)
    del x  # see _blocks
    h = yield from program
    if i == 0:
        h = yield from _group_norm(decoder.norm_out, h, here)
        h = decoder.conv_out(F.silu(h, inplace=True))
    return h[..., here[0], here[1]].clone()


def _encode_tile(encoder: nn.Module, i: int, source: torch.Tensor, core: Box, size: tuple[int, int]):
    """Down level i of the encoder for one tile: conv_in at level 0, the ResnetBlocks, the downsampler.
    `source` is the stage's whole input (the image, or level i-1's output); returns the tile's core
    at the resolution of level i+1 (the latent's after the last level)."""
    levels = len(encoder.down)
    scale = 2 ** (levels - 1 - i)
    downsample = i < levels - 1
    margin = 2 * len(encoder.down[i].block) + (i == 0) + downsample  # the downsampler reads one row more
    margin += margin % 2 if downsample else 0  # tiles stay on the stride-2 grid
    extent = core.scaled(scale).grown(margin, size[0] * scale, size[1] * scale)
    x = _tile_input(source, extent, (size[0] * scale, size[1] * scale))
    del source
    if i == 0:
        x = encoder.conv_in(x)
    program = _blocks(encoder.down[i].block, x, core.scaled(scale).inside(extent))
    del x  # see _blocks
    h = yield from program
    if downsample:
        h, extent, scale = encoder.down[i].downsample(h), extent.scaled(1, 2), scale // 2
    rows, cols = core.scaled(scale).inside(extent)
    return h[..., rows, cols].clone()


def _check_tile(tile: int) -> None:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise InputError(f"tile must be a positive number of latent pixels, got {tile!r}")


@torch.no_grad()
def decode_tiled(vae: AutoencoderKL, latents: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """`vae.decode(latents)`, the full-resolution levels run in tiles of `tile` latent pixels a side.

    latents: unscaled (B, z, h, w); returns images (B, 3, h * f, w * f), the untiled decode's values.
    """
    _check_tile(tile)
    decoder = vae.decoder
    h = decoder.mid(decoder.conv_in(vae.post_quant_conv(latents)))
    size = tuple(h.shape[-2:])
    cores = tile_grid(*size, tile)
    for i in reversed(range(len(decoder.up))):
        programs = [_decode_tile(decoder, i, h, core, size) for core in cores]
        del h  # each tile copies its part when it starts; then the stage's input is freed
        h = _assemble(cores, run_synchronised(programs), 2 ** (len(decoder.up) - 1 - i), size)
    return h


@torch.no_grad()
def encode_tiled(vae: AutoencoderKL, images: torch.Tensor, tile: int = TILE) -> DiagonalGaussian:
    """`vae.encode(images)`, the full-resolution levels run in tiles of `tile` latent pixels
    (tile * f image pixels) a side. images: (B, 3, H, W) in [-1, 1], H and W multiples of f."""
    _check_tile(tile)
    encoder, f = vae.encoder, vae.config.downsample_factor
    height, width = images.shape[-2:]
    if height % f or width % f:
        raise InputError(f"tiled encoding needs image sides that are multiples of {f}, got {width}x{height}")
    size = (height // f, width // f)
    cores = tile_grid(*size, tile)
    h = images
    for i in range(len(encoder.down)):
        programs = [_encode_tile(encoder, i, h, core, size) for core in cores]
        del h
        h = _assemble(cores, run_synchronised(programs), 2 ** max(0, len(encoder.down) - 2 - i), size)
    h = encoder.mid(h)
    return DiagonalGaussian(vae.quant_conv(encoder.conv_out(F.silu(encoder.norm_out(h)))))


# -- when to tile ------------------------------------------------------------------------------------


def untiled_peak_bytes(config: VAEConfig, height: int, width: int, batch_size: int = 1,
                       dtype: torch.dtype = torch.float32) -> int:
    """About what an untiled decode of a (height, width) image holds at its peak: six activations of
    its widest full-resolution layer (input, normalised, activated and convolved copies around the
    first block after the last upsampler), the measured peak of ResnetBlock chains (tests/test_tiling.py)."""
    widest = max(config.ch * m * (height >> i) * (width >> i) for i, m in enumerate(config.ch_mult))
    return 6 * batch_size * widest * torch.empty((), dtype=dtype).element_size()


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes free for new tensors on `device`: CUDA's free memory, Linux's MemAvailable; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def wants_tiles(config: VAEConfig, height: int, width: int, batch_size: int, dtype: torch.dtype,
                device: torch.device, tiled: Optional[bool]) -> bool:
    """Whether a (height, width) image should go through the VAE in tiles.

    `tiled` True or False decides; None tiles above AUTO_TILE_PIXELS or when an untiled pass would
    not fit in the free memory. Raises InputError when tiling is refused and the image cannot fit.
    """
    needed = untiled_peak_bytes(config, height, width, batch_size, dtype)
    free = available_memory(device)
    too_big = free is not None and needed > free
    if tiled is None:
        return too_big or height * width > AUTO_TILE_PIXELS
    if not tiled and too_big:
        raise InputError(
            f"the VAE would need about {needed / 2**30:.1f} GiB for {width}x{height} images but "
            f"{free / 2**30:.1f} GiB is free: use the tiled VAE (tiled_vae=True, --tiled-vae) or a smaller size"
        )
    return bool(tiled)


class TiledVAE(nn.Module):
    """`vae` with `encode`/`decode` in tiles, always (`tiled=True`), never (False) or for large images (None).

    A drop-in for the pipeline's VAE: `dataclasses.replace(pipe, vae=TiledVAE(pipe.vae))` makes
    common.decode_latents and encode_images tile without changing them.
    """

    def __init__(self, vae: AutoencoderKL, tiled: Optional[bool] = None, tile: int = TILE):
        super().__init__()
        self.vae, self.tiled, self.tile = vae, tiled, tile

    @property
    def config(self) -> VAEConfig:
        return self.vae.config

    def _tiles(self, x: torch.Tensor, height: int, width: int) -> bool:
        return wants_tiles(self.config, height, width, x.shape[0], x.dtype, x.device, self.tiled)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        f = self.config.downsample_factor
        if self._tiles(latents, latents.shape[-2] * f, latents.shape[-1] * f):
            return decode_tiled(self.vae, latents, self.tile)
        return self.vae.decode(latents)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        if self._tiles(images, *images.shape[-2:]):
            return encode_tiled(self.vae, images, self.tile)
        return self.vae.encode(images)
