"""`--compile` (`compile=True`): the UNet run as code that torch.compile's Inductor generated for it.

Inductor fuses the memory-bound work between the convolutions and matmuls (GroupNorm + SiLU, GEGLU, the
residual adds, the layout changes) into a few C++ loops, and with `freezing` it treats the weights as
constants: it folds what depends on them alone and prepacks them for oneDNN. The output is the eager
UNet's within fp32 rounding (tests/test_fastpath_compile.py). Measurements are in docs/performance.md.

The price is paid once per UNet: tracing and compiling SD 1.5's UNet takes minutes on a CPU (its
graph, not its width, sets the time), said on stderr before it starts. Inductor keeps what it built
in TORCHINDUCTOR_CACHE_DIR (~/.cache/sdlab/inductor unless set), which later processes reuse.

Frozen weights are copies, so the compiled UNet belongs to one set of weights: when they change (a
LoRA merged in or taken out, a LoRA's forward hooks added) it is compiled again. Runs that need the
Python code of the layers (attention hooks: attention maps, prompt-to-prompt) stay eager.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch
from torch import nn

INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
# the first compile's seconds, about BASE + PER_MODULE * the modules in the UNet's tree, on a quiet 2-core AVX2
# EPYC: SD 1.5's UNet (821 modules) 183 s (issue 24); a 203-module UNet 376 s with the machine 5x
# oversubscribed. Only for the estimate said before compiling: the CPU and its load change it a lot.
COMPILE_SECONDS_BASE, COMPILE_SECONDS_PER_MODULE = 40.0, 0.175

_announced: set[int] = set()


def inductor_cache_dir() -> str:
    """Where Inductor keeps compiled code between processes: $TORCHINDUCTOR_CACHE_DIR as the user set it,
    else ~/.cache/sdlab/inductor. (Importing torch._dynamo writes torch's own default, /tmp/torchinductor_USER,
    into the variable, which a reboot empties: that value counts as unset.)"""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    given = os.environ.get(INDUCTOR_CACHE_ENV)
    if given and os.path.abspath(given) != os.path.abspath(default_cache_dir()):
        return given
    return os.path.join(os.path.expanduser("~"), ".cache", "sdlab", "inductor")


def weights_fingerprint(module: nn.Module) -> tuple:
    """What identifies `module`'s weights for frozen compiled code: each tensor, its in-place version
    (a merged LoRA bumps it) and the forward hooks (a dynamic LoRA adds them)."""
    tensors = tuple((name, id(t), t._version) for name, t in module.state_dict(keep_vars=True).items())
    hooks = tuple((name, tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in module.named_modules()
                  if m._forward_hooks or m._forward_pre_hooks)
    return tensors + hooks


def has_attention_hooks(unet: nn.Module) -> bool:
    return any(getattr(module, "hook", None) is not None for module in unet.modules())


def sampling_unet(unet: nn.Module, compile: bool) -> nn.Module:
    """The UNet a sampling run calls: compiled when asked (`compile`), unless an attention hook is set.
    Called once the run's adapters are in place, so the compiled code has the weights the run uses."""
    return compiled_unet(unet) if compile and not has_attention_hooks(unet) else unet


def compiled_unet(unet: nn.Module) -> nn.Module:
    """`unet` compiled with Inductor and frozen weights, for inference (call it under torch.no_grad()).

    The compiled module is kept on `unet` and reused while its weights stay the same. It takes the same
    arguments, and reads its attributes and parameters through to `unet`."""
    fingerprint = weights_fingerprint(unet)
    kept: Optional[tuple] = vars(unet).get("_compiled_for_inference")
    if kept is not None and kept[0] == fingerprint:
        return kept[1]
    if kept is not None:
        # compiled code is looked up by the forward's code object and guarded by the module's identity, not
        # by its weights' values: the old code would still be found with the old weights frozen in it
        torch._dynamo.reset()
    # read by Inductor whenever it looks for or stores compiled code
    os.environ[INDUCTOR_CACHE_ENV] = inductor_cache_dir()
    if id(unet) not in _announced:
        _announced.add(id(unet))
        estimate = COMPILE_SECONDS_BASE + COMPILE_SECONDS_PER_MODULE * sum(1 for _ in unet.modules())
        print(f"sdlab: compiling the UNet (torch.compile, Inductor): the first image is slower, ~{estimate:.0f} s "
              f"here the first time; kept in {os.environ[INDUCTOR_CACHE_ENV]} for later runs", file=sys.stderr)
    compiled = torch.compile(unet, backend="inductor", options={"freezing": True})
    # in the instance's __dict__, not as a submodule: it must not appear in modules() or the state dict
    vars(unet)["_compiled_for_inference"] = (fingerprint, compiled)
    return compiled
