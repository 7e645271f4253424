"""Image to image (SDEdit, Meng et al. 2022): encode the image, noise it part-way, denoise the rest.

`strength` is the fraction of the schedule that is run again: the init latents are noised to the
sigma of step steps - int(steps * strength) and sampled from there, as diffusers' img2img does.
"""

from __future__ import annotations

from typing import Optional

from .common import GenerationResult, Pipeline, Start, check_size, generate
from .images import RESIZE_MODES, load_image, resize_image, resize_mode_key, to_pixels


def working_size(pipe: Pipeline, image_size: tuple[int, int], width: Optional[int], height: Optional[int]):
    """(width, height) to generate at: as given; else the image's size, or the other side's scale when one
    is given, rounded down to sides the UNet takes (8 px for SD; pipe.size_multiple)."""
    factor = pipe.size_multiple
    w, h = image_size
    if width is None and height is None:
        width, height = w, h
    elif width is None:
        width = round(w * height / h)
    elif height is None:
        height = round(h * width / w)
    else:
        check_size(width, height, pipe.latent_factor)
        return width, height
    return max(factor, width - width % factor), max(factor, height - height % factor)


def img2img(
    pipe: Pipeline,
    prompt,
    init_image,
    negative_prompt="",
    *,
    strength: float = 0.75,
    resize_mode: str = "just",
    width: Optional[int] = None,
    height: Optional[int] = None,
    **options,
) -> GenerationResult:
    """Repaint `init_image` (a PIL image or a file) towards `prompt`.

    strength: 0 keeps the image (decoded after one VAE round trip), 1 repaints from noise that still
    carries a trace of it. resize_mode: how the image meets width x height ('just', 'crop', 'fill';
    images.resize_image). Every txt2img option works too (steps, guidance_scale, seed, batch_size,
    sampler, noise, latents, clip_skip, eta, callback); `latents` replace the noise added to the image.
    """
    image = load_image(init_image, "init image")
    mode = resize_mode_key(resize_mode)
    width, height = working_size(pipe, image.size, width, height)
    pixels = to_pixels(resize_image(image, width, height, mode))
    resized = image.size != (width, height)  # the mode only matters then, so only then is it recorded
    params = {"Denoising strength": strength, "Resize mode": RESIZE_MODES[mode] if resized else None}
    return generate(pipe, prompt, negative_prompt, width=width, height=height, strength=strength,
                    prepare=lambda run: Start(init_latents=run.encode(pixels)), params=params, **options)

