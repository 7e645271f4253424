"""Seamless tiling: images whose right edge continues into the left and bottom into the top (textures).

A convolution with zero padding sees a border of zeros at the image's edges, so the UNet and the VAE
draw the edges as edges. With circular padding the row past the bottom is the top row and the column
past the right is the left one: every layer then works on a torus, the networks are equivariant to
circular shifts of their input (by multiples of the UNet's total downsampling), and what they draw
has no edge anywhere. This is the web UI's "Tiling" option, which sets `padding_mode = "circular"`
on every Conv2d of the model while it generates.

Two differences from setting `padding_mode`:
- one axis can wrap while the other keeps its padding (`axes="x"` for a horizontal strip), so each
  padded conv's `_conv_forward` is replaced, for the duration, by one that pads each axis itself;
- the VAE encoder's Downsample pads by hand, one zero row and column at the bottom and right, before
  a conv without padding (ldm's layout, models/vae.py). Its conv gets that padding replaced by the
  input's first row and column, which is what circular padding puts there, so encoding wraps too.

Only instance attributes change: no parameters, buffers or submodules are added, so state_dict keys
stay those of the checkpoint, and leaving the context restores every conv, also after an exception.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .vae import Downsample as VAEDownsample

AXES = ("xy", "x", "y")  # x: left and right edges meet; y: top and bottom


def _padding_mode(conv: nn.Conv2d, wraps: bool) -> str:
    if wraps:
        return "circular"
    return "constant" if conv.padding_mode == "zeros" else conv.padding_mode


def _wrapping_forward(conv: nn.Conv2d, wrap_x: bool, wrap_y: bool, refill_last: bool) -> Callable:
    """A `_conv_forward` for `conv` that pads each axis itself: circularly where it wraps.

    refill_last: the input already ends in one zero row and column that the caller padded (the VAE's
    Downsample); on a wrapping axis they become the input's first row or column.
    """
    pad_h, pad_w = conv.padding
    mode_x, mode_y = _padding_mode(conv, wrap_x), _padding_mode(conv, wrap_y)

    def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if refill_last and wrap_y:
            x = torch.cat([x[..., :-1, :], x[..., :1, :]], dim=-2)
        if refill_last and wrap_x:
            x = torch.cat([x[..., :-1], x[..., :1]], dim=-1)
        if pad_w:
            x = F.pad(x, (pad_w, pad_w, 0, 0), mode=mode_x)
        if pad_h:
            x = F.pad(x, (0, 0, pad_h, pad_h), mode=mode_y)
        return F.conv2d(x, weight, bias, conv.stride, 0, conv.dilation, conv.groups)

    return conv_forward


def _convs_to_wrap(modules: tuple[nn.Module, ...]) -> dict[nn.Conv2d, bool]:
    """Every Conv2d that pads, once each, mapped to whether its input comes padded by a VAE Downsample."""
    convs: dict[nn.Conv2d, bool] = {}
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, VAEDownsample):
                convs[layer.conv] = True
            elif isinstance(layer, nn.Conv2d) and not isinstance(layer.padding, str) and any(layer.padding):
                convs.setdefault(layer, False)
    return convs


def apply_seamless(*modules: nn.Module, axes: str = "xy") -> Callable[[], None]:
    """Make every padded Conv2d in `modules` pad circularly along `axes`; returns the function that
    undoes it. Prefer the `seamless` context manager, which cannot forget to undo."""
    if axes not in AXES:
        raise InputError(f"seamless axes must be one of {', '.join(AXES)}, not {axes!r}")
    wrap_x, wrap_y = "x" in axes, "y" in axes
    saved: list[tuple[nn.Conv2d, Callable | None]] = []
    for conv, refill_last in _convs_to_wrap(modules).items():
        # an enclosing `seamless` may have replaced it already: keep that one to put back
        saved.append((conv, conv.__dict__.get("_conv_forward")))
        conv._conv_forward = _wrapping_forward(conv, wrap_x, wrap_y, refill_last)

    def restore() -> None:
        for conv, previous in reversed(saved):
            if previous is None:
                del conv._conv_forward  # the class's method shows through again
            else:
                conv._conv_forward = previous

    return restore


@contextmanager
def seamless(*modules: nn.Module, axes: str = "xy") -> Iterator[None]:
    """Inside the block, `modules` (a UNet, a VAE, ...) generate images that tile along `axes`.

    with seamless(pipe.unet, pipe.vae):
        texture = pipe.txt2img("brick wall")
    """
    restore = apply_seamless(*modules, axes=axes)
    try:
        yield
    finally:
        restore()
