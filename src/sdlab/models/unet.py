"""The noise predictor: a UNet of ResBlocks and spatial transformers (Rombach et al. 2022, sec. 3.3).

The module tree is the one of CompVis `ldm/modules/diffusionmodules/openaimodel.py`, so the keys
under `model.diffusion_model.` of an original SD checkpoint load with a prefix strip and
`load_state_dict(strict=True)`:

    time_embed.{0,2}                     sinusoidal timestep -> MLP (SiLU in slot 1)
    label_emb                            x4 upscaler: noise-level class embedding
    input_blocks.0.0                     conv_in
    input_blocks.N.0  ResBlock, .1 SpatialTransformer (levels with attention), or .0.op Downsample
    middle_block.{0,1,2}                 ResBlock, SpatialTransformer, ResBlock
    output_blocks.N.0 ResBlock, .1 SpatialTransformer, then .1.conv or .2.conv Upsample
    out.{0,2}                            GroupNorm, SiLU, conv_out

Identity modules sit in ldm's activation and dropout slots so indices like `out_layers.3` line up.
The model registers no buffers: a loader can build it on the meta device and load with assign=True.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import UNetConfig
from ..errors import ConfigError, InputError
from .attention import SpatialTransformer
from .conv import Conv2d


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) [cos(t * f_i), sin(t * f_i)], f_i = max_period^(-i / (dim/2)).

    The sinusoids of Vaswani et al. 2017 (sec. 3.5) with cosines first, as ldm orders them
    (diffusers: flip_sin_to_cos=True, freq_shift=0). Fractional timesteps are fine.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-5)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep embedding added in between (Ho et al. 2020, app. B)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(channels, groups), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # slot 2 is ldm's dropout (p = 0 for SD)
        self.out_layers = nn.Sequential(
            group_norm(out_channels, groups), nn.SiLU(), nn.Identity(), Conv2d(out_channels, out_channels, 3, padding=1)
        )
        # ldm starts every residual branch at zero so a fresh block is the identity
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # in-place adds into fresh convolution outputs (which autograd does not keep): ~10% faster on CPU
        h = self.in_layers(x)
        h += self.emb_layers(emb)[:, :, None, None]
        out = self.out_layers(h)
        out += self.skip_connection(x)
        return out


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: halves h and w."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x (or to `size`, the skip connection's, for odd latent sides), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def _check_config(config: UNetConfig) -> None:
    levels = len(config.channel_mult)
    if config.num_res_blocks < 1 or levels < 1:
        raise ConfigError("UNetConfig needs num_res_blocks >= 1 and at least one channel_mult entry")
    for level, mult in enumerate(config.channel_mult):
        width = config.model_channels * mult
        if width % config.norm_groups:
            raise ConfigError(f"UNet level {level} is {width} channels wide; GroupNorm({config.norm_groups}) "
                              f"needs a multiple of {config.norm_groups}")
        heads, head_dim = config.heads_at(width)
        if heads * head_dim != width:
            raise ConfigError(
                f"UNet level {level} ({width} channels) does not split into attention heads "
                f"(num_heads={config.num_heads}, head_channels={config.head_channels}); pick a divisor"
            )
    if any(not 0 <= level < levels for level in config.attention_levels):
        raise ConfigError(f"attention_levels {config.attention_levels} must lie in 0..{levels - 1}")
    if config.disable_self_attention and len(config.disable_self_attention) != levels:
        raise ConfigError(f"disable_self_attention needs one entry per level ({levels}), or none")


@dataclass
class DeepFeatures:
    """DeepCache's handle on one UNet call (Ma et al. 2023, "DeepCache", sec. 3.2): the features the
    deep part of the network hands to output block `-(depth + 1)`, the one that meets skip connection `depth`.

    With `features` None the call runs the whole UNet and leaves them here; set, the call runs only the
    shallow branch (input blocks 0..depth, output blocks from `-(depth + 1)` on) and uses them in place of
    everything deeper. Their neighbour steps' deep features change slowly, so reusing them costs little.
    """

    depth: int = 1  # skip connection where the cached branch joins; 1 is conv_in + the first block (sec. 4.1)
    features: Optional[torch.Tensor] = None


class UNetModel(nn.Module):
    """`unet(latents, timesteps, context) -> noise_pred` (or v), the shape of `latents`.

    `gradient_checkpointing = True` recomputes every ResBlock and SpatialTransformer in the backward
    pass while training (Chen et al. 2016), trading about a third more compute for activation memory.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        _check_config(config)
        self.config = config
        self.gradient_checkpointing = False
        mc = config.model_channels
        emb_channels = mc * 4
        groups = config.norm_groups
        self_attention_off = config.disable_self_attention or (False,) * len(config.channel_mult)

        def transformer(channels: int, disable_self_attention: bool = False) -> SpatialTransformer:
            heads, head_dim = config.heads_at(channels)
            return SpatialTransformer(channels, heads, head_dim, config.transformer_depth, config.context_dim,
                                      config.use_linear_projection, disable_self_attention, config.norm_groups)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        if config.num_classes is not None:
            self.label_emb = nn.Embedding(config.num_classes, emb_channels)

        self.input_blocks = nn.ModuleList([nn.ModuleList([Conv2d(config.in_channels, mc, 3, padding=1)])])
        skip_channels = [mc]
        ch = mc
        last = len(config.channel_mult) - 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers = [ResBlock(ch, emb_channels, mc * mult, groups)]
                ch = mc * mult
                if level in config.attention_levels:
                    layers.append(transformer(ch, self_attention_off[level]))
                self.input_blocks.append(nn.ModuleList(layers))
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(nn.ModuleList([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = nn.ModuleList(
            [ResBlock(ch, emb_channels, ch, groups), transformer(ch), ResBlock(ch, emb_channels, ch, groups)]
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_channels, mc * mult, groups)]
                ch = mc * mult
                if level in config.attention_levels:
                    layers.append(transformer(ch, self_attention_off[level]))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(nn.ModuleList(layers))

        self.out = nn.Sequential(group_norm(ch, groups), nn.SiLU(), Conv2d(mc, config.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def _run(self, layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
             upsample_size=None) -> torch.Tensor:
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = checkpoint(layer, h, emb, use_reentrant=False) if recompute else layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = checkpoint(layer, h, context, use_reentrant=False) if recompute else layer(h, context)
            elif isinstance(layer, Upsample):
                h = layer(h, upsample_size)
            else:
                h = layer(h)
        return h

    def forward(
        self,
        x: torch.Tensor,
        timesteps,
        context: Optional[torch.Tensor] = None,
        y: Optional[torch.Tensor] = None,
        concat: Optional[torch.Tensor] = None,
        crossattn: Optional[torch.Tensor] = None,
        deep_cache: Optional[DeepFeatures] = None,
    ) -> torch.Tensor:
        """x: (B, C, h, w) latents; timesteps: (B,) or one for all, int or fractional;
        context: (B, L, context_dim) text embeddings, L any length (77 per prompt chunk);
        y: (B,) class labels (the x4 upscaler's noise level); concat: (B, C', h, w) channels appended
        to x (inpainting's mask and masked-image latents, the upscaler's low-resolution image).
        `crossattn` is another name for `context`, the key of sgm-style conditioning dicts.
        `deep_cache`: DeepCache's features, read or written (DeepFeatures); None runs the exact network.
        Returns (B, out_channels, h, w).
        """
        config = self.config
        context = crossattn if context is None else context
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        if x.shape[1] != config.in_channels:
            raise InputError(
                f"the UNet takes {config.in_channels} input channels but got {x.shape[1]}; inpainting models "
                "need the mask and masked-image latents as `concat`, plain models none"
            )
        if context is None:
            raise InputError("the UNet needs text embeddings (context) of shape (B, L, context_dim)")
        if (y is None) != (config.num_classes is None):
            raise InputError(
                "class labels `y` are required by (and only by) a UNet with num_classes "
                f"(this one has num_classes={config.num_classes})"
            )

        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, config.model_channels).to(x.dtype))  # (B, 4 * mc)
        if y is not None:
            emb = emb + self.label_emb(y.long())
        context = context.to(x.dtype)

        # DeepCache: the shallow branch alone when deep features are at hand, else everything (keeping them)
        shallow = deep_cache is not None and deep_cache.features is not None
        joins = len(self.output_blocks) - 1 - deep_cache.depth if deep_cache is not None else None
        h = x
        skips = []
        for block in self.input_blocks[:deep_cache.depth + 1] if shallow else self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        if shallow:
            h = deep_cache.features
        else:
            h = self._run(self.middle_block, h, emb, context)
        for index, block in enumerate(self.output_blocks):
            if shallow and index < joins:
                continue
            if index == joins and not shallow:
                deep_cache.features = h
            h = torch.cat([h, skips.pop()], dim=1)
            # Latent sides that are not multiples of 2^levels (image sides that are multiples of 8 but
            # not of 64) halve with rounding up; upsampling then goes to the next skip's exact size,
            # as diffusers does with `upsample_size`.
            h = self._run(block, h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)
