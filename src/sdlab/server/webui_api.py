"""`/sdapi/v1`: the popular SD web UI's API, so the clients written for it work unchanged.

Generation (txt2img, img2img, extra-single-image) goes through the job queue like every other job;
`progress`, `interrupt` and `skip` act on the job that runs now. The listing routes answer with the
web UI's fields; those for things sdlab does not have (hypernetworks, face restorers, Real-ESRGAN,
scripts) answer with empty lists, so clients that call them at start-up carry on.
"""

from __future__ import annotations

import os
import time
from typing import Any

from fastapi import APIRouter, Body, Request
from starlette.concurrency import run_in_threadpool

from .. import bundled
from ..errors import InputError
from ..infotext import parse_infotext
from ..styles import default_styles_file, load_styles
from .engine import UPSCALER_NAMES, Work
from .generation import check_number, check_output_size
from .images import bytes_base64, decode_image, encode_png_base64, text_chunks
from .jobs import RUNNING
from .service import Server
from .webui_models import (
    ExtrasSingleImageRequest, ExtrasSingleImageResponse, ImagesResponse, Img2ImgRequest, PNGInfoRequest,
    PNGInfoResponse, ProgressResponse, SamplerItem, SchedulerItem, SDModelItem, Txt2ImgRequest, UpscalerItem,
)
from .webui_requests import PlannedJob, img2img_work, info_json, request_parameters, txt2img_work

router = APIRouter(prefix="/sdapi/v1", tags=["web UI API (AUTOMATIC1111)"])

# sdlab's schedule keys -> the web UI's scheduler names where they differ; and the schedules that the
# web UI computes from the model's own sigma table (its `need_inner_model`)
_SCHEDULER_NAMES = {"sgm-uniform": "sgm_uniform", "ddim-uniform": "ddim", "align-your-steps": "align_your_steps"}
_NEEDS_MODEL = {"uniform", "sgm-uniform", "simple", "normal", "ddim-uniform", "beta"}


def server_of(request: Request) -> Server:
    return request.app.state.server


async def _generate(request: Request, planned: PlannedJob) -> ImagesResponse:
    server = server_of(request)
    job = await server.run(planned.work.kind, planned.work, request)
    images = []
    if planned.request.send_images:
        images = await run_in_threadpool(lambda: [encode_png_base64(image, infotext)
                                                  for image, infotext in zip(job.images, job.infotexts)])
    return ImagesResponse(images=images, parameters=request_parameters(planned.request), info=info_json(planned, job))


@router.post("/txt2img", response_model=ImagesResponse)
async def txt2img(body: Txt2ImgRequest, request: Request):
    server = server_of(request)
    planned = await run_in_threadpool(txt2img_work, body, server.settings, server.options, server.folder)
    return await _generate(request, planned)


@router.post("/img2img", response_model=ImagesResponse)
async def img2img(body: Img2ImgRequest, request: Request):
    server = server_of(request)
    planned = await run_in_threadpool(img2img_work, body, server.settings, server.options, server.folder)
    return await _generate(request, planned)


@router.post("/extra-single-image", response_model=ExtrasSingleImageResponse)
async def extra_single_image(body: ExtrasSingleImageRequest, request: Request):
    """Enlarge one image: Lanczos, Nearest, or "SD x4" (the bundled x4 diffusion upscaler)."""
    server = server_of(request)
    image = await run_in_threadpool(decode_image, body.image, "image", server.settings.max_image_pixels)
    upscaler = body.upscaler_1 or "None"
    if upscaler not in UPSCALER_NAMES:
        raise InputError(f"unknown upscaler '{upscaler}'; choose one of: {', '.join(UPSCALER_NAMES)} "
                         "(GET /sdapi/v1/upscalers)")
    if body.resize_mode == 1:
        width, height = body.upscaling_resize_w, body.upscaling_resize_h
        if not isinstance(width, int) or not isinstance(height, int):
            raise InputError("resize_mode 1 needs upscaling_resize_w and upscaling_resize_h")
        extras = {"upscaler": upscaler, "width": width, "height": height, "crop": bool(body.upscaling_crop)}
    else:
        scale = check_number("upscaling_resize", body.upscaling_resize, 0.01, 8)
        extras = {"upscaler": upscaler, "scale": scale}
        width, height = round(image.width * scale), round(image.height * scale)
    if width < 1 or height < 1:
        raise InputError(f"the upscaled image would be {width}x{height}; ask for at least 1x1")
    check_output_size(server.settings, width, height, "the upscaled image")
    prompt = parse_infotext(image.info["parameters"])["Prompt"] if "parameters" in image.info else ""
    work = Work(kind="extras", prompt=prompt.strip() or "a detailed image", init_image=image.convert("RGB"),
                settings={"steps": 20, "seed": 0}, extras=extras, preview="none")
    job = await server.run("extras", work, request)
    encoded = await run_in_threadpool(encode_png_base64, job.images[0]) if body.show_extras_results else None
    return ExtrasSingleImageResponse(html_info="", image=encoded)


@router.post("/png-info", response_model=PNGInfoResponse)
async def png_info(body: PNGInfoRequest, request: Request):
    server = server_of(request)
    image = await run_in_threadpool(decode_image, body.image, "image", server.settings.max_image_pixels)
    items = text_chunks(image)
    info = items.pop("parameters", "")
    return PNGInfoResponse(info=info, items=items, parameters=parsed_parameters(info) if info else {})


def parsed_parameters(infotext: str) -> dict:
    """parse_infotext's fields, with Size also as Size-1 and Size-2, as the web UI gives them."""
    fields = parse_infotext(infotext)
    if "Size" in fields and "x" in fields["Size"]:
        fields["Size-1"], fields["Size-2"] = fields["Size"].split("x", 1)
    return fields


@router.get("/progress", response_model=ProgressResponse)
async def progress(request: Request, skip_current_image: bool = False):
    server = server_of(request)
    job = server.queue.current
    waiting = server.queue.pending()
    if job is None or job.state != RUNNING:
        state = _state(None, waiting)
        return ProgressResponse(progress=0, eta_relative=0, state=state, textinfo="Waiting..." if waiting else None)
    done = job.progress
    elapsed = time.time() - (job.started or time.time())
    shown = max(done, 0.01)  # as the web UI, so the estimate never divides by zero
    image = None if skip_current_image else bytes_base64(job.preview)
    text = f"Step {job.step}/{job.steps}" + (f", batch {job.batch_no + 1}/{job.batch_count}" if job.batch_count > 1 else "")
    return ProgressResponse(progress=min(shown, 1.0), eta_relative=max(0.0, elapsed / shown - elapsed),
                            state=_state(job, waiting), current_image=image, textinfo=text, current_task=job.id)


def _state(job, waiting: int) -> dict:
    """The web UI's `state` dict; `queue_pending` is sdlab's: jobs waiting behind the current one."""
    if job is None:
        return {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0, "queue_pending": waiting}
    return {"skipped": job.skip_requested, "interrupted": job.interrupt_requested, "stopping_generation": False,
            "job": job.kind, "job_count": job.batch_count, "job_timestamp": job.info.get("job_timestamp", "0"),
            "job_no": job.batch_no, "sampling_step": job.step, "sampling_steps": job.steps, "queue_pending": waiting}


@router.post("/interrupt")
async def interrupt(request: Request):
    server_of(request).queue.interrupt_current()
    return {}


@router.post("/skip")
async def skip(request: Request):
    server_of(request).queue.skip_current()
    return {}


@router.get("/options")
async def get_options(request: Request) -> dict[str, Any]:
    server = server_of(request)
    values = server.options.snapshot()
    entry = server.engine.default_entry if server.engine.loaded_once else None
    values["sd_model_checkpoint"] = server.current_model_title()
    values["sd_checkpoint_hash"] = entry.sha256 if entry else None
    values["sd_vae"] = server.engine.vae_choice
    return values


@router.post("/options")
async def set_options(request: Request, body: dict[str, Any] = Body(...)):
    """Store settings; `sd_model_checkpoint` and `sd_vae` switch the model or its VAE once the running
    job is done."""
    server = server_of(request)
    body = dict(body)
    model, vae = body.pop("sd_model_checkpoint", None), body.pop("sd_vae", None)
    server.options.update(body)
    if model is not None or vae is not None:
        await server.switch_model(None if model is None else str(model), None if vae is None else str(vae))
    return None


@router.get("/cmd-flags")
async def cmd_flags(request: Request) -> dict[str, Any]:
    """The server's command line as the web UI names it (never the --api-auth credentials)."""
    settings = server_of(request).settings
    return {"api": True, "nowebui": False, "listen": settings.host not in ("127.0.0.1", "localhost", "::1"),
            "server_name": settings.host, "port": settings.port, "api_auth": None, "ckpt_dir": settings.models_dir,
            "ckpt": settings.model, "lora_dir": None, "embeddings_dir": None, "cors_allow_origins":
            ",".join(settings.cors_allow_origins) or None, "device_id": settings.device, "no_half": settings.dtype == "fp32",
            "lowvram": settings.lowvram, "prepack": settings.prepack}


@router.get("/sd-models", response_model=list[SDModelItem])
async def sd_models(request: Request):
    folder = server_of(request).folder
    return await run_in_threadpool(lambda: [
        SDModelItem(title=entry.title, model_name=entry.model_name, hash=entry.short_hash, sha256=entry.sha256,
                    filename=entry.path, config=None) for entry in folder.entries])


@router.post("/refresh-checkpoints")
async def refresh_checkpoints(request: Request):
    await run_in_threadpool(server_of(request).folder.refresh)
    return None


@router.post("/reload-checkpoint")
async def reload_checkpoint(request: Request):
    return None


@router.get("/samplers", response_model=list[SamplerItem])
async def samplers():
    from ..samplers import list_samplers, resolve_sampler

    items = []
    for name, aliases in list_samplers():
        spec = resolve_sampler(name)
        options = {"scheduler": spec.schedule} if spec.schedule != "automatic" else {}
        items.append(SamplerItem(name=name, aliases=list(aliases), options=options))
    return items


@router.get("/schedulers", response_model=list[SchedulerItem])
async def schedulers():
    from ..schedules import SCHEDULE_TYPES

    return [SchedulerItem(name=_SCHEDULER_NAMES.get(kind.key, kind.key), label=kind.label,
                          aliases=list(kind.aliases) or None, default_rho=7.0 if kind.key == "karras" else -1,
                          need_inner_model=kind.key in _NEEDS_MODEL) for kind in SCHEDULE_TYPES]


@router.get("/upscalers", response_model=list[UpscalerItem])
async def upscalers():
    items = [UpscalerItem(name="None", scale=1), UpscalerItem(name="Lanczos", scale=4),
             UpscalerItem(name="Nearest", scale=4)]
    if os.path.isfile(bundled.BUNDLED_UPSCALER):
        items.append(UpscalerItem(name="SD x4", model_name=os.path.splitext(os.path.basename(bundled.BUNDLED_UPSCALER))[0],
                                  model_path=bundled.BUNDLED_UPSCALER, scale=4))
    return items


@router.get("/latent-upscale-modes")
async def latent_upscale_modes():
    from ..pipelines.hires import HIRES_UPSCALERS

    return [{"name": label} for label, mode in HIRES_UPSCALERS.values() if mode is not None]


@router.get("/loras")
async def loras(request: Request):
    folder = server_of(request).folder
    return [{"name": name, "alias": name, "path": path, "metadata": {}} for name, path in folder.loras()]


@router.post("/refresh-loras")
async def refresh_loras():
    return None


@router.get("/embeddings")
async def embeddings(request: Request):
    return server_of(request).engine.embeddings


@router.get("/sd-vae")
async def sd_vae(request: Request):
    """The VAE files `sd_vae` may name (besides "Automatic" and "None"), as the web UI lists them."""
    folder = server_of(request).folder
    return await run_in_threadpool(lambda: [{"model_name": name, "filename": path} for name, path in folder.vaes()])


@router.get("/prompt-styles")
async def prompt_styles():
    path = default_styles_file()
    if path is None:
        return []
    return [{"name": style.name, "prompt": style.prompt, "negative_prompt": style.negative_prompt}
            for style in load_styles(path).values()]


@router.get("/memory")
async def memory():
    """RAM as the web UI reports it (bytes); CUDA's when there is a GPU."""
    import torch

    from ..devices import available_memory_bytes

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    free = available_memory_bytes(torch.device("cpu"))
    ram = {"free": free, "used": total - free if total and free else None, "total": total}
    if torch.cuda.is_available():
        free_cuda, total_cuda = torch.cuda.mem_get_info()
        cuda: dict = {"system": {"free": free_cuda, "used": total_cuda - free_cuda, "total": total_cuda},
                      "active": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}}
    else:
        cuda = {"error": "no CUDA device"}
    return {"ram": ram, "cuda": cuda}


@router.get("/scripts")
async def scripts():
    return {"txt2img": [], "img2img": []}


@router.get("/script-info")
async def script_info():
    return []


@router.get("/hypernetworks")
async def hypernetworks():
    return []


@router.get("/face-restorers")
async def face_restorers():
    return []


@router.get("/realesrgan-models")
async def realesrgan_models():
    return []
