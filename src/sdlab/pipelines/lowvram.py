"""Low-VRAM mode (`--lowvram`, `sdlab.load(..., lowvram=True)`): one network on the device at a time.

A generation uses its three networks one after another: the text encoder for the prompts, the UNet for
every step, the VAE to decode (and, for img2img and inpainting, first to encode). On a GPU too small to
hold all three, each is kept in CPU memory and moved to the device when it is called, the one used
before it moving back out: while the UNet samples, the text encoder and the VAE wait on the CPU, and
the UNet leaves the device before the VAE decodes. The device then needs the largest network plus
one phase's activations instead of all the weights at once; each image pays the copies (for SD 1.5 in
fp16, about 1.7 GB over PCIe, a fraction of a second). On the CPU there is nothing to move and the mode
does nothing.

The move happens in forward pre-hooks: on each network and its direct children (what the pipelines
call), and on every module of the VAE, whose tiled decode drives its blocks one by one.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

PARTS = ("text_encoder", "unet", "vae")


class Offloader:
    """Keeps one of `parts` on `device` and the others on `offload_device`, moving them as they are called."""

    def __init__(self, parts: dict[str, nn.Module], device: torch.device, offload_device: torch.device):
        self.parts, self.device, self.offload_device = parts, torch.device(device), torch.device(offload_device)
        self.placement = {name: self.offload_device for name in parts}  # where each part is now
        self.active: Optional[str] = None

    def move(self, module: nn.Module, device: torch.device) -> None:
        module.to(device)

    def bring(self, name: str) -> None:
        """`name` on the device, the part that was there back on the offload device."""
        if self.active == name:
            return
        if self.active is not None:
            self.move(self.parts[self.active], self.offload_device)
            self.placement[self.active] = self.offload_device
        self.move(self.parts[name], self.device)
        self.placement[name] = self.device
        self.active = name

    def hook(self, name: str):
        """A forward pre-hook that brings `name` in and its tensor inputs along (the text encoder's token
        ids are made where its weights were)."""
        def bring_before_forward(module, args, kwargs):
            if self.active == name:
                return None
            self.bring(name)
            return (tuple(self._to_device(a) for a in args), {k: self._to_device(v) for k, v in kwargs.items()})

        return bring_before_forward

    def _to_device(self, value):
        return value.to(self.device) if isinstance(value, torch.Tensor) else value

    def install(self) -> None:
        """Every part on the offload device, and the hooks that bring each in when it is called."""
        for name, part in self.parts.items():
            self.move(part, self.offload_device)
            hooked = part.modules() if name == "vae" else [part, *part.children()]
            for module in hooked:
                module.register_forward_pre_hook(self.hook(name), with_kwargs=True)


def enable_lowvram(pipe, offload_device: str | torch.device = "cpu") -> Optional[Offloader]:
    """Keep `pipe`'s (a pipeline.Pipeline, whose load_pipeline calls this) networks on `offload_device`, each moved to `pipe.device` only while it works.
    None, and nothing changed, where the two are the same device (a CPU run)."""
    if torch.device(offload_device) == pipe.device:
        return None
    offloader = Offloader({name: getattr(pipe, name) for name in PARTS}, pipe.device, offload_device)
    offloader.install()
    return offloader
