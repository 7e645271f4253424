"""`sdlab train inpaint` on the shapes data with `shapes.object_masks`: a fraction of the samples is
masked over one whole object instead of random boxes and strokes (Imagen Editor's object masking,
Wang et al. 2023), which random masks rarely do, so that drawing what the caption names in an empty
mask is trained as such. The objects are found by their palette colours (regions.py).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..training import inpaint
from ..training.config import TrainConfig
from .options import shapes_options
from .regions import colour_regions

OBJECT_MIN_PIXELS = 9  # fewer pixels of a palette colour are an edge's anti-aliasing, not an object


def object_mask(image: torch.Tensor, rng: np.random.Generator) -> Optional[torch.Tensor]:
    """(1, H, W) of 0 and 1: the bounding box of one object of a shapes render (image: (3, H, W) in
    [-1, 1]), chosen at random and grown by 1-4 px on every side; None when the picture holds no object.
    The objects of a scene have different palette colours, so each colour's pixels are one object."""
    objects = [region[0] > 0.5 for region in colour_regions(image[None].cpu()).values()]
    objects = [pixels for pixels in objects if int(pixels.sum()) >= OBJECT_MIN_PIXELS]
    if not objects:
        return None
    pixels = objects[int(rng.integers(len(objects)))]
    rows, columns = pixels.any(1).nonzero()[:, 0], pixels.any(0).nonzero()[:, 0]
    margin = int(rng.integers(1, 5))
    mask = torch.zeros(1, *pixels.shape)
    mask[:, max(int(rows.min()) - margin, 0):int(rows.max()) + margin + 1,
         max(int(columns.min()) - margin, 0):int(columns.max()) + margin + 1] = 1
    return mask


class ShapesInpaintTrainer(inpaint.InpaintTrainer):
    def sample_mask(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """An object's box for an `object_masks` fraction (when the picture has an object), else a random mask."""
        fraction = shapes_options(self.config).object_masks
        mask = object_mask(image, rng) if fraction and rng.random() < fraction else None
        return super().sample_mask(image, rng) if mask is None else mask


def build(config: TrainConfig, device: torch.device) -> ShapesInpaintTrainer:
    return inpaint.build(config, device, ShapesInpaintTrainer)
