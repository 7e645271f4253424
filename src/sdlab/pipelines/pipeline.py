"""A loaded model as every pipeline takes it, and what every pipeline returns.

This module knows no pipeline: txt2img, img2img, ... are functions of a `Pipeline` (their own files),
and api.py binds them to it as methods.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from PIL import Image

from ..config import ModelConfig
from ..hashes import short_hash
from ..outputs import format_of, save_image, save_numbered

if TYPE_CHECKING:
    from ..checkpoint.vae_file import VAEFile


@dataclass
class GenerationResult:
    """What a pipeline made. Each image carries its infotext as `image.info["parameters"]`, where
    Pillow puts a PNG's text chunk when it reads one; Pillow does not write it back by itself, so
    save with `result.save(...)` (or sdlab.outputs.save_image) to keep it in the file."""

    images: list[Image.Image]
    infotexts: list[str]  # the web UI's `parameters` text, one per image
    seeds: list[int]
    latents: Optional[torch.Tensor] = None  # final latents (B, C, h, w), before decoding

    def __post_init__(self):
        for image, infotext in zip(self.images, self.infotexts):
            image.info["parameters"] = infotext

    def save(self, path: str | os.PathLike = ".") -> list[str]:
        """Write the images with their parameters (PNG text chunk, or EXIF for .jpg/.webp) and return the
        paths. A file name (.png, .jpg, .webp): that file, and for a batch STEM-1.EXT, STEM-2.EXT, ...;
        anything else is a folder (made if missing), which gets numbered PNGs, NNNNN-SEED.png, after the
        highest number there, as the web UI names them."""
        path = os.fspath(path)
        if format_of(path) is None:
            return [save_numbered(image, path, infotext, seed)
                    for image, infotext, seed in zip(self.images, self.infotexts, self.seeds)]
        stem, extension = os.path.splitext(path)
        paths = [path] + [f"{stem}-{i}{extension}" for i in range(1, len(self.images))]
        return [save_image(image, target, infotext) for image, target, infotext in zip(self.images, paths, self.infotexts)]


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
    vae_file: Optional[VAEFile] = None  # the VAE file that replaced the model's own VAE (`--vae`)

    @property
    def latent_factor(self) -> int:
        return self.config.vae.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor (8 px for SD). The UNet takes any latent
        size (its up path follows the skip connections' sizes, as diffusers' does)."""
        return self.latent_factor

    @property
    def model_hash(self) -> Optional[str]:
        """The web UI's "Model hash": 10 hex digits of the checkpoint file's SHA-256; None for a folder."""
        return short_hash(self.model_path) if self.model_path else None


def load_pipeline(path=None, prediction=None, device=None, dtype=None, task: str = "txt2img",
                  pipeline_type: type[Pipeline] = Pipeline, vae=None, lowvram: bool = False) -> Pipeline:
    """A pipeline from a single-file checkpoint, a diffusers folder, 'demo', or (path None) the bundled
    model for `task` ("txt2img", "inpaint", "upscale"). `pipeline_type`: Pipeline or a subclass of it
    (sdlab.load asks for api.StableDiffusion, the one with the pipelines as methods). `vae`: a VAE file
    or folder whose weights replace the model's VAE (checkpoint/vae_file.py), the web UI's "SD VAE".
    `lowvram`: the networks wait in CPU memory, each moved to the device only while it works (lowvram.py)."""
    from .. import bundled, devices
    from ..checkpoint.load import load_components
    from ..checkpoint.vae_file import apply_vae_file

    dev, dt = devices.resolve(device, dtype)
    if path is None:
        path = bundled.default_model_path(task)
    if path == "demo":
        config, unet, autoencoder, text_encoder = bundled.demo_components()
        vae_file = None if vae is None else apply_vae_file(autoencoder, vae)
        name = "sdlab-demo-random"
    else:
        components = load_components(path, prediction=prediction, vae=vae)
        config, unet, autoencoder, text_encoder = (components.config, components.unet, components.vae,
                                                   components.text_encoder)
        vae_file = components.vae_file
        name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    placed = torch.device("cpu") if lowvram else dev  # lowvram: the hooks bring each network in when called
    unet.to(placed, dt).eval()
    text_encoder.to(placed, dt).eval()
    autoencoder.to(placed, torch.float32 if dev.type == "cpu" else dt).eval()
    pipe = pipeline_type(config, unet, autoencoder, text_encoder, dev, dt, name, None if path == "demo" else path,
                         vae_file)
    if lowvram:
        from .lowvram import enable_lowvram

        enable_lowvram(pipe)
    return pipe
