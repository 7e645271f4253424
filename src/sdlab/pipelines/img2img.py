"""Image to image (SDEdit, Meng et al. 2022): encode the image, noise it part-way, denoise the rest.

`strength` is the fraction of the schedule that is run again: the init latents are noised to the
sigma of step steps - int(steps * strength) and sampled from there, as diffusers' img2img does.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from .checks import check_side, check_size
from .images import RESIZE_MODES, load_image, resize_image, resize_mode_key, to_pixels
from .options import EditOptions, read_options
from .pipeline import GenerationResult, Pipeline
from .run import Start, generate


def working_size(pipe: Pipeline, image_size: tuple[int, int], width: Optional[int], height: Optional[int]):
    """(width, height) to generate at: as given; else the image's size, or the other side's scale when one
    is given, rounded down to sides the UNet takes (8 px for SD; pipe.size_multiple)."""
    factor = pipe.size_multiple
    w, h = image_size
    for name, value in (("width", width), ("height", height)):
        if value is not None:
            check_side(name, value)
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


def img2img(pipe: Pipeline, prompt, init_image, negative_prompt="", **settings) -> GenerationResult:
    """Repaint `init_image` (a PIL image or a file) towards `prompt`.

    `settings`: options.EditOptions' strength (0 keeps the image, decoded after one VAE round trip; 1
    repaints from noise that still carries a trace of it) and resize_mode (how the image meets width x
    height: 'just', 'crop', 'fill'; images.resize_image), and every txt2img option (GenerationOptions);
    width and height default to the image's size, and `latents` replace the noise added to the image.
    """
    options, edit = read_options("img2img", prompt, negative_prompt, settings, EditOptions)
    image = load_image(init_image, "init image")
    mode = resize_mode_key(edit.resize_mode)
    width, height = working_size(pipe, image.size, options.width, options.height)
    pixels = to_pixels(resize_image(image, width, height, mode))
    resized = image.size != (width, height)  # the mode only matters then, so only then is it recorded
    params = {"Denoising strength": edit.strength, "Resize mode": RESIZE_MODES[mode] if resized else None}
    return generate(pipe, dataclasses.replace(options, width=width, height=height), strength=edit.strength,
                    prepare=lambda run: Start(init_latents=run.encode(pixels)), params=params)
