"""Where each object of a shapes render is, read from its pixels: every object has its own flat palette
colour and the two colours of a scene differ, so the pixels along the line from the background colour
to an object's colour are that object (anti-aliased edges included). The grounding loss, the
recoloured inputs, the scene contrast's near misses and the inpainting trainer's object masks all start here.
"""

from __future__ import annotations

import torch

from .dataset import COLOURS

# an object pixel lies within this distance (0-255 RGB) of the background-to-colour line
COLOUR_TOLERANCE = 24.0


def colour_regions(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """For each palette colour, (B, H, W) in [0, 1]: how much of each pixel is an object of that colour.

    images: (B, 3, H, W) shapes renders in [-1, 1]. The background is the top-left pixel's colour (no
    object comes near the border); a pixel's share of colour c is its position along the line from the
    background to c, where it lies on that line.
    """
    regions = {}
    for name, (share, off_line) in colour_lines(images).items():
        regions[name] = share * (off_line <= COLOUR_TOLERANCE)
    return regions


def colour_lines(images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each palette colour, (B, H, W) each: every pixel's position along the line from the background
    (the top-left pixel) to the colour, clamped to [0, 1], and its distance from that line (0-255 RGB)."""
    pixels = (images.detach().float() + 1) * 127.5  # (B, 3, H, W)
    background = pixels[:, :, :1, :1]
    offset = pixels - background
    lines = {}
    for name, rgb in COLOURS.items():
        direction = torch.tensor(rgb, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1) - background
        share = (offset * direction).sum(1, keepdim=True) / direction.pow(2).sum(1, keepdim=True)
        share = share.clamp(0, 1)
        lines[name] = (share.squeeze(1), (offset - share * direction).norm(dim=1))
    return lines
