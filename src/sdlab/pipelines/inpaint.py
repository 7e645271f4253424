"""Inpainting: repaint the white part of a mask, keep the rest.

Two ways, chosen by the checkpoint:
- inpainting UNets (9 input channels: SD 1.5/2 inpainting) see the task. Their extra input is
  [mask (1 channel, at latent size), masked-image latents (4)] after the noisy latents, the order
  SD's inpainting models were trained with (diffusers' StableDiffusionInpaintPipeline concatenates
  latents, mask, masked_image_latents); the masked image is the image with the masked pixels set
  to 0 (grey in [-1, 1]) and the mask binarised at 1/2.
- any other UNet generates everywhere, and before each step the original latents, noised to the
  step's sigma, are put back outside the mask (masks.KeepOutsideMask), as diffusers does for
  4-channel UNets (RePaint-style blending without resampling, Lugmayr et al. 2022).
Either way the decoded image is pasted over the original through the blurred mask, so pixels the
blurred mask does not reach come back unchanged, as in the web UI.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import InputError
from .checks import size_or_default
from .images import (
    RESIZE_MODES, blur_mask, composite, crop_region, expand_to_aspect, fill_masked, load_image, load_mask,
    mask_to_tensor, resize_image, resize_mode_key, tensor_to_mask, to_pixels,
)
from .img2img import working_size
from .options import EditOptions, GenerationOptions, MaskOptions, read_options
from .pipeline import GenerationResult, Pipeline
from .run import Start, generate

# The web UI's "Masked content" (`inpainting_fill`), by its names.
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")


def masked_content_key(fill: str) -> str:
    text = str(fill).strip().lower().replace("-", " ").replace("_", " ")
    if text not in MASKED_CONTENT:
        raise InputError(f"unknown masked content '{fill}'; choose original (the image as it is), fill (its "
                         "surrounding colours, blurred), latent noise or latent nothing")
    return text


def overlay_alpha(blurred: torch.Tensor) -> torch.Tensor:
    """How much of the generated image shows: the blurred mask doubled and clipped (the web UI's
    overlay), so the generated content fills the painted area and fades out beyond its edge."""
    return (2 * blurred).clamp(0, 1)


def inpaint(pipe: Pipeline, prompt, init_image, mask, negative_prompt="", **settings) -> GenerationResult:
    """Repaint the white area of `mask` in `init_image` (PIL images or files) towards `prompt`.

    `settings`: the fields of options.MaskOptions, EditOptions and GenerationOptions.
    mask_blur: Gaussian sigma in px for the mask's edge. invert_mask: repaint the black area instead.
    fill: what the masked area starts from, the web UI's "Masked content": 'original', 'fill' (the
    surrounding colours, blurred), 'latent noise' (its latents replaced by the initial noise, as the
    web UI's seeds give), 'latent nothing' (zero latents); it matters for strength < 1, since at
    strength 1 the run starts from pure noise as diffusers' does.
    only_masked: inpaint a box around the mask grown by `padding` px and by the working size's aspect
    ratio, scaled to width x height (default: the model's native size), then scaled back and pasted;
    the image keeps its size and everything outside the box is untouched. Otherwise the image is
    brought to width x height (default: its own size, rounded down to pipe.size_multiple) by `resize_mode`.
    Every txt2img option works too.
    """
    options, edit, masking = read_options("inpaint", prompt, negative_prompt, settings, EditOptions, MaskOptions)
    return inpaint_image(pipe, init_image, mask, options, edit, masking)


def inpaint_image(pipe: Pipeline, init_image, mask, options: GenerationOptions, edit: EditOptions,
                  masking: MaskOptions, params: Optional[dict] = None) -> GenerationResult:
    """inpaint() for options already read; `params`: more infotext fields (outpainting records its extension)."""
    image = load_image(init_image, "init image")
    mask_image = load_mask(mask, image.size)
    fill = masked_content_key(masking.fill)
    if isinstance(masking.padding, bool) or not isinstance(masking.padding, int) or masking.padding < 0:
        raise InputError(f"masked area padding must be 0 or more pixels, got {masking.padding!r}")
    painted = mask_to_tensor(mask_image)
    if masking.invert_mask:
        painted = 1 - painted
    if painted.max() == 0:
        raise InputError("the mask is all black: nothing to inpaint; paint the area to repaint white"
                         + (" (the mask is inverted: paint the area to keep white)" if masking.invert_mask else ""))
    blurred = blur_mask(painted, masking.mask_blur)
    if blurred.max() < 0.5:
        raise InputError("no part of the mask is at least half white after blurring: nothing to inpaint; "
                         "paint the area to repaint white or lower the mask blur")

    mode = resize_mode_key(edit.resize_mode)
    if masking.only_masked:
        width, height = size_or_default(pipe, options.width, options.height)
        box = expand_to_aspect(crop_region(blurred, masking.padding), width, height, *image.size)
        work_image = resize_image(image.crop(box), width, height, "fill")
        work_mask = resize_image(tensor_to_mask(blurred).crop(box), width, height, "fill")
    else:
        width, height = working_size(pipe, image.size, options.width, options.height)
        work_image = resize_image(image, width, height, mode)
        work_mask = resize_image(tensor_to_mask(blurred), width, height, mode)
    soft_mask = mask_to_tensor(work_mask)  # (H, W) at the working size, in 1/255 steps as the web UI's
    pixels = to_pixels(work_image)
    if fill == "fill":
        pixels = fill_masked(pixels, soft_mask)
    binary = (soft_mask >= 0.5).float()[None, None]  # (1, 1, H, W), as both diffusers and the web UI binarise
    if binary.max() == 0:
        raise InputError("the painted area vanishes at the working size; paint a larger area or raise the size")
    masked_pixels = pixels * (binary < 0.5)

    def prepare(run):
        b, c, h, w = run.latent_shape
        latent_mask = F.interpolate(binary, size=(h, w)).expand(b, -1, -1, -1)  # nearest, as diffusers
        inpainting_model = run.pipe.config.unet.in_channels == c + 5
        full_strength = run.start_step == 0
        init = run.encode(pixels) if not (inpainting_model and full_strength) else None
        noise = run.draws.initial()
        if inpainting_model:
            masked_latents = run.encode(masked_pixels)
        else:
            run.draws.posterior((1, c, h, w))  # diffusers encodes the masked image even here: one draw
        if init is not None and fill == "latent noise":
            init = init * (1 - latent_mask) + noise * latent_mask
        elif init is not None and fill == "latent nothing":
            init = init * (1 - latent_mask)
        start_latents = None if full_strength else init
        if inpainting_model:
            concat = torch.cat([latent_mask, masked_latents], dim=1)  # (B, 1 + 4, h, w)
            return Start(init_latents=start_latents, conditioning={"concat": concat})
        return Start(init_latents=start_latents, keep_latents=init, repaint_mask=latent_mask)

    fields = {
        "Denoising strength": edit.strength,
        "Resize mode": RESIZE_MODES[mode] if not masking.only_masked and image.size != (width, height) else None,
        "Mask blur": masking.mask_blur,
        "Inpaint area": "Only masked" if masking.only_masked else None,
        "Masked area padding": masking.padding if masking.only_masked else None,
        "Mask mode": "Inpaint not masked" if masking.invert_mask else None,
        "Masked content": fill,
        **(params or {}),
    }
    result = generate(pipe, dataclasses.replace(options, width=width, height=height), strength=edit.strength,
                      prepare=prepare, params=fields)

    if masking.only_masked:
        x1, y1, x2, y2 = box
        pasted = []
        for generated in result.images:
            canvas = image.copy()
            canvas.paste(resize_image(generated, x2 - x1, y2 - y1, "crop"), (x1, y1))
            pasted.append(composite(canvas, image, overlay_alpha(blurred)))
    else:
        pasted = [composite(generated, work_image, overlay_alpha(soft_mask)) for generated in result.images]
    return GenerationResult(pasted, result.infotexts, result.seeds, result.latents)
