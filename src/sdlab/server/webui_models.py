"""The request and answer bodies of the popular SD web UI's API (AUTOMATIC1111's `/sdapi/v1`), field
for field: the names, types and defaults of its StableDiffusionProcessingTxt2Img / Img2Img and of
the extras it adds for the API (sampler_index "Euler", send_images, save_images, ...), so clients
written for it (webuiapi, Open WebUI, SillyTavern, ...) work unchanged. Every field is optional and
unknown fields are ignored, as there.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class ProcessingRequest(_Lenient):
    """The fields txt2img and img2img share (the web UI's StableDiffusionProcessing)."""

    prompt: Optional[str] = ""
    negative_prompt: Optional[str] = ""
    styles: Optional[list[str]] = None
    seed: Optional[int] = -1  # -1: a random seed
    subseed: Optional[int] = -1
    subseed_strength: Optional[float] = 0
    seed_resize_from_h: Optional[int] = -1
    seed_resize_from_w: Optional[int] = -1
    seed_enable_extras: Optional[bool] = True
    sampler_name: Optional[str] = None
    scheduler: Optional[str] = None
    batch_size: Optional[int] = 1
    n_iter: Optional[int] = 1
    steps: Optional[int] = 50
    cfg_scale: Optional[float] = 7.0
    width: Optional[int] = 512
    height: Optional[int] = 512
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: Optional[bool] = False
    do_not_save_grid: Optional[bool] = False
    eta: Optional[float] = None
    denoising_strength: Optional[float] = None
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: Optional[bool] = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: Optional[bool] = False
    comments: Optional[dict] = None
    # the API's own additions
    sampler_index: Optional[str] = "Euler"  # the old name of sampler_name; used when sampler_name is not given
    script_name: Optional[str] = None
    script_args: Optional[list] = []
    send_images: Optional[bool] = True
    save_images: Optional[bool] = False
    alwayson_scripts: Optional[dict] = {}
    force_task_id: Optional[str] = None
    infotext: Optional[str] = None  # generation parameters whose fields fill the fields the request leaves out


class Txt2ImgRequest(ProcessingRequest):
    enable_hr: Optional[bool] = False
    denoising_strength: Optional[float] = 0.75
    firstphase_width: Optional[int] = 0
    firstphase_height: Optional[int] = 0
    hr_scale: Optional[float] = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: Optional[int] = 0
    hr_resize_x: Optional[int] = 0
    hr_resize_y: Optional[int] = 0
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: Optional[str] = ""
    hr_negative_prompt: Optional[str] = ""


class Img2ImgRequest(ProcessingRequest):
    init_images: Optional[list[str]] = None
    resize_mode: Optional[int] = 0  # 0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize (latent upscale)
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = None
    mask_blur_x: Optional[int] = 4
    mask_blur_y: Optional[int] = 4
    mask_blur: Optional[int] = None  # sets both mask_blur_x and mask_blur_y
    mask_round: Optional[bool] = True
    inpainting_fill: Optional[int] = 0  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: Optional[bool] = True  # "Only masked"
    inpaint_full_res_padding: Optional[int] = 0
    inpainting_mask_invert: Optional[int] = 0
    initial_noise_multiplier: Optional[float] = None
    denoising_strength: Optional[float] = 0.75
    include_init_images: Optional[bool] = Field(default=False, exclude=True)


class ImagesResponse(BaseModel):
    images: Optional[list[str]] = Field(default=None, description="The generated images, base64 PNG")
    parameters: dict
    info: str = Field(description="A JSON string: prompt, all_prompts, seed, all_seeds, infotexts, ...")


class ExtrasSingleImageRequest(_Lenient):
    resize_mode: Optional[int] = 0  # 0: by upscaling_resize; 1: to upscaling_resize_w x upscaling_resize_h
    show_extras_results: Optional[bool] = True
    gfpgan_visibility: Optional[float] = 0
    codeformer_visibility: Optional[float] = 0
    codeformer_weight: Optional[float] = 0
    upscaling_resize: Optional[float] = 2
    upscaling_resize_w: Optional[int] = 512
    upscaling_resize_h: Optional[int] = 512
    upscaling_crop: Optional[bool] = True
    upscaler_1: Optional[str] = "None"
    upscaler_2: Optional[str] = "None"
    extras_upscaler_2_visibility: Optional[float] = 0
    upscale_first: Optional[bool] = False
    image: Optional[str] = ""


class ExtrasSingleImageResponse(BaseModel):
    html_info: str = ""
    image: Optional[str] = None


class PNGInfoRequest(_Lenient):
    image: str


class PNGInfoResponse(BaseModel):
    info: str
    items: dict
    parameters: dict


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict
    current_image: Optional[str] = None
    textinfo: Optional[str] = None
    current_task: Optional[str] = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: Optional[list[str]] = None
    default_rho: Optional[float] = None
    need_inner_model: Optional[bool] = None


class UpscalerItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    name: str
    model_name: Optional[str] = None
    model_path: Optional[str] = None
    model_url: Optional[str] = None
    scale: Optional[float] = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    title: str
    model_name: str
    hash: Optional[str] = None
    sha256: Optional[str] = None
    filename: str
    config: Optional[str] = None
