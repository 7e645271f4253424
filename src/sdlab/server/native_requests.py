"""A native job request (`POST /api/v1/jobs`) in the pipelines' terms: engine.Work for its kind (the
views of the inside, trajectory, attention and edit, check their own settings in inside_jobs.py)."""

from __future__ import annotations

from ..errors import InputError
from ..fast.modes import parse_fast
from .engine import Work
from .generation import check_limits, check_number, check_output_size, request_seed, sampler_settings
from .images import decode_optional
from .inside_jobs import INSIDE_KINDS, inside_options
from .model_folder import ModelFolder
from .native_models import JobRequest
from .settings import ServerSettings

UPSCALE_FACTOR = 4  # the x4 upscaler


def job_work(request: JobRequest, limits: ServerSettings, folder: ModelFolder) -> Work:
    """Check `request` against the server's limits and build its Work; every refusal is an InputError."""
    kind = request.kind
    sized = kind in ("txt2img", "img2img", "inpaint", *INSIDE_KINDS)
    check_limits(limits, steps=request.steps, batch_size=request.batch_size, cfg=request.guidance_scale,
                 width=request.width if sized else None, height=request.height if sized else None)
    if not sized and (request.width is not None or request.height is not None):
        raise InputError(f"{kind} takes its size from the image{' and extend' if kind == 'outpaint' else ''}; "
                         "leave width and height out")
    if not 1 <= request.clip_skip <= 12:
        raise InputError(f"clip_skip must be from 1 to 12, got {request.clip_skip}")
    settings = dict(steps=request.steps, guidance_scale=float(request.guidance_scale), seed=request_seed(request.seed),
                    clip_skip=request.clip_skip, lora_dirs=folder.lora_folders(),
                    self_attention_scale=check_number("self_attention_scale", request.self_attention_scale, 0.1, 10),
                    loras=[(folder.find_lora(lora.name), float(lora.weight)) for lora in request.loras],
                    **sampler_settings(request.sampler, request.schedule_type, None))
    if kind != "upscale":
        settings.update(batch_size=request.batch_size, tiling=request.tiling)
    elif request.batch_size != 1 or request.tiling:
        raise InputError("upscale makes one image per input image, untiled; leave batch_size at 1 and tiling false")
    if sized:
        settings.update(width=request.width, height=request.height)
    if request.fast:
        if kind in INSIDE_KINDS:
            raise InputError(f"{kind} shows the exact network at work; leave fast out")
        settings["fast"] = parse_fast(request.fast).spec()
    model = folder.find(request.model).name if request.model is not None else None
    work = Work(kind=kind, prompt=request.prompt, negative_prompt=request.negative_prompt, settings=settings,
                model=model, preview=request.preview, preview_every=request.preview_every)
    pixels = limits.max_image_pixels
    work.init_image = decode_optional(request.init_image, "init_image", pixels)
    work.mask = decode_optional(request.mask, "mask", pixels)
    made_from_text = kind == "txt2img" or kind in INSIDE_KINDS
    if kind in INSIDE_KINDS and (work.init_image is not None or work.mask is not None):
        raise InputError(f"{kind} shows how a picture is made from its prompt; leave init_image and mask out")
    if not made_from_text and work.init_image is None:
        raise InputError(f"{kind} needs init_image: the base64 image to start from")
    if kind == "inpaint" and work.mask is None:
        raise InputError("inpaint needs a mask: a base64 image, white where to repaint")
    _kind_settings(request, work, limits)
    work.inside = inside_options(request)
    return work


def _kind_settings(request: JobRequest, work: Work, limits: ServerSettings) -> None:
    from ..pipelines.hires import hires_upscaler_key
    from ..pipelines.inpaint import masked_content_key

    kind, settings = request.kind, work.settings
    if request.hires is not None:
        if kind != "txt2img":
            raise InputError("hires is a txt2img setting; leave it out of other kinds")
        hires = request.hires
        check_number("hires scale", hires.scale, 1, 8)
        width = request.width or 0
        height = request.height or 0
        if width and height:
            check_output_size(limits, int(width * hires.scale), int(height * hires.scale), "the hires fix's image")
        if hires.steps is not None:
            check_limits(limits, steps=hires.steps, batch_size=1)
        work.hires = {"hires_scale": hires.scale, "hires_strength": hires.strength, "hires_steps": hires.steps,
                      "hires_upscaler": hires_upscaler_key(hires.upscaler)}
    if request.strength is not None:
        if kind not in ("img2img", "inpaint", "outpaint"):
            raise InputError(f"strength is for img2img, inpaint and outpaint; {kind} takes none")
        settings["strength"] = request.strength
    if kind in ("inpaint", "outpaint"):
        if request.mask_blur is not None:
            settings["mask_blur"] = check_number("mask_blur", request.mask_blur, 0, 256)
        if request.fill is not None:
            settings["fill"] = masked_content_key(request.fill)
        if request.invert_mask is not None:
            settings["invert_mask"] = request.invert_mask
    elif any(value is not None for value in (request.mask_blur, request.fill, request.invert_mask)):
        raise InputError("mask_blur, fill and invert_mask are inpaint and outpaint settings")
    if kind == "outpaint":
        if request.extend is None:
            raise InputError("outpaint needs extend: pixels to add per side, e.g. {\"left\": 64}")
        extend = request.extend.model_dump()
        image = work.init_image
        check_output_size(limits, image.width + extend["left"] + extend["right"],
                          image.height + extend["top"] + extend["bottom"], "the outpainted image")
        settings["extend"] = extend
    elif request.extend is not None:
        raise InputError("extend is an outpaint setting")
    if kind == "upscale":
        check_output_size(limits, work.init_image.width * UPSCALE_FACTOR, work.init_image.height * UPSCALE_FACTOR,
                          "the upscaled image")
        if request.noise_level is not None:
            settings["noise_level"] = request.noise_level
    elif request.noise_level is not None:
        raise InputError("noise_level is an upscale setting")
