"""Super-resolution with the Stable Diffusion x4 upscaler (`x4-upscaler-ema.safetensors`).

A latent diffusion model whose latents have the size of the *low-resolution* image (its VAE has three
levels: a factor of 4) and whose UNet sees, beside the latents, that image itself as three extra input
channels (`concat`). The image is first noised to `noise_level` with a DDPM schedule of its own, and the
UNet is told the level through a class embedding (`y`, 1000 classes): noise augmentation (Ho et al.
2022, "Cascaded Diffusion Models", sec. 3.2) lets the model repair artefacts of the input instead of
copying them. Numbers from Stability's `configs/stable-diffusion/x4-upscaling.yaml`; the order of the
random draws from diffusers' StableDiffusionUpscalePipeline (image noise first, then the latents).
"""

from __future__ import annotations

import dataclasses

import torch

from ..checkpoint.detect import X4_SCALING_FACTOR, X4_SCHEDULE
from ..config import OPEN_CLIP_H, ModelConfig, ScheduleConfig, UNetConfig, VAEConfig
from ..errors import InputError
from ..schedules import alphas_cumprod
from .images import load_image, to_pixels
from .latents import with_tiled_vae
from .options import UpscaleOptions, read_options
from .pipeline import GenerationResult, Pipeline
from .run import Run, Start, generate, vae_tiling

# x4-upscaling.yaml: 1000 noise-level classes (only 0..350 trained), attention at 2x, 4x and 8x
# downsampling (levels 1-3), cross-attention only on levels 1 and 2 (the yaml also flags level 0, which
# has no transformer: nothing in the weights says so), a 3-level VAE, v-prediction, and the latent
# scale and training schedule that checkpoint detection falls back to for this family.
X4_UPSCALER = ModelConfig(
    name="sd2-x4-upscaler",
    unet=UNetConfig(in_channels=7, out_channels=4, model_channels=256, channel_mult=(1, 2, 2, 4),
                    num_res_blocks=2, attention_levels=(1, 2, 3), num_heads=8, context_dim=1024,
                    use_linear_projection=True, num_classes=1000,
                    disable_self_attention=(False, True, True, False)),
    vae=VAEConfig(ch_mult=(1, 2, 4), scaling_factor=X4_SCALING_FACTOR),
    text=OPEN_CLIP_H,
    schedule=X4_SCHEDULE,
    prediction="v",
    resolution=512,
)

# The low-resolution image's noise augmentation (`low_scale_config` in x4-upscaling.yaml; diffusers'
# `low_res_scheduler`): its own DDPM schedule, noise levels 0..350.
LOW_RES_SCHEDULE = ScheduleConfig(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02)
MAX_NOISE_LEVEL = 350
SCALE = 4  # the x4 upscaler's output is its VAE's factor times the input


def is_upscaler(config: ModelConfig) -> bool:
    """A UNet conditioned on a noise level (`num_classes`) and on 3 image channels beside the latents."""
    return config.unet.num_classes is not None and config.unet.in_channels == config.latent_channels + 3


def check_upscaler(pipe: Pipeline) -> None:
    if not is_upscaler(pipe.config):
        unet = pipe.config.unet
        raise InputError(
            f"{pipe.model_name} ({pipe.config.name}) is not an x4 upscaler: its UNet takes {unet.in_channels} input "
            f"channels{'' if unet.num_classes else ' and no noise level'}; load the SD x4 upscaler "
            "(x4-upscaler-ema.safetensors or a stable-diffusion-x4-upscaler diffusers folder)"
        )


def check_noise_level(noise_level) -> int:
    if isinstance(noise_level, bool) or not isinstance(noise_level, int) or not 0 <= noise_level <= MAX_NOISE_LEVEL:
        raise InputError(
            f"noise level must be an integer from 0 to {MAX_NOISE_LEVEL} (the levels the upscaler was trained on; "
            f"20 is the usual, more repairs more artefacts and invents more), got {noise_level!r}"
        )
    return noise_level


def noise_low_res(pixels: torch.Tensor, noise: torch.Tensor, noise_level: int) -> torch.Tensor:
    """q(x_t | x_0) at t = noise_level of the augmentation schedule: sqrt(a_t) x + sqrt(1 - a_t) noise
    (ldm's `q_sample`, diffusers' `DDPMScheduler.add_noise`), in float32 as both compute it."""
    a = alphas_cumprod(LOW_RES_SCHEDULE)[noise_level]
    return a.sqrt() * pixels + (1 - a).sqrt() * noise


def low_res_pixels(image) -> torch.Tensor:
    """(N, 3, h, w) in [-1, 1] from one image or a list (any PIL mode or file; converted to RGB). Any size:
    the latents have the image's size, and the UNet takes any latent size."""
    images = [load_image(item, "image to upscale") for item in (image if isinstance(image, (list, tuple)) else [image])]
    if not images:
        raise InputError("no image to upscale")
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise InputError(f"the images of one batch must have the same size, got {sorted(sizes)}")
    return torch.cat([to_pixels(im) for im in images])


@torch.no_grad()
def upscale(pipe: Pipeline, image, prompt, negative_prompt="", **settings) -> GenerationResult:
    """Images 4 times larger than `image` (a PIL image, a file, or a list of them: one per batch item).

    `settings`: options.UpscaleOptions' noise_level (0..350, how much the input is noised before the
    model sees it; diffusers' default 20) and GenerationOptions but width, height and batch_size, which
    the images give. prompt: what the image shows (one text, or one per image); it guides the details
    the model adds. guidance_scale defaults to 9, diffusers' default for this model. tiled_vae: decode
    in tiles (True), not (False), or above a megapixel (None). `latents` replace the initial noise.
    """
    for name in ("width", "height", "batch_size"):
        if name in settings:
            raise InputError(f"upscale sets {name} itself: 4 times the image's size, one image per input image")
    settings = {"guidance_scale": 9.0, **settings}  # diffusers' default for this model
    options, upscaling = read_options("upscale", prompt, negative_prompt, settings, UpscaleOptions)
    check_upscaler(pipe)
    noise_level = check_noise_level(upscaling.noise_level)
    pixels = low_res_pixels(image)
    batch_size, _, height, width = pixels.shape
    tiled = with_tiled_vae(pipe, vae_tiling(options), width * SCALE, height * SCALE, batch_size)

    def prepare(run: Run) -> Start:
        # diffusers draws the image's noise from the pipeline's generator before the latents; the other
        # noise modes have no upscaler to follow and draw it from a CPU generator seeded with the seed
        eps = run.draws.posterior(pixels.shape)
        if eps is None:
            eps = torch.randn(pixels.shape, generator=torch.Generator("cpu").manual_seed(run.seed))
        noised = noise_low_res(pixels, eps, noise_level)
        return Start(conditioning={"concat": noised, "y": torch.full((batch_size,), noise_level, dtype=torch.long)})

    options = dataclasses.replace(options, width=width * SCALE, height=height * SCALE, batch_size=batch_size)
    return generate(tiled, options, prepare=prepare, params={"Noise level": noise_level})
