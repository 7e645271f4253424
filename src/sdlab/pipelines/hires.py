"""Hires fix (the web UI's "Hires. fix"): generate at the model's native size, enlarge, then repaint
the enlarged image part-way at the larger size.

A model asked for twice its training resolution repeats its subject across the canvas; composed at
the native size and only refined at the large one, it keeps one composition and gains detail. The
enlargement is either of the latents ("Latent": bilinear, or nearest-exact, interpolation of the
latents) or of the decoded pixels ("Lanczos", then encoded again). The second pass is img2img with
the web UI's step rule: `hires_steps` steps are run, the last ones of a schedule of
int(hires_steps / strength) steps, so "Hires steps: N" in the parameters means N steps run.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError
from .checks import check_steps, check_strength, size_or_default
from .images import to_pixels
from .latents import with_tiled_vae
from .options import GenerationOptions, HiresOptions, read_options
from .pipeline import GenerationResult, Pipeline
from .run import Run, Start, generate, over_batches, vae_tiling

# sdlab name -> (the web UI's "Hires upscaler" name, torch interpolation mode; None: in pixel space)
HIRES_UPSCALERS = {
    "latent": ("Latent", "bilinear"),
    "latent-nearest-exact": ("Latent (nearest-exact)", "nearest-exact"),
    "lanczos": ("Lanczos", None),
}


def hires_upscaler_key(name: str) -> str:
    """'latent' | 'latent-nearest-exact' | 'lanczos', from sdlab's name or the web UI's, any case."""
    text = str(name).strip().lower()
    for key, (label, _) in HIRES_UPSCALERS.items():
        if text in (key, label.lower()):
            return key
    known = ", ".join(f"{key} ({label})" for key, (label, _) in HIRES_UPSCALERS.items())
    raise InputError(f"unknown hires upscaler '{name}'; choose one of: {known}")


def hires_size(width: int, height: int, scale, multiple: int) -> tuple[int, int]:
    """The web UI's target size, int(side * scale), which must stay on the VAE's grid."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1 <= scale <= 8:
        raise InputError(f"hires scale must be a number from 1 to 8, got {scale!r}")
    target = (int(width * scale), int(height * scale))
    if target[0] % multiple or target[1] % multiple:
        raise InputError(
            f"hires scale {scale:g} makes {width}x{height} into {target[0]}x{target[1]}, not multiples of "
            f"{multiple} px; pick a scale that does (2, 1.5 for sides that are multiples of {2 * multiple}, ...)"
        )
    return target


def second_pass_steps(hires_steps: int, strength: float, max_steps: int) -> tuple[int, float]:
    """(schedule length, strength) for `generate` so that exactly `hires_steps` steps run.

    The web UI (`setup_img2img_steps`) schedules int(N / min(strength, 0.999)) steps and runs the last N.
    `generate` runs int(steps * strength) of `steps`; (N + 1/2) / steps gives N whatever the rounding.
    """
    if strength == 0:
        return hires_steps, 0.0
    total = int(hires_steps / min(strength, 0.999))
    if total > max_steps:
        raise InputError(
            f"{hires_steps} hires steps at denoising strength {strength:g} need a {total}-step schedule, more "
            f"than the model's {max_steps} timesteps; raise the strength or lower the hires steps"
        )
    return total, (1.0 if total == hires_steps else (hires_steps + 0.5) / total)


def upscale_latents(latents: torch.Tensor, width: int, height: int, factor: int, mode: str) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, height / factor, width / factor), as the web UI's latent upscalers do
    (torch interpolation, no antialiasing)."""
    return F.interpolate(latents.float(), size=(height // factor, width // factor), mode=mode, antialias=False)


@torch.no_grad()
def hires_fix(pipe: Pipeline, prompt, negative_prompt="", **settings) -> GenerationResult:
    """txt2img at width x height (the model's size by default), then `hires_steps` (default: `steps`)
    steps of img2img at `hires_scale` times the size with denoising strength `hires_strength`.

    `settings`: the fields of options.HiresOptions and GenerationOptions. hires_upscaler: 'latent'
    (bilinear), 'latent-nearest-exact' or 'lanczos' (pixels, re-encoded). Both passes share the seed
    and the options (guidance_scale, batch_size, sampler, schedule_type, tiling, noise, clip_skip, eta, loras, ...); `latents`
    replace the first pass's noise. `callback` gets each step's dict with "pass": 1 or 2. tiled_vae:
    as in upscale(); checked for the large size before anything runs.
    The parameters written are the first pass's with the web UI's hires fields added. n_iter batches
    run both passes one after another.
    """
    options, hires = read_options("hires_fix", prompt, negative_prompt, settings, HiresOptions)
    return over_batches(options, lambda batch: hires_batch(pipe, batch, hires))


def hires_batch(pipe: Pipeline, options: GenerationOptions, hires: HiresOptions) -> GenerationResult:
    """hires_fix() of one batch, its seeds resolved (over_batches)."""
    key = hires_upscaler_key(hires.hires_upscaler)
    label, mode = HIRES_UPSCALERS[key]
    width, height = size_or_default(pipe, options.width, options.height)
    target_width, target_height = hires_size(width, height, hires.hires_scale, pipe.latent_factor)
    check_steps(options.steps)
    hires_steps = options.steps if hires.hires_steps is None else hires.hires_steps
    check_steps(hires_steps)
    check_strength(hires.hires_strength)
    total, strength = second_pass_steps(hires_steps, hires.hires_strength, pipe.config.schedule.num_train_timesteps)
    seed = options.seed
    tiled = with_tiled_vae(pipe, vae_tiling(options), target_width, target_height, options.batch_size)
    callback = options.callback

    def in_pass(number: int):
        return None if callback is None else (lambda info: callback({**info, "pass": number}))

    params = {"Denoising strength": hires.hires_strength, "Hires upscale": hires.hires_scale,
              "Hires steps": hires_steps, "Hires upscaler": label}
    first = generate(tiled, dataclasses.replace(options, seed=seed, width=width, height=height, callback=in_pass(1)),
                     params=params)

    if mode is not None:
        enlarged = upscale_latents(first.latents.cpu(), target_width, target_height, pipe.latent_factor, mode)
        prepare = lambda run: Start(init_latents=enlarged)  # noqa: E731
    else:
        pixels = torch.cat([to_pixels(image.resize((target_width, target_height), Image.Resampling.LANCZOS))
                            for image in first.images])

        def prepare(run: Run) -> Start:
            return Start(init_latents=run.encode(pixels))

    second_pass = dataclasses.replace(options, steps=total, seed=seed, width=target_width, height=target_height,
                                      latents=None, callback=in_pass(2))
    second = generate(tiled, second_pass, strength=strength, prepare=prepare)
    return GenerationResult(second.images, first.infotexts, first.seeds, second.latents)
