"""Which device and dtype to compute in, chosen by detection, never by assumption.

On CPUs, bf16 is only fast where the processor has native bf16 instructions (AVX512-BF16 or AMX); on
AVX2-only CPUs torch's bf16 kernels are ~40x slower than fp32. fp16 matmuls on CPU are emulated and
slow everywhere. So the CPU default is fp32; bf16 is offered where the hardware has it.
"""

from __future__ import annotations

import functools
import platform

import torch

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
    return torch.float32  # bf16 on CPU is opt-in: even with native bf16, convs are not always faster


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
