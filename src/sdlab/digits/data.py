"""scikit-learn's bundled handwritten digits (the UCI "Optical Recognition of Handwritten Digits" test
set: 1,797 images of 8x8 pixels, 0-16 ink), as the model's pixels in [-1, 1]."""

from __future__ import annotations

import torch

from ..errors import SdlabError

INK_MAX = 16.0  # the dataset's pixel values run from 0 (paper) to 16 (ink)


class MissingExtraError(SdlabError):
    """An optional dependency the command needs is not installed."""


def require_scikit_learn():
    """sklearn.datasets, or a one-line error saying how to install it."""
    try:
        import sklearn.datasets
    except ImportError:
        raise MissingExtraError("training and judging digits need scikit-learn: pip install 'sdlab[digits]' "
                                "(or pip install scikit-learn)") from None
    return sklearn.datasets


def real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images (1797, 1, 8, 8) in [-1, 1], labels (1797,) 0-9)."""
    data = require_scikit_learn().load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None]
    return to_model_pixels(images), torch.tensor(data.target, dtype=torch.long)


def to_model_pixels(ink: torch.Tensor) -> torch.Tensor:
    return ink / (INK_MAX / 2) - 1


def to_ink(pixels: torch.Tensor) -> torch.Tensor:
    """The model's pixels back on the dataset's 0-16 scale, as the classifier was trained on."""
    return ((pixels.clamp(-1, 1) + 1) * (INK_MAX / 2))
