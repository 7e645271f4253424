"""The patch discriminator of the VAE's adversarial loss: PatchGAN (Isola et al. 2017, "Image-to-Image
Translation with Conditional Adversarial Networks", section 3.2.2), as latent diffusion's autoencoders
use it (taming-transformers' NLayerDiscriminator).

Each output logit judges one receptive-field patch (70 x 70 px with 3 strided layers) as real or
reconstructed, so the loss pushes for sharp local texture where L1 alone gives blur. The original
normalises with BatchNorm; here it is GroupNorm, which does not mix samples, so each sample's logits
do not depend on how a batch is split over processes.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1  # the last feature layer keeps the resolution
            blocks += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False), _norm(out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*blocks)
        # DCGAN's initialisation (Radford et al. 2016), kept by pix2pix and taming
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> patch logits (B, 1, h, w)."""
        return self.main(images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The critic's hinge loss (Lim & Ye 2017; Miyato et al. 2018): real above +1, fake below -1."""
    return 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())
