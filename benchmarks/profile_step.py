"""Where a UNet step's time goes: torch.profiler on one step, the ops' own time grouped as convs, linear,
attention, norms and other (floor.op_category), beside the FLOPs of each group.

One CFG step (batch 2, 77-token text) of sdlab's eager UNet and of diffusers' UNet holding the same
tensors, each after a warm-up step. The ops' self time is used, so a convolution's time is counted once
(in oneDNN's kernel op), not again in the aten::conv2d that called it. The profiler's bookkeeping adds a
little to every op, so the step's time without it is measured too, and the shares are what matter.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import torch

from floor import CATEGORIES, DTYPES, op_category


def step_inputs(in_channels: int, context_dim: int, latent_side: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, in_channels, latent_side, latent_side, generator=generator).to(dtype)
    context = torch.randn(2, 77, context_dim, generator=generator).to(dtype)
    return x, torch.full((2,), 500.0), context


def profile_call(step) -> dict[str, float]:
    """Seconds of the ops' own time per category for one call of `step()`, plus 'total' (their sum)
    and 'wall' (one unprofiled call)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        step()  # warm-up: oneDNN picks and caches its kernels on the first call
        started = time.perf_counter()
        step()
        wall = time.perf_counter() - started
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            step()
    seconds = defaultdict(float)
    for event in profiler.key_averages():
        seconds[op_category(event.key)] += event.self_cpu_time_total / 1e6
    return {**{name: seconds[name] for name in CATEGORIES}, "total": sum(seconds.values()), "wall": wall}


def alternating_walls(steps: dict, rounds: int = 3) -> dict[str, float]:
    """The best unprofiled call of each of `steps` ({name: step}), the steps taking turns `rounds` times:
    on a shared VM one call of each, minutes apart, differed by 30% from run to run; turns in one process
    put both under the same conditions."""
    best = {name: float("inf") for name in steps}
    with torch.no_grad():
        for _ in range(rounds):
            for name, step in steps.items():
                started = time.perf_counter()
                step()
                best[name] = min(best[name], time.perf_counter() - started)
    return best


def profile_libraries(folder: Path, size: int, dtype: str) -> dict[str, dict[str, float]]:
    """{'sdlab': ..., 'diffusers': ...} as profile_call returns, one step at `size` px in `dtype`; 'wall'
    is the best of three unprofiled calls, the two UNets taking turns."""
    import sdlab

    from random_weights import load_diffusers

    pipe = sdlab.load(str(folder / "model.safetensors"), device="cpu", dtype=dtype)
    config = pipe.config
    x, t, context = step_inputs(config.unet.in_channels, config.unet.context_dim,
                                size // config.vae.downsample_factor, DTYPES[dtype])
    reference = load_diffusers(folder, DTYPES[dtype]).unet
    steps = {"sdlab": lambda: pipe.unet(x, t, context), "diffusers": lambda: reference(x, t, context, return_dict=False)}
    results = {name: {**profile_call(step), "dtype": dtype} for name, step in steps.items()}
    for name, wall in alternating_walls(steps).items():
        results[name]["wall"] = wall
    return results
