"""`sdlab train upscale`: a super-resolution latent diffusion model of the SD x4 upscaler's design
(Stability's x4-upscaling.yaml; pipelines/upscale.py runs the result).

The latents of the full-size image have the size of the low-resolution one: the training image
downsampled by the VAE's factor, which must be 4 (the x4 upscaler's 3-level VAE; SD 1.x/2.x's VAE is 8x). The UNet sees
that small image as 3 extra input channels beside the noisy latents (`concat`), after noise
augmentation: it is noised to a random level t in [0, max_noise_level] of its own DDPM schedule
(pipelines/upscale.LOW_RES_SCHEDULE), and t is the class label `y` of the UNet's noise-level embedding
(Ho et al. 2022, "Cascaded Diffusion Models", section 3.2: the model learns to repair, not copy, its
input). The loss is the noise-prediction MSE of the full-size latents.

With `upscale.crop` the trainer cuts a random window of each full-size image first, as Stability
trained the x4 upscaler on 512 px crops: the model learns the scale of large images at the cost of
small ones, and, being convolutional, runs on the whole image afterwards.

The UNet grows from --base's: its first convolution gets 3 more input channels and the label
embedding is added, both zero-initialised, so training starts from the text-to-image model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from ..models import build_unet
from ..pipelines.upscale import LOW_RES_SCHEDULE
from ..schedules import alphas_cumprod
from . import components
from .config import TrainConfig, UpscaleOptions
from .data import Batch
from .diffusion import drop_captions, encode_latents, encode_text, noised_prediction_loss
from .lora import load_base
from .plots import image_grid, tensor_to_image
from .unet import UNetFamilyTrainer

IMAGE_CHANNELS = 3
UPSCALE_FACTOR = 4  # pipelines/upscale.py's SCALE: output side / input side, which is the VAE's factor


def upscaler_unet(base_unet: nn.Module, model: ModelConfig, options: UpscaleOptions) -> tuple[nn.Module, ModelConfig]:
    """The base UNet with in_channels = latent channels + 3 and a `noise_levels`-class label embedding,
    the new weights zero; an upscaler's UNet (those channels and classes already) is fine-tuned as it is."""
    unet_config = model.unet
    if (unet_config.in_channels == unet_config.out_channels + IMAGE_CHANNELS
            and unet_config.num_classes == options.noise_levels):
        return base_unet, model
    if unet_config.in_channels != unet_config.out_channels or unet_config.num_classes is not None:
        raise ConfigError(f"--base's UNet takes {unet_config.in_channels} channels (num_classes "
                          f"{unet_config.num_classes}); the upscaler grows from a text-to-image UNet")
    unet_config = dataclasses.replace(unet_config, in_channels=unet_config.out_channels + IMAGE_CHANNELS,
                                      num_classes=options.noise_levels)
    model = model.replace(unet=unet_config, name=f"{model.name}-upscaler")
    unet = build_unet(unet_config)
    state = base_unet.state_dict()
    first = state["input_blocks.0.0.weight"]  # (C, 4, 3, 3)
    grown = torch.zeros(first.shape[0], unet_config.in_channels, *first.shape[2:], dtype=first.dtype)
    grown[:, :first.shape[1]] = first
    state["input_blocks.0.0.weight"] = grown
    state["label_emb.weight"] = torch.zeros_like(unet.label_emb.weight)
    unet.load_state_dict(state, strict=True)
    return unet, model


def low_resolution(images: torch.Tensor, factor: int) -> torch.Tensor:
    """(b, 3, H / factor, W / factor): the mean of each factor x factor block (area downsampling)."""
    return F.avg_pool2d(images, factor)


def random_crops(images: torch.Tensor, size: int, batch: Batch) -> torch.Tensor:
    """(b, 3, size, size): a window of each image at an offset drawn from the batch (2 randint draws)."""
    height, width = images.shape[-2:]
    tops, lefts = batch.randint(height - size + 1), batch.randint(width - size + 1)
    return torch.stack([image[:, top:top + size, left:left + size]
                        for image, top, left in zip(images, tops.tolist(), lefts.tolist())])


class UpscaleTrainer(UNetFamilyTrainer):
    default_ema_decay = 0.0

    def __init__(self, config: TrainConfig, model: ModelConfig, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module):
        super().__init__(config, model, unet, vae, text_encoder)
        self.register_buffer("low_res_alphas_cumprod", alphas_cumprod(LOW_RES_SCHEDULE), persistent=False)

    def conditioning(self, images: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(noised low-res image (b, 3, h, w), noise levels (b,)). Draws batch.randint, then batch.randn."""
        low = low_resolution(images, self.model_config.vae.downsample_factor)
        levels = batch.randint(self.options.max_noise_level + 1)
        eps = batch.randn(*low.shape[1:]).to(low.dtype)
        a = self.low_res_alphas_cumprod[levels].view(-1, 1, 1, 1)
        return a.sqrt() * low + (1 - a).sqrt() * eps, levels

    def loss(self, batch: Batch):
        if self.options.crop is not None:
            batch = dataclasses.replace(batch, images=random_crops(batch.images, self.options.crop, batch))
        latents = encode_latents(self.vae, batch.images, batch, self.model_config.vae.scaling_factor)
        concat, levels = self.conditioning(batch.images, batch)
        captions = drop_captions(batch.captions, batch, self.options.caption_dropout)
        with torch.no_grad():
            text_embeddings = encode_text(self.text_encoder, self.model_config, captions, batch.images.device)
        per_sample = noised_prediction_loss(self.model, latents, text_embeddings, batch, self.alphas_cumprod,
                                            self.model_config.prediction, concat=concat, y=levels)
        return per_sample.mean(), {}

    @torch.no_grad()
    def validate(self, model: nn.Module, examples, step: int, out_dir: Path) -> None:
        """Low-res input, the model's upscaling and the original, per validation image."""
        from ..pipelines.pipeline import Pipeline
        from ..pipelines.upscale import upscale

        device = next(model.parameters()).device
        pipe = Pipeline(self.model_config, model, self.vae, self.text_encoder, device, torch.float32)
        pictures, labels = [], []
        for image, caption in examples[:2]:
            low = tensor_to_image(low_resolution(image[None], self.model_config.vae.downsample_factor)[0])
            result = upscale(pipe, low, caption or "a picture", steps=20, seed=self.config.seed, noise_level=20)
            pictures += [low.resize(result.images[0].size), result.images[0], tensor_to_image(image)]
            labels += ["input", "upscaled", "original"]
        image_grid(pictures, columns=3, labels=labels).save(Path(out_dir) / f"step-{step:06d}.png")


def build(config: TrainConfig, device: torch.device) -> UpscaleTrainer:
    options: UpscaleOptions = config.options
    if not 0 <= options.max_noise_level < options.noise_levels:
        raise ConfigError(f"upscale.max_noise_level must be in [0, noise_levels - 1 = {options.noise_levels - 1}], "
                          f"got {options.max_noise_level}")
    if not 0 <= options.caption_dropout <= 1:
        raise ConfigError(f"upscale.caption_dropout must be in [0, 1], got {options.caption_dropout}")
    base = load_base(config, "upscale")
    factor = base.config.vae.downsample_factor
    resolution = config.resolution or base.config.resolution
    if options.crop is not None and not (factor <= options.crop <= resolution and options.crop % factor == 0):
        raise ConfigError(f"upscale.crop must be a multiple of the VAE's factor {factor} between {factor} and the "
                          f"training resolution {resolution}, got {options.crop}")
    if factor != UPSCALE_FACTOR:
        raise ConfigError(f"--base's VAE shrinks images {factor}x; the x4 upscaler's latents have the size of the 4x "
                          "smaller input, so it needs a VAE with a factor of 4 (3 levels, like the SD x4 upscaler's)")
    unet, model = upscaler_unet(base.unet, base.config, options)
    return UpscaleTrainer(config, model, unet, base.vae, base.text_encoder).to(device)
