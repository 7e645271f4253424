"""The UNet's convolution: a 3x3 convolution over a small CPU feature map runs as one matrix product.

A 3x3 convolution is a matrix product in disguise: unfold the input into (channels x 9) columns, one
per output position, and multiply by the weight as an (out_channels, channels x 9) matrix. oneDNN's
direct convolution, which torch calls on the CPU, splits its work over output positions and is slow
where there are few of them: on a 2-core AVX2 EPYC, the SD 1.5 UNet's 1280- and 2560-channel 3x3
convolutions at 8x8 and 4x4 (a 256 px image's two lowest levels) ran at 15-53 GFLOP/s against
100-140 at 32x32, and the same work as one matrix product (MKL's GEMM) took 1.5-3x less time, which
was a third of a UNet step's convolution time (benchmarks/conv_paths.py measures it on any CPU). At
16x16 and above the two are level or the convolution wins, so there it stays.

The product computes each output as the same sum of products as the convolution, in another order:
the outputs agree to float rounding (relative 1e-6 in fp32), inside the parity tests' bounds. Only
fp32 on the CPU takes this path: bf16 GEMMs were not measured against oneDNN's bf16 convolutions,
and on a GPU cuDNN chooses its own algorithms. Subclassing nn.Conv2d keeps the state-dict keys and
everything that looks for nn.Conv2d (LoRA, seamless tiling's own padding, the tiled VAE).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# a 3x3 convolution whose output has at most this many positions per image runs as a matrix product
GEMM_MAX_POSITIONS = 64


class Conv2d(nn.Conv2d):
    """nn.Conv2d, with small CPU feature maps computed as one matrix product (see the module docstring)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if gemm_suits(self, input):
            return conv3x3_as_gemm(input, weight, bias)
        return super()._conv_forward(input, weight, bias)


def gemm_suits(conv: nn.Conv2d, input: torch.Tensor) -> bool:
    """Whether `conv` on `input` is a 3x3, stride 1, zero-padded 1, fp32 CPU convolution over at most
    GEMM_MAX_POSITIONS positions per image."""
    return (input.device.type == "cpu" and input.dtype == torch.float32 and input.dim() == 4
            and input.shape[-2] * input.shape[-1] <= GEMM_MAX_POSITIONS
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def conv3x3_as_gemm(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.conv2d(input, weight, bias, padding=1) as (out, in*9) @ (in*9, batch*positions): the batch joins
    the positions, so the weight is read once for the whole batch."""
    batch, channels, height, width = input.shape
    out_channels = weight.shape[0]
    columns = F.unfold(input, 3, padding=1)  # (batch, channels*9, height*width)
    columns = columns.transpose(0, 1).reshape(channels * 9, batch * height * width)
    flat_weight = weight.reshape(out_channels, channels * 9)
    if bias is None:
        out = flat_weight @ columns
    else:
        out = torch.addmm(bias[:, None], flat_weight, columns)
    return out.view(out_channels, batch, height, width).transpose(0, 1).contiguous()
