"""The digits denoiser's network: `net(x_t, t, labels) -> noise_pred`, an MLP over the 64 pixels.

An 8x8 digit is 64 numbers, so a residual MLP sees the whole picture at once and trains in a minute
or two on a CPU where a convolutional UNet would need far longer. The timestep enters as a sinusoidal
embedding (Vaswani et al. 2017; Ho et al. 2020, Appendix B) and the digit as a learned class
embedding, both added to every block. Label 10 is "no digit": training replaces the label with it at
random (class dropout) so one network gives both halves of classifier-free guidance (Ho & Salimans 2022).
It takes the same inputs as SD's UNet behind denoisers.Denoiser: VP-scaled x and a continuous t.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

WEIGHTS_PATH = Path(__file__).resolve().parent.parent / "weights" / "sdlab-digits.safetensors"
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES  # the unconditional "no digit" label of classifier-free guidance


@dataclass(frozen=True)
class DigitsConfig:
    side: int = 8  # pixels per side; scikit-learn's digits are 8x8
    width: int = 256  # hidden units of every block
    blocks: int = 3  # residual blocks
    time_channels: int = 128  # sinusoidal timestep features

    @property
    def pixels(self) -> int:
        return self.side * self.side


def timestep_features(t: torch.Tensor, channels: int) -> torch.Tensor:
    """(B,) continuous timesteps -> (B, channels) sines and cosines at geometric frequencies."""
    half = channels // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h + emb))))


class DigitsNet(nn.Module):
    """(B, 1, side, side) noised digits, (B,) timesteps, (B,) labels 0-10 -> (B, 1, side, side) noise_pred."""

    def __init__(self, config: DigitsConfig = DigitsConfig()):
        super().__init__()
        self.config = config
        self.time_embed = nn.Sequential(nn.Linear(config.time_channels, config.width), nn.SiLU(),
                                        nn.Linear(config.width, config.width))
        self.label_embed = nn.Embedding(NUM_CLASSES + 1, config.width)
        self.proj_in = nn.Linear(config.pixels, config.width)
        self.blocks = nn.ModuleList(ResidualBlock(config.width) for _ in range(config.blocks))
        self.norm_out = nn.LayerNorm(config.width)
        self.proj_out = nn.Linear(config.width, config.pixels)
        nn.init.zeros_(self.proj_out.weight)  # start by predicting zero noise
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_features(t, self.config.time_channels)) + self.label_embed(labels.long())
        h = self.proj_in(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        return self.proj_out(self.norm_out(h)).reshape(x.shape)


def save_digits_model(net: DigitsNet, path: str | os.PathLike, info: dict | None = None) -> None:
    """Write the weights as fp16 safetensors (the shipped file stays under 1 MB), the config and `info`
    (training steps, time, loss) in its metadata; atomically, via a temporary file and a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {key: value.detach().to("cpu", torch.float16).contiguous() for key, value in net.state_dict().items()}
    metadata = {"sdlab_digits_config": json.dumps(asdict(net.config)), "sdlab_digits_info": json.dumps(info or {})}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_digits_model(path: str | os.PathLike | None = None) -> tuple[DigitsNet, dict]:
    """(the network in fp32, eval mode; the training info) from a file save_digits_model wrote (default:
    the shipped model)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path) if path is not None else WEIGHTS_PATH
    if path.is_dir():
        path = path / WEIGHTS_PATH.name
    if not path.is_file():
        raise CheckpointError(f"no digits model at {path}; train one with `sdlab digits train -o DIR`")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            state = {key: file.get_tensor(key).float() for key in file.keys()}
        config = DigitsConfig(**json.loads(metadata["sdlab_digits_config"]))
    except (SafetensorError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} is not a digits model written by `sdlab digits train` ({error})") from None
    net = DigitsNet(config)
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False), json.loads(metadata.get("sdlab_digits_info", "{}"))
