"""How fast a UNet step could be on this machine: its FLOPs at the matrix-multiply rate the CPU reaches.

The floor of a step is (the step's FLOPs) / (the rate of a large square fp32, or bf16, matmul): the
time the arithmetic alone takes if every convolution and linear layer ran as fast as the best-shaped
GEMM, and the memory-bound work (norms, activations, residual adds, layout changes) cost nothing. The
FLOPs are counted by torch's FlopCounterMode on the UNet built on the meta device, so counting costs
no arithmetic and no memory, and are grouped as the profile table groups time (profile_step.py).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

MATMUL_SIDE = 4096
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_rate(dtype: torch.dtype = torch.float32, side: int = MATMUL_SIDE, repeats: int = 5) -> float:
    """FLOP/s of a side x side matmul in `dtype` on the CPU: the best of `repeats` after a warm-up."""
    a = torch.randn(side, side).to(dtype)
    b = torch.randn(side, side).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * side ** 3 / best


def op_category(name: str) -> str:
    """The profile table's group of an aten op ('aten::addmm' as the profiler names it, 'aten.addmm' as
    the FLOP counter does). The UNet's
    linear layers run as addmm/mm (a 3-D input is flattened first); batched products (bmm, baddbmm)
    and softmax only occur inside attention."""
    name = name.replace("::", ".").removeprefix("aten.").split(".")[0]
    if "conv" in name:
        return "convs"
    if name in ("addmm", "mm", "linear", "matmul"):
        return "linear"
    if "attention" in name or "softmax" in name or name in ("bmm", "baddbmm"):
        return "attention"
    if "norm" in name:
        return "norms"
    return "other"


CATEGORIES = ("convs", "linear", "attention", "norms", "other")


def unet_step_flops(config, latent_side: int, batch: int = 2) -> dict[str, float]:
    """FLOPs of one UNet call on a (batch, C, side, side) latent with 77-token text, by category, plus
    'total'. batch 2 is one step of classifier-free guidance (the prompt's and the negative's)."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdlab.models import build_unet

    with torch.device("meta"):
        unet = build_unet(config.unet).eval()
        x = torch.empty(batch, config.unet.in_channels, latent_side, latent_side)
        context = torch.empty(batch, 77, config.unet.context_dim)
        timesteps = torch.full((batch,), 500.0)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(x, timesteps, context)
    flops = defaultdict(float)
    for op, count in counter.get_flop_counts()["Global"].items():
        flops[op_category(str(op))] += count
    flops["total"] = float(counter.get_total_flops())
    return dict(flops)


def floor_seconds(step_flops: float, rate: float) -> float:
    return step_flops / rate
