"""Outpainting: a bigger canvas around the image, its new margins inpainted.

The margins start as the image's edge pixels stretched outwards plus a little seeded noise, so the
denoiser begins from the right colours without copying the stripes; the mask covers the margins and
`overlap` px of the image next to them, so the seam is generated too.
"""

from __future__ import annotations

import dataclasses

import torch
from PIL import Image

from ..errors import InputError
from .images import load_image, pad_by_stretching, tensor_to_mask, to_pixels
from .inpaint import inpaint_image
from .options import EditOptions, GenerationOptions, MaskOptions, OutpaintOptions, read_options
from .pipeline import GenerationResult, Pipeline
from .run import over_batches

SIDES = ("left", "right", "top", "bottom")
MARGIN_NOISE = 0.1  # std of the Gaussian noise on the stretched margins, in [-1, 1] pixel units


def parse_extend(extend) -> dict[str, int]:
    """{"left": 64, ...} or "left=64,bottom=64" -> pixels for all four sides; missing sides are 0."""
    if isinstance(extend, str):
        pairs = {}
        for item in filter(None, (part.strip() for part in extend.split(","))):
            side, _, value = item.partition("=")
            try:
                pairs[side.strip().lower()] = int(value)
            except ValueError:
                raise InputError(f"extend must look like left=64,right=0,top=0,bottom=64, got '{extend}'") from None
        extend = pairs
    if not isinstance(extend, dict):
        raise InputError(f"extend must be a dict of sides to pixels, e.g. {{'left': 64}}, got {extend!r}")
    unknown = set(extend) - set(SIDES)
    if unknown:
        raise InputError(f"unknown side(s) {', '.join(sorted(map(str, unknown)))}; use left, right, top, bottom")
    sides = {side: extend.get(side, 0) for side in SIDES}
    for side, value in sides.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"extend {side} must be 0 or more pixels, got {value!r}")
    if not any(sides.values()):
        raise InputError("extend at least one side by some pixels, e.g. left=64")
    return sides


def round_canvas(size: tuple[int, int], sides: dict[str, int], factor: int) -> dict[str, int]:
    """Grow the extension until the canvas is a multiple of `factor` each way. The extra pixels go to
    the side being extended (right or bottom when both or neither are), so the image is never scaled."""
    sides = dict(sides)
    for length, (before, after) in zip(size, (("left", "right"), ("top", "bottom"))):
        short = -(length + sides[before] + sides[after]) % factor
        sides[before if sides[before] and not sides[after] else after] += short
    return sides


def outpaint_mask(image_size: tuple[int, int], sides: dict[str, int], overlap: int) -> torch.Tensor:
    """(H, W) on the extended canvas: 1 on the new margins and on `overlap` px of the image along each
    extended side, 0 on the rest of the image."""
    width = image_size[0] + sides["left"] + sides["right"]
    height = image_size[1] + sides["top"] + sides["bottom"]
    x1, y1 = sides["left"], sides["top"]
    x2, y2 = x1 + image_size[0], y1 + image_size[1]
    # shrink the kept part of the image by the overlap on the sides that grow
    x1, x2 = x1 + (overlap if sides["left"] else 0), x2 - (overlap if sides["right"] else 0)
    y1, y2 = y1 + (overlap if sides["top"] else 0), y2 - (overlap if sides["bottom"] else 0)
    mask = torch.ones(height, width)
    if x1 < x2 and y1 < y2:
        mask[y1:y2, x1:x2] = 0
    return mask


def outpaint(pipe: Pipeline, prompt, init_image, negative_prompt="", **settings) -> GenerationResult:
    """Extend `init_image` by `extend` px per side ({"left": 64, ...} or "left=64,bottom=64") and paint
    the new area for `prompt`. The result is the canvas rounded up to sides the UNet takes
    (pipe.size_multiple: 8 px for SD) with the image at offset (left, top), unscaled. `settings`: the
    fields of options.OutpaintOptions (extend, overlap, strength), MaskOptions (fill, invert_mask,
    only_masked, ...) and GenerationOptions but width and height.
    """
    for name in ("width", "height", "resize_mode", "params"):
        if name in settings:
            raise InputError(f"outpaint sets {name} itself from the image and the extension")
    options, outpainting, masking = read_options("outpaint", prompt, negative_prompt, settings,
                                                 OutpaintOptions, MaskOptions)
    image = load_image(init_image, "init image")
    overlap = outpainting.overlap
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise InputError(f"overlap must be 0 or more pixels, got {overlap!r}")
    sides = round_canvas(image.size, parse_extend(outpainting.extend), pipe.size_multiple)
    return over_batches(options, lambda batch: outpaint_batch(pipe, image, sides, batch, outpainting, masking))


def outpaint_batch(pipe: Pipeline, image: Image.Image, sides: dict[str, int], options: GenerationOptions,
                   outpainting: OutpaintOptions, masking: MaskOptions) -> GenerationResult:
    """outpaint() of one batch, its seed resolved (over_batches): the margins' noise is seeded with it."""
    seed, overlap = options.seed, outpainting.overlap
    canvas = pad_by_stretching(image, sides["left"], sides["right"], sides["top"], sides["bottom"])
    width, height = canvas.size

    margins = outpaint_mask(image.size, sides, 0)
    noise = torch.randn((1, 3, height, width), generator=torch.Generator("cpu").manual_seed(seed))
    pixels = (to_pixels(canvas) + MARGIN_NOISE * noise * margins).clamp(-1, 1)
    start = Image.fromarray(((pixels[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    mask = outpaint_mask(image.size, sides, overlap)

    fields = {"Outpaint extend": ",".join(f"{side}={sides[side]}" for side in SIDES), "Outpaint overlap": overlap}
    options = dataclasses.replace(options, width=width, height=height, seed=seed)
    return inpaint_image(pipe, start, tensor_to_mask(mask), options, EditOptions(strength=outpainting.strength),
                         masking, params=fields)
