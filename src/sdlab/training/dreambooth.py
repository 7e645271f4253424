"""`sdlab train dreambooth`: fine-tune a whole model on a few pictures of one subject (Ruiz et al. 2023,
"DreamBooth", section 3).

Every instance image (--data) is captioned with the instance prompt, which names the subject by a rare
token and its class ("a sks dog"). Fine-tuning on so few images makes the model forget what other
members of the class look like ("language drift", section 3.3); prior preservation keeps it: before
training, the base model generates `class_images` pictures of the class prompt ("a dog") into
OUT/class_images/ (a resumed or repeated run reuses those already there), and each step adds their
noise-prediction loss, so

    loss = MSE(instance) + prior_loss_weight * MSE(class)            (eq. 2; the paper's lambda = 1)

The UNet trains (and with `train_text_encoder` the text encoder); the VAE stays frozen. The result is
a full single-file model, OUT/last.safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from ..schedules import alphas_cumprod
from . import components, distributed
from .config import DreamBoothOptions, TrainConfig
from .data import Batch, resize_and_crop, to_tensor
from .diffusion import encode_latents, encode_text, noised_prediction_loss, validation_grid
from .lora import load_base
from .loop import atomic_write

CLASS_FOLDER = "class_images"


@torch.no_grad()
def generate_class_images(folder: Path, count: int, model_config: ModelConfig, unet, vae, text_encoder,
                          options: DreamBoothOptions, size: int, seed: int) -> list[Path]:
    """OUT/class_images/0000.png ...: image i is txt2img of the class prompt with seed + i, so the set is
    the same however often a run stops; files already there are kept."""
    from ..pipelines.api import StableDiffusion as Pipeline

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:04d}.png" for i in range(count)]
    missing = [i for i, path in enumerate(paths) if not path.exists()]
    if missing and int(os.environ.get("RANK", "0")) == 0:  # under torchrun rank 0 draws, the others wait
        distributed.note(f"generating {len(missing)} class images of {options.class_prompt!r} into {folder}")
        device = next(unet.parameters()).device
        pipe = Pipeline(model_config, unet, vae, text_encoder, device, torch.float32)
        for i in missing:
            result = pipe.txt2img(options.class_prompt, steps=options.class_steps, guidance_scale=options.class_guidance,
                                  seed=seed + i, width=size, height=size, sampler=options.class_sampler)
            atomic_write(paths[i], lambda tmp: result.images[0].save(tmp, "PNG"))
    distributed.barrier()
    return paths


class DreamBoothTrainer(nn.Module):
    default_ema_decay = 0.0

    def __init__(self, config: TrainConfig, model: ModelConfig, unet: nn.Module, vae: nn.Module,
                 text_encoder: nn.Module, class_paths: Optional[list[Path]]):
        super().__init__()
        options: DreamBoothOptions = config.options
        self.config, self.options, self.model_config = config, options, model
        self.resolution = model.resolution
        self.vae = vae.eval().requires_grad_(False)
        self.unet = unet
        self.text_encoder = text_encoder.requires_grad_(options.train_text_encoder)
        if not options.train_text_encoder:
            self.text_encoder.eval()
        parts = {"unet": unet, "text_encoder": text_encoder} if options.train_text_encoder else {"unet": unet}
        self.model = nn.ModuleDict(parts)
        self.trained = nn.ModuleDict({"dreambooth": self.model})
        self.class_paths = class_paths
        self.register_buffer("alphas_cumprod", alphas_cumprod(model.schedule), persistent=False)

    def class_batch(self, batch: Batch) -> torch.Tensor:
        """The class images for this slice: class image n mod N for sample number n, as data.py numbers
        samples, so every rank and a resumed run see the same ones."""
        first = batch.step * batch.global_size + batch.start
        size = self.config.resolution or self.resolution
        images = []
        for n in range(first, first + batch.size):
            with Image.open(self.class_paths[n % len(self.class_paths)]) as image:
                images.append(to_tensor(resize_and_crop(image.convert("RGB"), size, "center", np.random.default_rng(0))))
        return torch.stack(images).to(batch.images.device)

    def term(self, images: torch.Tensor, prompt: str, batch: Batch) -> torch.Tensor:
        options: DreamBoothOptions = self.options
        latents = encode_latents(self.vae, images, batch, self.model_config.vae.scaling_factor)
        with torch.set_grad_enabled(options.train_text_encoder and torch.is_grad_enabled()):
            text_embeddings = encode_text(self.text_encoder, self.model_config, [prompt] * len(images), images.device)
        return noised_prediction_loss(self.unet, latents, text_embeddings, batch, self.alphas_cumprod,
                                      self.model_config.prediction).mean()

    def loss(self, batch: Batch):
        options: DreamBoothOptions = self.options
        instance = self.term(batch.images, options.instance_prompt, batch)
        if self.class_paths is None:
            return instance, {"instance": instance.detach()}
        prior = self.term(self.class_batch(batch), options.class_prompt, batch)
        return instance + options.prior_loss_weight * prior, {"instance": instance.detach(), "prior": prior.detach()}

    @torch.no_grad()
    def validate(self, model: nn.Module, examples, step: int, out_dir: Path) -> None:
        prompts = list(self.options.validation_prompts) or [self.options.instance_prompt]
        text_encoder = model["text_encoder"] if "text_encoder" in model else self.text_encoder
        validation_grid(self.model_config, model["unet"], self.vae, text_encoder, prompts,
                        self.config.resolution or self.resolution, self.options.validation_steps, self.config.seed,
                        Path(out_dir) / f"step-{step:06d}.png")

    def save(self, out_dir: Path, model: nn.Module, data) -> Path:
        text_encoder = model["text_encoder"] if "text_encoder" in model else self.text_encoder
        return components.save_model(out_dir, self.model_config, self.config,
                                     {"unet": model["unet"], "vae": self.vae, "text_encoder": text_encoder})


def build(config: TrainConfig, device: torch.device) -> DreamBoothTrainer:
    options: DreamBoothOptions = config.options
    if options.class_prompt is not None and options.class_images < 1:
        raise ConfigError(f"dreambooth.class_images must be at least 1 with a class_prompt, got {options.class_images}")
    if options.prior_loss_weight < 0:
        raise ConfigError(f"dreambooth.prior_loss_weight must not be negative, got {options.prior_loss_weight}")
    base = load_base(config, "dreambooth")
    unet, vae, text_encoder = base.unet.to(device), base.vae.to(device), base.text_encoder.to(device)
    class_paths = None
    if options.class_prompt is not None:
        from ..samplers import resolve_sampler

        resolve_sampler(options.class_sampler)
        class_paths = generate_class_images(Path(config.out_dir) / CLASS_FOLDER, options.class_images, base.config,
                                            unet.eval(), vae.eval(), text_encoder.eval(), options,
                                            config.resolution or base.config.resolution, config.seed)
    return DreamBoothTrainer(config, base.config, unet, vae, text_encoder, class_paths).to(device)
