"""What every pipeline shares: the loaded components, conditioning, guidance, decoding, parameters.

txt2img, img2img, inpainting and upscaling are short functions over these pieces (STYLE principle 5).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from .. import __version__
from ..config import ModelConfig
from ..errors import InputError
from ..noise import NOISE_MODES


@dataclass
class GenerationResult:
    images: list[Image.Image]
    infotexts: list[str]  # the web UI's `parameters` text, one per image
    seeds: list[int]
    latents: Optional[torch.Tensor] = None  # final latents (B, C, h, w), before decoding


@dataclass
class Pipeline:
    """A loaded model: its config, the three networks, and where they compute."""

    config: ModelConfig
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    model_name: str = "model"
    model_path: Optional[str] = None

    def txt2img(self, prompt, negative_prompt: str = "", **kwargs) -> GenerationResult:
        from .txt2img import txt2img

        return txt2img(self, prompt, negative_prompt, **kwargs)

    @property
    def latent_factor(self) -> int:
        return self.config.vae.downsample_factor

    @property
    def model_hash(self) -> Optional[str]:
        return model_hash(self.model_path) if self.model_path else None


def load_pipeline(path=None, prediction=None, device=None, dtype=None) -> Pipeline:
    """A pipeline from a single-file checkpoint, a diffusers folder, 'demo', or the bundled model."""
    from .. import devices
    from ..checkpoint.load import load_components
    from .. import bundled

    dev, dt = devices.resolve(device, dtype)
    if path is None:
        path = bundled.default_model_path()
    if path == "demo":
        config, unet, vae, text_encoder = bundled.demo_components()
        name = "sdlab-demo-random"
    else:
        components = load_components(path, prediction=prediction)
        config, unet, vae, text_encoder = components.config, components.unet, components.vae, components.text_encoder
        name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    unet.to(dev, dt).eval()
    text_encoder.to(dev, dt).eval()
    vae.to(dev, torch.float32 if dev.type == "cpu" else dt).eval()
    return Pipeline(config, unet, vae, text_encoder, dev, dt, name, None if path == "demo" else path)


# -- parameters ------------------------------------------------------------------------------------


def check_size(width: int, height: int, factor: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value <= 0:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
        if value % factor:
            raise InputError(f"{name} {value} is not a multiple of {factor}; try {max(factor, round(value / factor) * factor)}")


def check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps <= 0:
        raise InputError(f"steps must be a positive integer, got {steps!r}")


def check_prompts(prompts: list[str], negative_prompts: list[str]) -> None:
    if all(not p.strip() for p in prompts) and all(not n.strip() for n in negative_prompts):
        raise InputError("the prompt is empty and there is no negative prompt: describe the image you want")


def check_noise(noise: str) -> None:
    if noise not in NOISE_MODES:
        raise InputError(f"unknown noise mode '{noise}'; choose one of: {', '.join(NOISE_MODES)}")


def random_seed() -> int:
    return random.randrange(2**32)  # the web UI's seeds are 32-bit, so every tool can take ours


def as_list(value, batch_size: int, name: str) -> list[str]:
    if isinstance(value, str):
        return [value] * batch_size
    value = list(value)
    if len(value) != batch_size:
        raise InputError(f"{name}: got {len(value)} texts for a batch of {batch_size}")
    return value


# -- conditioning, guidance, decoding -----------------------------------------------------------------


@torch.no_grad()
def encode_text(pipe: Pipeline, prompts: list[str], negative_prompts: list[str], clip_skip: int = 1):
    """Text embeddings for prompts and negative prompts, padded to the same number of 77-token chunks."""
    from ..prompts import encode_prompts

    if clip_skip < 1 or clip_skip >= pipe.config.text.layers:
        raise InputError(f"clip skip must be between 1 and {pipe.config.text.layers - 1}, got {clip_skip}")
    embeddings = encode_prompts(pipe.text_encoder, list(negative_prompts) + list(prompts), clip_skip=clip_skip)
    uncond, cond = embeddings.chunk(2)
    return cond.to(pipe.dtype), uncond.to(pipe.dtype)  # (B, 77*n, D) each


def make_denoiser(pipe: Pipeline, cond, uncond, guidance_scale: float, sampler=None, **extra):
    """The sampler's `model(x, sigma) -> denoised`: UNet + prediction-type wrapper + CFG.

    `sampler` (a SamplerSpec) says whether the UNet's timestep is rounded, as diffusers does for
    DPM++ 2M Karras; `extra` is conditioning both CFG halves share (`concat`, `y`)."""
    from ..denoisers import Denoiser
    from ..guidance import CFGDenoiser

    denoiser = Denoiser(ConditionedUNet(pipe.unet), pipe.config.schedule, pipe.config.prediction,
                         quantize=bool(sampler is not None and sampler.quantize))
    return CFGDenoiser(denoiser, cond, uncond, guidance_scale, **extra)


class ConditionedUNet(torch.nn.Module):
    """The UNet called with a conditioning dict, as the denoisers pass it.

    `crossattn` (B, L, D) goes to cross-attention; `concat` (B, C, h, w) is stacked onto the input
    channels (inpainting: mask + masked-image latents; x4 upscaler: the low-res image); `y` (B,) is the
    class label (the upscaler's noise level).
    """

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, crossattn, concat=None, y=None):
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        return self.unet(x, t, crossattn, y=y)


@torch.no_grad()
def decode_latents(pipe: Pipeline, latents: torch.Tensor) -> list[Image.Image]:
    vae = pipe.vae
    vae_dtype = next(vae.parameters()).dtype
    images = vae.decode(latents.to(pipe.device, vae_dtype) / pipe.config.vae.scaling_factor)
    # the same rounding as diffusers' image processor, so images compare bit for bit
    array = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]


@torch.no_grad()
def encode_images(pipe: Pipeline, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f), sampled from the VAE's posterior."""
    vae = pipe.vae
    vae_dtype = next(vae.parameters()).dtype
    posterior = vae.encode(images.to(pipe.device, vae_dtype))
    return posterior.sample(generator).to(pipe.dtype) * pipe.config.vae.scaling_factor


# -- web-UI parameters ----------------------------------------------------------------------------


_HASHES_FILE = os.path.join(os.path.expanduser("~"), ".cache", "sdlab", "hashes.json")


def model_hash(path: str) -> Optional[str]:
    """The web UI's 'Model hash': the first 10 hex digits of the file's SHA-256, cached by size+mtime."""
    if not os.path.isfile(path):
        return None
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{int(stat.st_mtime)}"
    try:
        with open(_HASHES_FILE) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        cache[key] = digest.hexdigest()
        try:
            os.makedirs(os.path.dirname(_HASHES_FILE), exist_ok=True)
            tmp = _HASHES_FILE + f".{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(cache, f)
            os.replace(tmp, _HASHES_FILE)
        except OSError:
            pass  # a read-only home only costs re-hashing next time
    return cache[key][:10]


_RNG_NAMES = {"a1111-cpu": "CPU", "a1111-gpu": "NV"}


def generation_params(pipe: Pipeline, *, steps, sampler, guidance_scale, seed, width, height, noise,
                      clip_skip=1, batch_size=1, batch_pos=0, extra=None) -> dict:
    """The web UI's field names and order; sdlab-only fields come after them."""
    params = {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": guidance_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": pipe.model_hash,
        "Model": pipe.model_name,
        "Clip skip": clip_skip if clip_skip != 1 else None,
        "Batch size": batch_size if batch_size > 1 else None,
        "Batch pos": batch_pos if batch_size > 1 else None,
        "RNG": _RNG_NAMES.get(noise),
        "Noise": noise if noise not in _RNG_NAMES else None,
        "Prediction": pipe.config.prediction if pipe.config.prediction != "epsilon" else None,
    }
    params.update(extra or {})
    params["Version"] = f"sdlab {__version__}"
    return params


def sampler_display_name(name: str) -> str:
    from ..samplers import resolve_sampler

    return resolve_sampler(name).name
