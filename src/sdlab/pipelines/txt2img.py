"""Text to image: noise -> denoising loop guided by the prompt -> VAE decode (run.generate as it is)."""

from __future__ import annotations

from .options import read_options
from .pipeline import GenerationResult, Pipeline
from .run import generate


def txt2img(pipe: Pipeline, prompt, negative_prompt="", **settings) -> GenerationResult:
    """Generate `batch_size` images for `prompt` (a string, or one per image).

    `settings`: the fields of options.GenerationOptions (steps, guidance_scale, seed, width, height,
    batch_size, sampler, noise, latents, clip_skip, eta, callback, loras, lora_dirs, lora_mode, tiled_vae,
    subseed, subseed_strength, seed_resize_from, n_iter). With the default noise, "per-image", image i of a
    batch is the image of seed + i alone, so each image's parameters make it again.
    `latents` replaces the seeded initial noise (B, C, H/f, W/f), standard normal; `callback` gets the
    sampler's step dict ({'i', 'total', 'sigma', 'x', 'denoised'}) after every step. An inpainting
    checkpoint (9 input channels) paints the whole canvas, its mask all ones. LoRAs: `loras`
    ([file | (file, weight)]) and `<lora:name:weight>` tags in the prompt (files found by stem in
    `lora_dirs`), merged into the weights or applied on the fly (`lora_mode` "merge" | "dynamic").
    """
    (options,) = read_options("txt2img", prompt, negative_prompt, settings)
    return generate(pipe, options)
