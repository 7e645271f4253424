"""The bodies of sdlab's own API (`/api/v1`), which the web page uses: one job request for every
pipeline, in the Python API's names (guidance_scale, strength, sampler, schedule_type, ...)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..config import DEFAULT_SAMPLER

JobKind = Literal["txt2img", "img2img", "inpaint", "outpaint", "upscale", "trajectory", "attention", "edit"]
JobState = Literal["queued", "running", "done", "failed", "cancelled", "interrupted"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class LoraRequest(_Request):
    name: str = Field(description="a name from GET /api/v1/loras")
    weight: float = 1.0


class Extend(_Request):
    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0


class Hires(_Request):
    scale: float = 2.0
    strength: float = 0.5
    steps: Optional[int] = Field(default=None, description="second-pass steps; null: as many as the first pass")
    upscaler: str = Field(default="latent", description="latent, latent-nearest-exact or lanczos")


class JobRequest(_Request):
    kind: JobKind = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 7.0
    seed: Optional[int] = Field(default=None, description="null: a random seed, reported in the result")
    width: Optional[int] = Field(default=None, description="null: the model's size (img2img, inpaint: the image's)")
    height: Optional[int] = None
    batch_size: int = 1
    sampler: str = DEFAULT_SAMPLER
    schedule_type: Optional[str] = Field(default=None, description="a name from GET /api/v1/schedules; null: automatic")
    tiling: bool = Field(default=False, description="seamless images: they tile without a visible seam")
    clip_skip: int = 1
    self_attention_scale: float = Field(default=1.0, description="the UNet's self-attention logits times this; 1: as "
                                        "trained; about 2 on a canvas larger than the model's own: fewer doubled objects")
    fast: Optional[str] = Field(default=None, description="opt-in fast modes that change the image, e.g. "
                                "'deepcache:3,cfg-trunc:0.8,tome:0.5'; null: the exact network")
    model: Optional[str] = Field(default=None, description="a name from GET /api/v1/models; null: the current one")
    loras: list[LoraRequest] = []
    init_image: Optional[str] = Field(default=None, description="base64 image (a data: prefix is accepted)")
    mask: Optional[str] = Field(default=None, description="base64 image: white repaints, black keeps")
    strength: Optional[float] = Field(default=None, description="denoising strength; null: 0.75 (outpaint 0.8)")
    mask_blur: Optional[float] = None
    fill: Optional[str] = Field(default=None, description="original, fill, latent noise or latent nothing")
    invert_mask: Optional[bool] = None
    extend: Optional[Extend] = None
    hires: Optional[Hires] = None
    noise_level: Optional[int] = None
    preview: Literal["approx", "full", "none"] = "approx"
    preview_every: int = Field(default=2, ge=1, le=1000)
    # the views of the inside (kinds trajectory, attention, edit: server/inside_jobs.py)
    every: Optional[int] = Field(default=None, ge=1, le=1000,
                                 description="trajectory: record every N-th step (null: 5); the finished picture comes last")
    words: Optional[list[str]] = Field(default=None, description="attention: the words of the prompt to map; "
                                                                   "null: every token of the prompt")
    target_prompt: Optional[str] = Field(default=None, description="edit: the prompt to edit the picture into")
    cross_steps: Optional[float] = Field(default=None, ge=0, le=1, description="edit: the fraction of the steps "
                                         "that keep the source's cross-attention (the layout); null: 0.8")
    self_steps: Optional[float] = Field(default=None, ge=0, le=1, description="edit: the fraction of the steps "
                                        "that keep the source's self-attention (the shapes); null: 0.4")
    reweight: Optional[dict[str, float]] = Field(default=None, description="edit: word -> factor on its attention")
    refine: Optional[bool] = Field(default=None, description="edit: the target adds or removes words "
                                                              "(align the shared ones instead of swapping one for one)")


class TrajectoryFrame(BaseModel):
    step: int = Field(description="the sampler's 0-based step; equal to total for the finished picture")
    total: int
    sigma: float = Field(description="the noise level of the latents; 0 for the finished picture")
    noisy: str = Field(description="the latents at this step, decoded (base64 PNG)")
    denoised: str = Field(description="the model's prediction of the clean picture at this step (base64 PNG)")


class TrajectoryView(BaseModel):
    every: int
    grid: str = Field(description="every frame in one labelled picture (base64 PNG)")
    frames: list[TrajectoryFrame]


class WordMap(BaseModel):
    word: str
    map: str = Field(description="where the word was read, as a heat map over the faded picture (base64 PNG)")


class AttentionView(BaseModel):
    sheet: str = Field(description="the picture and every word's map, labelled, in one picture (base64 PNG)")
    words: list[WordMap]


class EditView(BaseModel):
    source_prompt: str
    target_prompt: str
    cross_steps: float
    self_steps: float
    source: str = Field(description="the picture redrawn from the source prompt (base64 PNG)")
    edit: str = Field(description="its prompt-to-prompt edit (base64 PNG)")


class InsideView(BaseModel):
    """What a trajectory, attention or edit job shows; the one of its kind is set."""

    trajectory: Optional[TrajectoryView] = None
    attention: Optional[AttentionView] = None
    edit: Optional[EditView] = None


class JobCreated(BaseModel):
    id: str
    position: int


class JobStatus(BaseModel):
    id: str
    kind: str
    state: JobState
    position: Optional[int] = None
    step: int
    steps: int
    progress: float
    preview: Optional[str] = None
    images: list[str]
    infotexts: list[str]
    seeds: list[int]
    error: Optional[str] = None
    inside: Optional[InsideView] = Field(default=None, description="trajectory, attention and edit jobs: the view, once done")


class JobCancelled(BaseModel):
    id: str
    state: JobState


class ModelItem(BaseModel):
    name: str
    title: str
    hash: Optional[str] = None
    current: bool


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]


class ScheduleItem(BaseModel):
    name: str
    label: str


class LoraItem(BaseModel):
    name: str
    path: str


class EmbeddingItem(BaseModel):
    name: str


class PngInfoRequest(_Request):
    image: str


class PngInfoResponse(BaseModel):
    parameters: Optional[str] = None
    fields: dict
