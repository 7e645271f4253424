"""The web UI's txt2img and img2img requests in the pipelines' terms (engine.Work), and the answer's
`info` in the web UI's words.

Field by field: sampler_name (or the old sampler_index) and scheduler pick the sampler; seed -1 is a
random seed chosen here, so the answer can report it; cfg_scale is guidance_scale; n_iter batches
run one after another with seed + i * batch_size; override_settings may name another model
(`sd_model_checkpoint`) and clip skip (`CLIP_stop_at_last_layers`); enable_hr runs the hires fix;
img2img with a mask inpaints, with the web UI's resize_mode and inpainting_fill numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from ..errors import InputError
from ..infotext import parse_infotext
from ..styles import apply_styles, default_styles_file, load_styles
from .engine import Work
from .generation import (
    batches, check_limits, check_number, check_output_size, request_seed, sampler_settings, variation_settings,
)
from .images import decode_image, decode_optional
from .model_folder import ModelFolder
from .settings import ServerSettings
from .webui_models import Img2ImgRequest, ProcessingRequest, Txt2ImgRequest
from .webui_options import WebUIOptions

RESIZE_MODES = {0: "just", 1: "crop", 2: "fill", 3: "just"}  # 3, "latent upscale", resizes the image as 0 does

# infotext field -> (request field, conversion): what the request's `infotext` may fill in
INFOTEXT_FIELDS = {
    "Prompt": ("prompt", str),
    "Negative prompt": ("negative_prompt", str),
    "Steps": ("steps", int),
    "Sampler": ("sampler_name", str),
    "Schedule type": ("scheduler", str),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Denoising strength": ("denoising_strength", float),
    "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float),
    "Hires upscale": ("hr_scale", float),
    "Hires steps": ("hr_second_pass_steps", int),
    "Hires upscaler": ("hr_upscaler", str),
}


@dataclass
class PlannedJob:
    """A web UI request turned into Work, with what its answer reports beside the job's results."""

    work: Work
    request: ProcessingRequest
    sampler: str
    subseed: Optional[int]
    clip_skip: int


def apply_infotext(request: ProcessingRequest) -> ProcessingRequest:
    """The request with the fields of its `infotext` filled into the fields it did not send."""
    if not request.infotext:
        return request
    fields = parse_infotext(request.infotext)
    sent = request.model_fields_set
    update = {}
    for key, (name, convert) in INFOTEXT_FIELDS.items():
        if key in fields and name in type(request).model_fields and name not in sent:
            try:
                update[name] = convert(fields[key])
            except ValueError:
                raise InputError(f"infotext field '{key}: {fields[key]}' is not a {convert.__name__}") from None
    if "Size" in fields and not {"width", "height"} & sent:
        try:
            update["width"], update["height"] = (int(v) for v in fields["Size"].lower().split("x"))
        except ValueError:
            raise InputError(f"infotext field 'Size: {fields['Size']}' must look like 512x512") from None
    if "hr_scale" in update and isinstance(request, Txt2ImgRequest) and "enable_hr" not in sent:
        update["enable_hr"] = True
    if "Clip skip" in fields:
        overrides = dict(request.override_settings or {})
        overrides.setdefault("CLIP_stop_at_last_layers", int(fields["Clip skip"]))
        update["override_settings"] = overrides
    return request.model_copy(update=update)


def _prompts(request: ProcessingRequest) -> tuple[str, str]:
    prompt, negative = request.prompt or "", request.negative_prompt or ""
    if request.styles:
        path = default_styles_file()
        if path is None:
            raise InputError("styles need a styles.csv in the server's working folder; none is there")
        prompt, negative = apply_styles(prompt, negative, request.styles, load_styles(path))
    return prompt, negative


def _common(request: ProcessingRequest, kind: str, limits: ServerSettings, options: WebUIOptions,
            folder: ModelFolder) -> tuple[Work, str, Optional[int], int]:
    """The Work every web UI request shares: limits checked, sampler, seeds, clip skip, model, saving."""
    steps, batch_size, n_iter = request.steps, request.batch_size, request.n_iter
    cfg = request.cfg_scale if request.cfg_scale is not None else 7.0
    check_limits(limits, steps=steps, batch_size=batch_size, n_iter=n_iter, cfg=cfg,
                 width=request.width, height=request.height)
    sampler = sampler_settings(request.sampler_name or request.sampler_index or "Euler", request.scheduler, request.eta)
    overrides = request.override_settings or {}
    clip_skip = overrides.get("CLIP_stop_at_last_layers", options.get("CLIP_stop_at_last_layers", 1))
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= 12:
        raise InputError(f"CLIP_stop_at_last_layers must be an integer from 1 to 12, got {clip_skip!r}")
    model = overrides.get("sd_model_checkpoint")
    if model is not None:
        model = folder.find(model).name  # unknown or path-like names are refused before queueing
    variation, subseed = variation_settings(request.subseed, request.subseed_strength,
                                            request.seed_resize_from_w, request.seed_resize_from_h)
    engine_batches, server_batches = batches(n_iter)
    prompt, negative = _prompts(request)
    settings = dict(steps=steps, guidance_scale=float(cfg), seed=request_seed(request.seed), batch_size=batch_size,
                    clip_skip=clip_skip, lora_dirs=folder.lora_folders(), **sampler, **variation,
                    tiling=bool(request.tiling), **engine_batches)
    preview, every = options.preview()
    save_format = str(overrides.get("samples_format", options.get("samples_format", "png"))).lower()
    work = Work(kind=kind, prompt=prompt, negative_prompt=negative, settings=settings, n_iter=server_batches,
                model=model, keep_model=not request.override_settings_restore_afterwards, preview=preview,
                preview_every=every, save=bool(request.save_images), save_format={"jpeg": "jpg"}.get(save_format, save_format))
    return work, sampler["sampler"], subseed, clip_skip


def txt2img_work(request: Txt2ImgRequest, limits: ServerSettings, options: WebUIOptions,
                 folder: ModelFolder) -> PlannedJob:
    request = apply_infotext(request)
    work, sampler, subseed, clip_skip = _common(request, "txt2img", limits, options, folder)
    work.settings.update(width=request.width, height=request.height)
    if request.enable_hr:
        work.hires = hires_settings(request, limits)
    return PlannedJob(work, request, sampler, subseed, clip_skip)


def hires_settings(request: Txt2ImgRequest, limits: ServerSettings) -> dict:
    """The hires fix's keywords: hr_scale, or the scale hr_resize_x / hr_resize_y ask for."""
    from ..pipelines.hires import hires_upscaler_key

    width, height = request.width, request.height
    if width is None or height is None:
        raise InputError("the hires fix needs the first pass's width and height")
    scale = check_number("hr_scale", request.hr_scale if request.hr_scale is not None else 2.0, 1, 8)
    resize_x, resize_y = request.hr_resize_x or 0, request.hr_resize_y or 0
    if resize_x or resize_y:
        scales = {round(target / side, 6) for target, side in ((resize_x, width), (resize_y, height)) if target}
        if len(scales) > 1:
            raise InputError(f"hr_resize_x and hr_resize_y ({resize_x}x{resize_y}) must keep the image's aspect "
                             f"ratio ({width}x{height}); give one of them, or hr_scale")
        scale = check_number("the hires scale hr_resize_x/y ask for", scales.pop(), 1, 8)
    check_output_size(limits, int(width * scale), int(height * scale), "the hires fix's image")
    strength = request.denoising_strength if request.denoising_strength is not None else 0.75
    steps = request.hr_second_pass_steps or None
    if steps is not None:
        check_limits(limits, steps=steps, batch_size=1)
    return {"hires_scale": float(scale), "hires_strength": float(strength), "hires_steps": steps,
            "hires_upscaler": hires_upscaler_key(request.hr_upscaler or "Latent")}


def img2img_work(request: Img2ImgRequest, limits: ServerSettings, options: WebUIOptions,
                 folder: ModelFolder) -> PlannedJob:
    """img2img, or inpainting when the request has a mask."""
    from ..pipelines.inpaint import MASKED_CONTENT

    request = apply_infotext(request)
    if not request.init_images:
        raise InputError("img2img needs init_images: a list with at least one base64 image")
    init_image = decode_image(request.init_images[0], "init_images[0]", limits.max_image_pixels)
    mask = decode_optional(request.mask, "mask", limits.max_image_pixels)
    work, sampler, subseed, clip_skip = _common(request, "inpaint" if mask is not None else "img2img",
                                                limits, options, folder)
    if request.resize_mode not in RESIZE_MODES:
        raise InputError(f"resize_mode must be 0 (just resize), 1 (crop and resize), 2 (resize and fill) or 3, "
                         f"got {request.resize_mode!r}")
    strength = request.denoising_strength if request.denoising_strength is not None else 0.75
    work.init_image, work.mask = init_image, mask
    work.settings.update(width=request.width, height=request.height, strength=float(strength),
                         resize_mode=RESIZE_MODES[request.resize_mode])
    if mask is not None:
        if request.inpainting_fill not in range(len(MASKED_CONTENT)):
            raise InputError("inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing), "
                             f"got {request.inpainting_fill!r}")
        if request.mask_blur is not None:
            blur = check_number("mask_blur", request.mask_blur, 0, 256)
        else:  # sdlab blurs both ways alike: the mean of the two
            blur = (check_number("mask_blur_x", request.mask_blur_x or 0, 0, 256)
                    + check_number("mask_blur_y", request.mask_blur_y or 0, 0, 256)) / 2
        work.settings.update(mask_blur=blur, only_masked=bool(request.inpaint_full_res),
                             padding=request.inpaint_full_res_padding or 0,
                             fill=MASKED_CONTENT[request.inpainting_fill], invert_mask=bool(request.inpainting_mask_invert))
    return PlannedJob(work, request, sampler, subseed, clip_skip)


def info_json(planned: PlannedJob, job) -> str:
    """The web UI's `info`: a JSON string describing the run (its Processed.js())."""
    request, work = planned.request, planned.work
    images = job.images
    prompt, negative = work.prompt, work.negative_prompt
    count = len(images)
    subseed = planned.subseed if planned.subseed is not None else -1
    info = {
        "prompt": prompt,
        "all_prompts": [prompt] * count,
        "negative_prompt": negative,
        "all_negative_prompts": [negative] * count,
        "seed": job.seeds[0] if job.seeds else work.settings.get("seed"),
        "all_seeds": list(job.seeds),
        "subseed": subseed,
        "all_subseeds": [subseed] * count,
        "subseed_strength": request.subseed_strength or 0,
        "width": images[0].width if images else request.width,
        "height": images[0].height if images else request.height,
        "sampler_name": planned.sampler,
        "cfg_scale": work.settings.get("guidance_scale"),
        "steps": work.settings.get("steps"),
        "batch_size": work.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": job.info.get("sd_model_name"),
        "sd_model_hash": job.info.get("sd_model_hash"),
        "sd_vae_name": job.info.get("sd_vae_name"),
        "sd_vae_hash": job.info.get("sd_vae_hash"),
        "seed_resize_from_w": request.seed_resize_from_w,
        "seed_resize_from_h": request.seed_resize_from_h,
        "denoising_strength": request.denoising_strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": list(job.infotexts),
        "styles": list(request.styles or []),
        "job_timestamp": job.info.get("job_timestamp"),
        "clip_skip": planned.clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": job.info.get("version"),
        "interrupted": job.stopped_early,  # sdlab's: the images are what the sampler had when it was stopped
    }
    return json.dumps(info, default=lambda value: None)


def request_parameters(request: ProcessingRequest) -> dict:
    """The answer's `parameters`: the request's fields, images left out (as the web UI leaves them out)."""
    values = request.model_dump()
    for name in ("init_images", "mask"):
        if name in values:
            values[name] = None
    return values
