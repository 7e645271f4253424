"""A compact image tower for contrastive text-encoder training: a small residual CNN whose last
feature map is flattened into CLIP's joint embedding space.

CLIP's image towers (ResNet-50 with attention pooling, or a ViT; Radford et al. 2021, section 2.4)
are far larger than a text tower for 64-pixel scenes needs. Flattening instead of average pooling
keeps *where* things are, which the shapes captions ("on the left", "above") talk about.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class DownBlock(nn.Module):
    """A stride-2 convolution, then a pre-activation residual block (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.down = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.block = nn.Sequential(
            _norm(out_channels), nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1),
            _norm(out_channels), nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return x + self.block(x)


class ImageTower(nn.Module):
    """images (B, 3, size, size) in [-1, 1] -> (B, projection_dim) image features (not normalised)."""

    def __init__(self, size: int, projection_dim: int, channels: int = 32, stages: int = 4):
        super().__init__()
        if size % 2**stages:
            raise ConfigError(f"the image tower halves the image {stages} times (text.image_stages): the training "
                              f"resolution {size} must be a multiple of {2 ** stages}")
        widths = [channels * min(2**i, 8) for i in range(stages + 1)]
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.stages = nn.Sequential(*[DownBlock(widths[i], widths[i + 1]) for i in range(stages)])
        side = size // 2**stages
        self.norm = nn.LayerNorm(widths[-1] * side * side)
        self.projection = nn.Linear(widths[-1] * side * side, projection_dim, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(images)).flatten(1)  # (B, C * side * side)
        return self.projection(self.norm(features))
