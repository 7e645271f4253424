"""`sdlab train text` on the shapes data with `shapes.hard_negatives`: NegCLIP's hard negatives
(Yuksekgonul et al. 2023, section 4), each caption that states a relation bringing its mirror
("above" -> "below", the same words otherwise: `dataset.mirrored_caption`) as a caption no image matches.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..training import text
from ..training.config import TrainConfig
from .dataset import mirrored_caption
from .options import shapes_options


class ShapesTextTrainer(text.TextTrainer):
    def hard_negatives(self, captions: list[str]) -> Optional[list[Optional[str]]]:
        if not shapes_options(self.config).hard_negatives:
            return None
        return [mirrored_caption(caption) for caption in captions]


def build(config: TrainConfig, device: torch.device) -> ShapesTextTrainer:
    return text.build(config, device, ShapesTextTrainer)
