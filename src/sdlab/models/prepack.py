"""`--prepack` (`prepack=True`): the UNet's linear layers and convolutions run on CPU with their weights
reordered once into oneDNN's blocked layout, instead of on every call.

torch runs an fp32 CPU convolution through oneDNN, which reorders the weight into the layout its kernel
wants at every call, and a linear layer through MKL's GEMM. Reordering once (torch.ops.mkldnn's
`_reorder_convolution_weight` / `_reorder_linear_weight`, the ops Inductor's frozen graphs call) lets
oneDNN pick its kernel for the actual input size and skip the reorder: on a 2-core AVX2 EPYC one SD 1.5
UNet step at 256 px is 1.12-1.22x faster (docs/performance.md has the measurements). The outputs are
the same sums of products in another order: within fp32 rounding (relative ~1e-6), inside the parity
tests' bounds.

What it costs: a second copy of the UNet's weights (3.4 GB for SD 1.5 in fp32: the plain weights stay,
for everything else that reads them: LoRA, saving, hashes), and the reordering itself, a few seconds
for SD 1.5 the first time each layer sees an input size. A convolution keeps one packed weight per input
size it has seen (a packed weight chosen for one size can be slower than none at another). The packed
weights are kept on the layer and reused by later runs while the weight tensor is the same one,
unchanged in place (a merged LoRA makes them again); `release_prepacked` frees them.

Only fp32 on a CPU with oneDNN, outside autograd (inference), zero-padded convolutions that pad as
nn.Conv2d does (not seamless tiling's circular padding): anything else runs the plain layer. Off by
default, because of the memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_PACKS = "_sdlab_prepacked"  # in a layer's __dict__, never a submodule or buffer: not in the state dict
_FORWARD = "forward"  # the instance attribute that routes a layer through its packed weight inside `prepacked`


def available() -> bool:
    """Whether this torch can run prepacked weights (built with oneDNN)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@contextmanager
def prepacked(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside, the nn.Linear and nn.Conv2d layers of `module` use packed weights where they can (see the
    module docstring); on leaving, they are plain layers again (the packed weights are kept for the next
    run). With `enabled` False nothing changes. Needs a torch with oneDNN (`available()`: every x86 CPU build;
    pipelines.run refuses `prepack` without it)."""
    if not enabled:
        yield
        return
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and _FORWARD not in vars(m)]
    for layer in layers:
        packed_forward = _linear_forward if isinstance(layer, nn.Linear) else _conv_forward
        vars(layer)[_FORWARD] = packed_forward.__get__(layer)
    try:
        yield
    finally:
        for layer in layers:
            vars(layer).pop(_FORWARD, None)


def release_prepacked(module: nn.Module) -> int:
    """Frees the packed weights kept on `module`'s layers; returns how many there were."""
    count = 0
    for layer in module.modules():
        count += len(vars(layer).pop(_PACKS, {}))
    return count


def unpacked_bytes(module: nn.Module) -> int:
    """Bytes the packed weights of `module`'s layers would add, leaving out layers that hold some already
    (the memory `prepacked` asks for on a first run)."""
    return sum(layer.weight.numel() * layer.weight.element_size() for layer in module.modules()
               if isinstance(layer, (nn.Linear, nn.Conv2d)) and not vars(layer).get(_PACKS))


def _usable(layer: nn.Module, input: torch.Tensor) -> bool:
    weight = layer.weight
    return (input.device.type == "cpu" and input.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.device.type == "cpu" and not (torch.is_grad_enabled() and weight.requires_grad)
            and not input.requires_grad)


def _packed_weight(layer: nn.Module, key: tuple, pack) -> torch.Tensor:
    """The packed weight for `key`, made again when the layer's weight tensor changed (another tensor, or
    this one written in place: a LoRA merged in or taken out)."""
    weight = layer.weight
    stamp = (id(weight), weight._version)
    packs = vars(layer).setdefault(_PACKS, {})
    kept = packs.get(key)
    if kept is None or kept[0] != stamp:
        kept = packs[key] = (stamp, pack(weight.detach()))
    return kept[1]


def _linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    if not _usable(self, input):
        return F.linear(input, self.weight, self.bias)
    weight = _packed_weight(self, ("linear",), lambda w: torch.ops.mkldnn._reorder_linear_weight(w, None))
    return torch.ops.mkldnn._linear_pointwise(input.contiguous(), weight, self.bias, "none", [], "")


def _conv_forward(self: nn.Conv2d, input: torch.Tensor) -> torch.Tensor:
    if (not _usable(self, input) or input.dim() != 4 or self.padding_mode != "zeros"
            or isinstance(self.padding, str) or "_conv_forward" in vars(self)):  # seamless tiling pads its own way
        return type(self).forward(self, input)
    padding, stride, dilation = list(self.padding), list(self.stride), list(self.dilation)
    shape = tuple(input.shape[1:])  # one packed weight per input size; the batch does not change the choice
    weight = _packed_weight(self, shape, lambda w: torch.ops.mkldnn._reorder_convolution_weight(
        w, padding, stride, dilation, self.groups, [input.shape[0], *shape]))
    return torch.ops.mkldnn._convolution_pointwise(input.contiguous(), weight, self.bias, padding, stride, dilation,
                                                   self.groups, "none", [], "")
