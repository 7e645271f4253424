"""What a pipeline is asked to make: the options every pipeline shares, as one dataclass, and the few
settings that are one pipeline's own (how much of an image to repaint, the mask, the hires pass, ...).

A pipeline's keyword arguments are these fields: `pipe.txt2img("a red circle", steps=20, seed=1)` reads
GenerationOptions(prompt="a red circle", steps=20, seed=1). Code that builds the options itself (a
server, a script) hands them to run.generate, or to a pipeline as `**vars(options)`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional, Sequence, Union

import torch

from ..config import DEFAULT_NOISE, DEFAULT_SAMPLER
from ..fast.modes import FastModes


@dataclass
class GenerationOptions:
    """The prompts and sampling settings of one generation, as every pipeline takes them."""

    prompt: Union[str, Sequence[str]] = ""  # one text for the batch, or one per image
    negative_prompt: Union[str, Sequence[str]] = ""
    steps: int = 20
    guidance_scale: float = 7.0  # classifier-free guidance (Ho & Salimans 2022)
    seed: Optional[int] = None  # None: a random 32-bit seed (seeds.resolve_seed)
    width: Optional[int] = None  # pixels; None: the model's resolution (an edited image's own size)
    height: Optional[int] = None
    batch_size: int = 1
    sampler: str = DEFAULT_SAMPLER  # a samplers.py name, the web UI's included
    schedule_type: Optional[str] = None  # the web UI's "Schedule type" (schedules.SCHEDULE_TYPES); None: Automatic
    tiling: bool = False  # seamless images: UNet and VAE pad circularly (models/seamless.py), the web UI's "Tiling"
    noise: str = DEFAULT_NOISE  # whose random numbers to draw (noise.NOISE_MODES); "per-image": image i is seed + i alone
    latents: Optional[torch.Tensor] = None  # replaces the seeded initial noise: (B, C, H/f, W/f), standard normal
    # (cond, uncond) text embeddings, (B, 77*n, D) each, used instead of encoding the prompts (which the
    # infotext still names): interpolating between prompts' encodings (inside/latents.py)
    text_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    clip_skip: int = 1  # text-encoder layers left out from the end, as the web UI counts them
    eta: Optional[float] = None  # noise scale of ancestral and SDE steps; None: the sampler's default
    callback: Optional[Callable[[dict], None]] = None  # the sampler's step dict, after every step
    loras: Sequence = ()  # [file | (file, weight)], besides the prompt's <lora:name:weight> tags
    lora_dirs: Sequence = ()  # where <lora:name:...> tags find their files, by stem
    lora_mode: str = "merge"  # "merge" into the weights, or "dynamic": applied on the fly
    tiled_vae: Optional[bool] = None  # VAE in tiles; None: when the image is large or would not fit whole
    # opt-in fast modes that change the image for speed, "deepcache:3,cfg-trunc:0.8,tome:0.5" or a
    # fast.modes.FastModes (fast/modes.py); None: the exact network
    fast: Union[str, FastModes, None] = None
    # the web UI's variation seeds (per-image noise modes): image i's noise is slerp(subseed_strength, the
    # noise of its seed, the noise of subseed + i); with a strength every image keeps the seed
    subseed: Optional[int] = None  # None: a random 32-bit one when subseed_strength > 0
    subseed_strength: float = 0.0  # 0: the seed's noise, 1: the variation seed's
    seed_resize_from: Optional[tuple[int, int]] = None  # (width, height) px: the seed's noise as drawn at that size
    n_iter: int = 1  # the web UI's batch count: batches one after another, batch k seeded seed + k * batch_size
    compile: bool = False  # run the UNet through torch.compile (compile.py): same image, minutes to compile once
    # the UNet's weights reordered once for oneDNN (models/prepack.py): same image within fp32 rounding, faster
    # CPU steps, a second copy of the UNet's weights in memory
    prepack: bool = False
    # the self-attention logits times this (models/attention.py, sharpened_self_attention); 1: the network as
    # trained. Above 1 on a canvas larger than the model's own size: fewer objects drawn twice
    self_attention_scale: float = 1.0


@dataclass
class EditOptions:
    """img2img and inpainting: how the given image is used."""

    strength: float = 0.75  # denoising strength: 0 keeps the image, 1 repaints it from noise
    resize_mode: str = "just"  # how the image meets width x height: 'just', 'crop', 'fill' (images.resize_image)


@dataclass
class MaskOptions:
    """Inpainting and outpainting: how the mask is read (the web UI's inpaint settings)."""

    mask_blur: float = 4  # Gaussian sigma in px for the mask's edge
    only_masked: bool = False  # inpaint a box around the mask at the working size, then paste it back
    padding: int = 32  # px the box grows around the mask (only_masked)
    fill: str = "original"  # "Masked content": 'original', 'fill', 'latent noise', 'latent nothing'
    invert_mask: bool = False  # repaint the black area instead of the white one


@dataclass
class OutpaintOptions:
    """Outpainting: the canvas around the image."""

    extend: Union[str, dict]  # px per side: {"left": 64, ...} or "left=64,bottom=64"
    overlap: int = 8  # px of the image along each extended side repainted too, so the seam is generated
    strength: float = 0.8


@dataclass
class HiresOptions:
    """The web UI's "Hires. fix": a second pass at a larger size."""

    hires_scale: float = 2.0
    hires_strength: float = 0.5  # denoising strength of the second pass
    hires_steps: Optional[int] = None  # steps the second pass runs; None: as many as the first
    hires_upscaler: str = "latent"  # 'latent', 'latent-nearest-exact' or 'lanczos' (hires.HIRES_UPSCALERS)


@dataclass
class UpscaleOptions:
    noise_level: int = 20  # 0..350: noise added to the low-resolution image before the model sees it


def read_options(pipeline: str, prompt, negative_prompt, settings: dict, *extras: type) -> tuple:
    """A pipeline's prompts and keyword arguments -> (GenerationOptions, one of each `extras` dataclass),
    each name given to the dataclass that has it. A name none of them has is a TypeError, as Python's
    own for a misspelt keyword, that lists the names the pipeline takes."""
    types = (GenerationOptions, *extras)
    owner = {f.name: kind for kind in types for f in fields(kind)}
    unknown = [name for name in settings if name not in owner]
    if unknown:
        raise TypeError(f"{pipeline}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                        f"it takes {', '.join(owner)}")
    settings = {"prompt": prompt, "negative_prompt": negative_prompt, **settings}
    return tuple(kind(**{name: value for name, value in settings.items() if owner[name] is kind}) for kind in types)
