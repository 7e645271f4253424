"""The KL autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", section 3 and appendix G).

The encoder maps an image in [-1, 1] to a diagonal Gaussian over latents 2 ** (levels - 1) times
smaller; the decoder maps latents back to pixels. Attribute names are the CompVis `ldm` ones
(`ldm/modules/diffusionmodules/model.py`), so the `first_stage_model.` part of a single-file SD
checkpoint loads with a prefix strip and `load_state_dict(strict=True)`.

Both directions work on *unscaled* latents; the pipeline multiplies by `config.scaling_factor`
(0.18215 for SD) to give the UNet unit-variance inputs.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import VAEConfig
from ..errors import ConfigError

# ldm: every norm in the autoencoder is GroupNorm(32 groups, eps 1e-6, affine); VAEConfig.norm_groups
# lets a narrow autoencoder keep several channels per group (with one, GroupNorm is InstanceNorm and
# every layer forgets each channel's image-wide level: the colour of a flat background).
EPS = 1e-6
# ldm's DiagonalGaussianDistribution clamps log-variances to keep exp() finite.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


Statistics = tuple[torch.Tensor, torch.Tensor]  # mean, var per sample and group: (B, groups) each


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose mean and variance can be given from outside.

    With `statistics` unset (always, outside `norm_statistics`) it is nn.GroupNorm, bit for bit. The
    tiled VAE sets it so that every tile is normalised with the statistics of the whole image.
    """

    statistics: Optional[Callable[["GroupNorm", torch.Tensor], Statistics]] = None

    def moments(self, x: torch.Tensor) -> Statistics:
        """Mean and (biased) variance of each sample's groups in x (B, C, h, w), in float32."""
        groups = x.unflatten(1, (self.num_groups, -1)).float()  # a view, also of a tile's core
        var, mean = torch.var_mean(groups, dim=(2, 3, 4), correction=0)
        return mean, var

    def normalise(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """x normalised with the given per-group statistics (B, groups), then scaled and shifted."""
        b, c = x.shape[:2]
        scale = torch.rsqrt(var.float() + self.eps)[:, :, None]
        # one new tensor, the rest in place: the tiled VAE runs this on every tile
        normed = (x.reshape(b, self.num_groups, -1).float() - mean.float()[:, :, None]).mul_(scale).view(x.shape)
        return normed.mul_(self.weight.view(1, c, 1, 1)).add_(self.bias.view(1, c, 1, 1)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.statistics is None:
            return super().forward(x)
        return self.normalise(x, *self.statistics(self, x))


@contextlib.contextmanager
def norm_statistics(module: nn.Module, source: Callable[[GroupNorm, torch.Tensor], Statistics]) -> Iterator[None]:
    """Inside the block, every GroupNorm in `module` normalises x with `source(norm, x)` -> (mean, var)."""
    norms = [m for m in module.modules() if isinstance(m, GroupNorm)]
    for norm in norms:
        norm.statistics = source
    try:
        yield
    finally:
        for norm in norms:
            del norm.statistics  # back to the class's None


def group_norm(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(groups, channels, eps=EPS, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice plus a skip; a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # Identity has no parameters, so it adds no checkpoint keys.
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # ldm's dropout here is 0.0 for SD
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, projections as 1x1 convs (ldm layout)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W, C), copied so the channels are contiguous: with strided channels
        # torch's CPU kernel falls back to the math path, which holds the whole (H*W)^2 attention matrix
        # (17 GB for SD's 2048 px decode), while the fused kernel holds a few blocks of it
        q, k, v = (proj(normed).reshape(b, 1, c, h * w).transpose(2, 3).contiguous()
                   for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ldm pads only right and bottom before the stride-2 conv, so H -> H // 2 exactly.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _run(module: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """Apply `module`, recomputing its activations in backward when checkpointing (saves memory)."""
    if use_checkpoint:
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


def _res_blocks(in_channels: int, out_channels: int, count: int, groups: int) -> nn.ModuleList:
    widths = [in_channels] + [out_channels] * count
    return nn.ModuleList(ResnetBlock(widths[j], widths[j + 1], groups) for j in range(count))


class DownLevel(nn.Module):
    """`encoder.down.I`: ResBlocks at one resolution, then a stride-2 conv (not after the last)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool, groups: int):
        super().__init__()
        self.block = _res_blocks(in_channels, out_channels, num_blocks, groups)
        self.downsample = Downsample(out_channels) if downsample else nn.Identity()

    def forward(self, h: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
        for block in self.block:
            h = _run(block, h, use_checkpoint)
        return self.downsample(h)


class UpLevel(nn.Module):
    """`decoder.up.I`: ResBlocks at one resolution, then 2x upsampling (not after level 0)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool, groups: int):
        super().__init__()
        self.block = _res_blocks(in_channels, out_channels, num_blocks, groups)
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, h: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
        for block in self.block:
            h = _run(block, h, use_checkpoint)
        return self.upsample(h)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def layers(self) -> list[nn.Module]:
        return [self.block_1, self.attn_1, self.block_2]

    def forward(self, h: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
        for module in self.layers():
            h = _run(module, h, use_checkpoint)
        return h


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, 2 * z_channels, H / f, W / f): means and log-variances (double_z)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, mult, levels = config.ch, config.ch_mult, len(config.ch_mult)
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(mult)
        self.down = nn.ModuleList(
            DownLevel(ch * in_mult[i], ch * mult[i], config.num_res_blocks, i != levels - 1, config.norm_groups)
            for i in range(levels)
        )
        width = ch * mult[-1]
        self.mid = MidBlock(width, config.norm_groups)
        self.norm_out = group_norm(width, config.norm_groups)
        self.conv_out = nn.Conv2d(width, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h, use_checkpoint)
        h = self.mid(h, use_checkpoint)
        return self.conv_out(F.silu(self.norm_out(h)))

    def stages(self) -> list[list[nn.Module]]:
        """The modules forward runs, in its order, in lists cut after each downsampler, where the
        activation is smallest: conv_in and level 0, level 1, ..., then the mid block (its attention
        sees the whole latent) and the output layers. The tiled VAE runs the lists one after another."""
        stages = [list(level.block) + ([level.downsample] if isinstance(level.downsample, Downsample) else [])
                  for level in self.down]
        stages[0].insert(0, self.conv_in)
        return stages + [[*self.mid.layers(), self.norm_out, nn.SiLU(), self.conv_out]]


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h * f, w * f).

    `up` keeps ldm's index order: `up.I` works at the resolution of `down.I`, so the deepest level
    `up.{levels-1}` is applied first. Each up level has one ResBlock more than its down level.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, mult, levels = config.ch, config.ch_mult, len(config.ch_mult)
        width = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, width, 3, padding=1)
        self.mid = MidBlock(width, config.norm_groups)
        in_widths = [ch * mult[i + 1] if i < levels - 1 else width for i in range(levels)]
        self.up = nn.ModuleList(
            UpLevel(in_widths[i], ch * mult[i], config.num_res_blocks + 1, i != 0, config.norm_groups)
            for i in range(levels)
        )
        self.norm_out = group_norm(ch * mult[0], config.norm_groups)
        self.conv_out = nn.Conv2d(ch * mult[0], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid(h, use_checkpoint)
        for level in reversed(self.up):
            h = level(h, use_checkpoint)
        return self.conv_out(F.silu(self.norm_out(h)))

    def stages(self) -> list[list[nn.Module]]:
        """The modules forward runs, in its order, in lists cut before each upsampler, where the
        activation is smallest: conv_in and the mid block (its attention sees the whole latent), then
        the deepest level's blocks, each upsampler with the blocks of the level it feeds, and the
        output layers after level 0. The tiled VAE runs the lists one after another."""
        stages, upsampler = [[self.conv_in, *self.mid.layers()]], []
        for level in reversed(self.up):
            stages.append(upsampler + list(level.block))
            upsampler = [level.upsample] if isinstance(level.upsample, Upsample) else []
        stages[-1] += [self.norm_out, nn.SiLU(), self.conv_out]
        return stages


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, diag(exp(logvar))), per latent element."""

    def __init__(self, moments: torch.Tensor):
        mean, logvar = moments.chunk(2, dim=1)
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps; eps is drawn on the generator's device, then moved to the latents'."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over each latent: (B,)."""
        return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    """Keys as under `first_stage_model.`: encoder.*, decoder.*, quant_conv.*, post_quant_conv.*."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        for width in sorted({config.ch * m for m in config.ch_mult}):
            if width % config.norm_groups:
                raise ConfigError(f"VAE width {width} is not a multiple of norm_groups {config.norm_groups}")
        self.config = config
        self.gradient_checkpointing = False  # recompute ResBlocks/attention in backward (training)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # ldm's embed_dim equals z_channels in every SD autoencoder.
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    def _checkpointing(self) -> bool:
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images (B, 3, H, W) in [-1, 1] -> posterior over unscaled latents (B, z, H / f, W / f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(images, self._checkpointing())))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, z, h, w) -> images (B, 3, h * f, w * f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents), self._checkpointing())

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction through a posterior sample (the autoencoder's training forward pass)."""
        return self.decode(self.encode(images).sample(generator))
