"""Which device and dtype to compute in, and what fits in its memory, by detection, never by assumption.

On CPUs, bf16 is only fast where the processor has native bf16 instructions (AVX512-BF16 or AMX); on
AVX2-only CPUs torch's bf16 kernels are ~40x slower than fp32. fp16 matmuls on CPU are emulated and
slow everywhere.

The dtype rule (`default_dtype`, what --dtype auto and no --dtype pick): a dtype other than fp32 becomes
a CPU's default only where it was measured faster than fp32 for the whole UNet step, with images
within a reported PSNR of fp32's, so that the default is never slower than fp32 on any CPU. Without
native bf16, that is never: fp32. With it, bf16 matmuls run ~4x fp32's rate (issue 24: 830 vs 210
GFLOP/s), but the UNet step also depends on the 3x3 convolutions, GroupNorm and the layout changes,
and no step has yet been measured faster there: fp32 stays the default, and bf16 is there to ask for
(`--dtype bf16`), refused with advice on CPUs without native bf16.

Memory: `available_memory_bytes` says what a device has free; estimates of what a step needs (so far
the VAE's decode, `vae_decode_bytes`; a whole generation's in memory.py) are compared with it before the
work starts, so a request that cannot fit is refused or run another way (the tiled VAE) instead of
failing half-way.
"""

from __future__ import annotations

import functools
import math
import os
import platform
from typing import Optional

import torch

from .config import VAEConfig
from .errors import InputError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_description() -> str:
    """The processor model and its bf16 capability, to print beside every benchmark figure."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return f"{name} ({torch.get_num_threads()} threads, {bf16})"


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32  # the module docstring's rule: no CPU has been measured faster in bf16 yet


def resolve(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """Turn the user's --device/--dtype strings into torch objects, refusing combinations that crawl."""
    if device in (None, "auto"):
        dev = default_device()
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise InputError(f"unknown device '{device}': use cpu, cuda, cuda:N or mps") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError("device 'mps' requested but Metal is not available; use --device cpu")
    if dtype in (None, "auto"):
        return dev, default_dtype(dev)
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")
    if dev.type == "cpu" and dtype == "fp16":
        raise InputError("fp16 is emulated and very slow on CPU; use --dtype fp32 (or bf16 on CPUs with native bf16)")
    if dev.type == "cpu" and dtype == "bf16" and not cpu_has_native_bf16():
        raise InputError("this CPU has no native bf16 (AVX512-BF16/AMX), where bf16 is ~40x slower; use --dtype fp32")
    return dev, DTYPES[dtype]


# -- memory ------------------------------------------------------------------------------------------

VAE_TILE = 64  # latent pixels per side of the tiled VAE's tiles (512 px for SD; models/tiling.py)
AUTO_TILE_PIXELS = 1024 * 1024  # above one megapixel, SD's untiled fp32 decode needs several GiB


def proc_bytes(path: str, key: str) -> Optional[int]:
    """A "Key:   N kB" line of a Linux /proc file (meminfo, self/status) in bytes; None where absent."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory_bytes(device: torch.device) -> Optional[int]:
    """Bytes free for new tensors on `device`: CUDA's free memory, Linux's MemAvailable; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        available = proc_bytes("/proc/meminfo", "MemAvailable")
        if available is not None:
            return available
        if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def vae_decode_bytes(config: VAEConfig, height: int, width: int, batch_size: int = 1,
                     dtype: torch.dtype = torch.float32, tiled: bool = False) -> int:
    """About what a decode of a (height, width) image holds at its peak, in units of its widest
    full-resolution layer's activation: six untiled (input, normalised, activated and convolved copies
    around the first block after the last upsampler), three tiled (the tiles' activations and the
    whole-image input they were cut from or are put together into): tests/test_tiling.py measures 6.0
    and 2.75-2.9. An image of one or two tiles holds four, its tiles being as large as the image."""
    widest = max(config.ch * m * (height >> i) * (width >> i) for i, m in enumerate(config.ch_mult))
    f = config.downsample_factor
    tiles = math.ceil(height / f / VAE_TILE) * math.ceil(width / f / VAE_TILE)
    units = 6 if not tiled else 3 if tiles > 2 else 4
    return units * batch_size * widest * torch.empty((), dtype=dtype).element_size()


def wants_tiled_vae(config: VAEConfig, height: int, width: int, batch_size: int, dtype: torch.dtype,
                    device: torch.device, tiled: Optional[bool]) -> bool:
    """Whether (height, width) images should go through the VAE in tiles.

    `tiled` True or False decides; None tiles above AUTO_TILE_PIXELS or when an untiled pass would
    not fit in the free memory. Raises InputError when tiling is refused and the images cannot fit.
    """
    needed = vae_decode_bytes(config, height, width, batch_size, dtype)
    free = available_memory_bytes(device)
    too_big = free is not None and needed > free
    if tiled is None:
        return too_big or height * width > AUTO_TILE_PIXELS
    if not tiled and too_big:
        raise InputError(
            f"the VAE would need about {needed / 2**30:.1f} GiB for {width}x{height} images but "
            f"{free / 2**30:.1f} GiB is free: use the tiled VAE (tiled_vae=True, --tiled-vae) or a smaller size"
        )
    return bool(tiled)
