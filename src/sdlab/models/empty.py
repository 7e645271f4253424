"""Building the networks without memory or random numbers: modules on the meta device, initialisers skipped.

Loading a checkpoint and sizing a model both need the module tree but none of its initial values: the
file supplies every weight, and a parameter count needs only shapes. On the meta device torch's
initialisers (`normal_`, `kaiming_uniform_`, ...) run through its Python reference decompositions,
whose first use imports torch._dynamo: about a second of every command's start-up (over three on a
busy machine) for values that are thrown away.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

_INITIALISERS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "trunc_normal_", "zeros_", "ones_", "constant_")


def _leave_as_is(tensor, *args, **kwargs):
    return tensor


@contextlib.contextmanager
def empty_modules():
    """Modules built inside have every parameter and buffer on the meta device, never initialised: give
    them values with `load_state_dict(..., assign=True)`, or only read their shapes."""
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
    for name in _INITIALISERS:
        setattr(nn.init, name, _leave_as_is)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)
