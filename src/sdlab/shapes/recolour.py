"""Recoloured inputs: two-object scenes noised from the picture with the objects' colours exchanged.

The bundled model's prediction for "a blue square above a yellow triangle" is the same as for "...
below ...", at every noise level (MODEL_CARD.md): it takes the two objects' places and colours from
the noisy latents and never learnt which object the caption puts where. With this augmentation a
fraction of two-object samples is noised from the same scene with the two colours exchanged, while the
target stays the true picture, so the noisy input shows where the objects are and only the caption
says which colour each one has.

On the shapes data the exchange is done on pixels: each object has its own flat palette colour, and
`regions.colour_lines` places every pixel on the line from the background to each palette colour
(anti-aliased edges included).
"""

from __future__ import annotations

import torch

from .dataset import COLOURS
from .regions import COLOUR_TOLERANCE, colour_lines

# a colour is an object of the picture when it covers at least this share of the canvas: half the
# smallest shape (a triangle of side 0.19: 0.018). Anti-aliased edges of one colour can lie near the
# line from the background to another (yellow's to orange's on white): they stay far below it.
MIN_SHARE = 0.009


def swap_object_colours(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`images` (B, 3, H, W) shapes renders in [-1, 1] with the colours of their two objects exchanged,
    and a (B,) bool: which pictures have exactly two object colours (the others come back unchanged)."""
    lines = colour_lines(images)
    shares = torch.stack([share for share, _ in lines.values()], dim=1)  # (B, C, H, W)
    distances = torch.stack([distance for _, distance in lines.values()], dim=1)
    regions = shares * (distances <= COLOUR_TOLERANCE)
    present = regions.sum(dim=(2, 3)) >= MIN_SHARE * images.shape[-2] * images.shape[-1]  # (B, C)
    swappable = present.sum(1) == 2
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32, device=images.device) / 127.5 - 1
    swapped = images.detach().float().clone()
    for b in torch.nonzero(swappable).flatten().tolist():
        first, second = torch.nonzero(present[b]).flatten().tolist()
        # objects never touch, so each pixel is one object's: the colour whose line from the background
        # passes nearer (near the background two lines can come close, as yellow's and orange's on white)
        nearer_first = distances[b, first] <= distances[b, second]
        amount = torch.where(nearer_first, regions[b, first], -regions[b, second])
        change = palette[second] - palette[first]  # what object `first` gains, object `second` loses
        swapped[b] += change.view(3, 1, 1) * amount
    return swapped.clamp(-1, 1).to(images.dtype), swappable
