"""What the worker thread does with a job: load the model it names, run the pipeline it asks for, one
batch at a time, with live previews from the sampler's step callback, and stop at the next step when
asked to, keeping what it has.

Only the worker thread touches the models, so a model switch is a job like any other: it waits for
the job that runs and goes before the jobs queued after it.

torch and the pipelines are imported inside the methods, so by the worker thread as part of its first
job: the request modules import Work and the names here, and the server answers before torch is loaded.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from PIL import Image

from .. import __version__
from ..errors import InputError, SdlabError, UnknownSamplerError
from ..infotext import format_infotext
from ..outputs import day_folder, encode_image, image_grid, save_numbered
from .inside_jobs import INSIDE_KINDS, run_inside
from .jobs import Job
from .model_folder import VAE_AUTOMATIC, ModelEntry, ModelFolder, UnknownModelError
from .settings import ServerSettings

if TYPE_CHECKING:
    import torch

    from ..previews import LatentPreview

PREVIEW_MODES = ("approx", "full", "none")
UPSCALER_NAMES = ("None", "Lanczos", "Nearest", "SD x4")  # what extras and the hires fix accept by name


def engine_takes(option: str) -> bool:
    """Whether this sdlab's GenerationOptions has `option`: the web UI's fields whose engine option
    arrives with a later sdlab (variation seeds, batch count) are passed on only then."""
    from ..pipelines.options import GenerationOptions

    return option in {f.name for f in dataclasses.fields(GenerationOptions)}


@dataclass
class Work:
    """One request in the pipelines' terms."""

    kind: str  # "txt2img" | "img2img" | "inpaint" | "outpaint" | "upscale" | "extras" | inside_jobs.INSIDE_KINDS
    prompt: str = ""
    negative_prompt: str = ""
    settings: dict = field(default_factory=dict)  # GenerationOptions fields and the pipeline's own keywords
    init_image: Optional[Image.Image] = None
    mask: Optional[Image.Image] = None
    hires: Optional[dict] = None  # HiresOptions keywords: txt2img becomes hires_fix
    n_iter: int = 1  # batches, run one after another (seed + i * batch_size, as the web UI)
    model: Optional[str] = None  # a name from the model folder; None: the current model
    keep_model: bool = True  # after a job with its own model: that model stays the current one
    preview: str = "approx"
    preview_every: int = 2
    save: bool = False  # also write the images into the outputs folder
    save_format: str = "png"
    extras: Optional[dict] = None  # kind "extras": {"upscaler", "scale"} or {"upscaler", "width", "height", "crop"}
    inside: Optional[dict] = None  # kinds trajectory, attention, edit: the view's settings (inside_jobs.py)

    @property
    def batch_size(self) -> int:
        return self.settings.get("batch_size", 1)

    def expected_steps(self) -> int:
        """Step callbacks one batch makes (a guess the callbacks correct)."""
        steps = self.settings.get("steps", 20)
        if self.kind in ("img2img", "inpaint", "outpaint"):
            strength = self.settings.get("strength", 0.8 if self.kind == "outpaint" else 0.75)
            steps = min(int(steps * strength), steps)
        if self.hires:
            steps += self.hires.get("hires_steps") or self.settings.get("steps", 20)
        return max(1, steps)


@dataclass
class LoadWork:
    """A model or VAE switch: make `model` the current model (None: the current one, or the server's
    first model before any), loaded with the VAE the `vae` choice names (None: the current choice)."""

    model: Optional[str] = None
    vae: Optional[str] = None  # "Automatic", "None" or a name from ModelFolder.vaes() (the web UI's sd_vae)


class StopSampling(Exception):
    """Raised by the step callback to end sampling early (interrupt or skip); never leaves the engine."""

    def __init__(self, denoised: torch.Tensor, step: int):
        super().__init__("sampling stopped")
        self.denoised = denoised
        self.step = step


def error_status(exc: SdlabError) -> int:
    """The HTTP status for a user error: unknown names 404 (as the web UI's "Sampler not found"), else 400."""
    return 404 if isinstance(exc, (UnknownSamplerError, UnknownModelError)) else 400


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text


class Engine:
    """The loaded model and everything the worker thread does with it."""

    def __init__(self, settings: ServerSettings, folder: ModelFolder):
        self.settings = settings
        self.folder = folder
        self.pipe = None  # the loaded StableDiffusion
        self.entry: Optional[ModelEntry] = None  # its entry; None with the random-weight demo
        self.default_entry: Optional[ModelEntry] = None  # the model jobs without one of their own use
        self.loaded_once = False
        self.vae_choice = VAE_AUTOMATIC  # the web UI's sd_vae
        self.vae_path: Optional[str] = None  # the VAE file the loaded model has; None: its own
        self.embeddings: dict[str, dict] = {"loaded": {}, "skipped": {}}
        self._previews: dict[tuple, LatentPreview] = {}  # per model path and VAE file, fitted once
        self._upscaler = None

    # -- models -------------------------------------------------------------------------------------

    @property
    def model_title(self) -> Optional[str]:
        entry = self.default_entry if self.loaded_once else self.folder.default(self.settings.model)
        return entry.title if entry else "sdlab-demo-random"

    def _load(self, entry: Optional[ModelEntry]):
        """Make `entry` with the chosen VAE the loaded model (no-op when it is); its preview map is
        fitted on first use."""
        vae_path = self.folder.vae_for(entry, self.vae_choice)
        if self.pipe is not None and self.entry == entry and self.vae_path == vae_path:
            return self.pipe
        from .. import load
        from ..previews import fit_for_pipeline

        self.pipe = None  # let the old model's memory go before the new one is read
        pipe = load(entry.path if entry else None, device=self.settings.device, dtype=self.settings.dtype, vae=vae_path,
                    lowvram=self.settings.lowvram)
        self.embeddings = self._load_embeddings(pipe)
        self.pipe, self.entry, self.vae_path = pipe, entry, vae_path
        if self._preview_key() not in self._previews:
            self._previews[self._preview_key()] = fit_for_pipeline(pipe)
        self.loaded_once = True
        return pipe

    def _preview_key(self) -> tuple:
        """The preview map is fitted to a model's VAE: one per model and VAE file."""
        return (self.entry.path if self.entry else "demo", self.vae_path)

    def _load_embeddings(self, pipe) -> dict:
        """Every embedding of the models folder that fits this text encoder; the others are listed as skipped."""
        from ..adapters import load_embeddings, read_embeddings

        loaded, skipped = {}, {}
        for path in self.folder.embeddings():
            try:
                for embedding in load_embeddings(pipe.text_encoder, path):
                    loaded[embedding.name] = self._describe(embedding)
            except SdlabError:
                try:
                    for embedding in read_embeddings(path):
                        skipped[embedding.name] = self._describe(embedding)
                except SdlabError:
                    skipped[os.path.splitext(os.path.basename(path))[0]] = {"step": None, "sd_checkpoint": None,
                                                                           "sd_checkpoint_name": None, "shape": 0, "vectors": 0}
        return {"loaded": loaded, "skipped": skipped}

    @staticmethod
    def _describe(embedding) -> dict:
        vectors, width = embedding.vectors.shape
        return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": int(width), "vectors": int(vectors)}

    def _pipeline_for(self, work: Work):
        if work.model is None:
            if not self.loaded_once:
                self.default_entry = self.folder.default(self.settings.model)
            return self._load(self.default_entry)
        entry = self.folder.find(work.model)
        pipe = self._load(entry)
        if work.keep_model:
            self.default_entry = entry
        return pipe

    def upscaler(self):
        """The x4 upscaler (the bundled one), loaded on first use and kept."""
        if self._upscaler is None:
            from .. import load

            self._upscaler = load(None, task="upscale", device=self.settings.device, dtype=self.settings.dtype,
                                 lowvram=self.settings.lowvram)
        return self._upscaler

    # -- the worker's entry point -------------------------------------------------------------------

    def run(self, job: Job) -> None:
        """Run `job` on this thread; its outcome goes into the job (results, or error and status)."""
        try:
            if isinstance(job.work, LoadWork):
                self._switch(job.work)
            elif job.work.kind == "extras":
                self._extras(job, job.work)
            else:
                self._generate(job, job.work)
        except SdlabError as exc:
            job.error, job.error_status, job.error_type = str(exc), error_status(exc), type(exc).__name__
        except (MemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                traceback.print_exc()
                job.error, job.error_status, job.error_type = f"internal error: {exc}", 500, type(exc).__name__
            else:
                job.error, job.error_status, job.error_type = (
                    "out of memory: ask for a smaller size, batch size or fewer hires steps", 400, "OutOfMemoryError")
        except Exception as exc:  # a bug: reported to the client and the log, and the worker goes on
            traceback.print_exc()
            job.error, job.error_status, job.error_type = f"internal error: {exc}", 500, type(exc).__name__
        if job.error and isinstance(job.work, LoadWork):  # nobody may be waiting for a model load: say it here too
            print(f"sdlab: error: cannot load the model: {job.error}", file=sys.stderr)

    def _switch(self, work: LoadWork) -> None:
        """A model or VAE switch; a VAE that does not fit the model leaves the choice as it was."""
        if work.model:
            entry = self.folder.find(work.model)
        elif self.loaded_once:
            entry = self.default_entry
        else:
            entry = self.folder.default(self.settings.model)
        previous = self.vae_choice
        if work.vae is not None:
            self.vae_choice = work.vae
        try:
            self._load(entry)
        except SdlabError:
            self.vae_choice = previous
            raise
        self.default_entry = entry

    # -- generation ---------------------------------------------------------------------------------

    def _generate(self, job: Job, work: Work) -> None:
        pipe = self.upscaler() if work.kind == "upscale" and work.model is None else self._pipeline_for(work)
        preview_map = None if work.kind == "upscale" else self._previews.get(self._preview_key())
        job.batch_count = work.n_iter
        job.info = {"sd_model_name": self.entry.model_name if self.entry and work.kind != "upscale" else pipe.model_name,
                    "sd_model_hash": pipe.model_hash,
                    "sd_vae_name": pipe.vae_file.name if pipe.vae_file else None,
                    "sd_vae_hash": pipe.vae_file.hash if pipe.vae_file else None, "job_timestamp": datetime.datetime.now().strftime("%Y%m%d%H%M%S"),
                    "version": f"sdlab {__version__}"}
        seed = work.settings["seed"]
        varied = bool(work.settings.get("subseed_strength"))
        if varied:
            from ..pipelines.seeds import resolve_subseed

            subseed = resolve_subseed(work.settings.get("subseed"), work.settings["subseed_strength"])
        for batch in range(work.n_iter):
            job.batch_no, job.step, job.steps, job.preview = batch, 0, work.expected_steps(), None
            job.skip_requested = False
            job.changed()
            # the engine's seeds for batch k (run.over_batches): seed + k * batch_size, or with a variation
            # strength the same seed and the variation seed going on instead
            offset = batch * work.batch_size
            seeds = dict(seed=seed, subseed=subseed + offset) if varied else dict(seed=seed + offset)
            settings = dict(work.settings, **seeds, callback=self._step_callback(job, work, pipe, preview_map))
            try:
                if work.kind in INSIDE_KINDS:
                    result, job.inside = run_inside(pipe, work, settings)
                else:
                    result = self._call(pipe, work, dict(settings, prepack=True) if self.settings.prepack else settings)
                images, infotexts, seeds = result.images, result.infotexts, result.seeds
            except StopSampling as stop:
                images, infotexts, seeds = self._partial(pipe, work, settings, stop, job)
            job.images += images
            job.infotexts += infotexts
            job.seeds += seeds
            if work.save:
                self._save(work, images, infotexts, seeds)
            job.changed()
            if job.interrupt_requested:
                job.stopped_early = True
                break

    @staticmethod
    def _call(pipe, work: Work, settings: dict):
        prompt, negative = work.prompt, work.negative_prompt
        if work.kind == "txt2img":
            if work.hires:
                return pipe.hires_fix(prompt, negative, **settings, **work.hires)
            return pipe.txt2img(prompt, negative, **settings)
        if work.kind == "img2img":
            return pipe.img2img(prompt, work.init_image, negative, **settings)
        if work.kind == "inpaint":
            return pipe.inpaint(prompt, work.init_image, work.mask, negative, **settings)
        if work.kind == "outpaint":
            return pipe.outpaint(prompt, work.init_image, negative, **settings)
        if work.kind == "upscale":
            return pipe.upscale(work.init_image, prompt, negative, **settings)
        raise InputError(f"unknown job kind '{work.kind}'; choose txt2img, img2img, inpaint, outpaint or upscale")

    def _step_callback(self, job: Job, work: Work, pipe, preview_map: Optional[LatentPreview]):
        """The sampler's step callback: counts steps, makes the live preview every `preview_every` steps,
        and stops sampling (StopSampling) when the job was asked to."""

        def callback(step: dict) -> None:
            job.step += 1
            job.steps = max(job.steps, job.step)
            if job.interrupt_requested or job.skip_requested:
                raise StopSampling(step["denoised"], job.step)
            if work.preview != "none" and job.step % max(1, work.preview_every) == 0:
                job.preview = self._preview_png(pipe, step["denoised"], work.preview, preview_map)
                job.preview_step = job.step
            job.changed()

        return callback

    @staticmethod
    def _preview_png(pipe, denoised: torch.Tensor, mode: str, preview_map: Optional[LatentPreview]) -> bytes:
        """The batch's predicted clean images as one PNG: the linear map (approx) or the VAE (full)."""
        from ..pipelines.latents import decode_latents

        if mode == "full" or preview_map is None or denoised.shape[1] != preview_map.weight.shape[0]:
            images = decode_latents(pipe, denoised)
        else:
            images = preview_map(denoised)
        return encode_image(image_grid(images) if len(images) > 1 else images[0], "png")

    def _partial(self, pipe, work: Work, settings: dict, stop: StopSampling, job: Job):
        """What a stopped batch has: the last predicted clean latents through the VAE, each image's
        parameters saying at which step it was stopped."""
        from ..pipelines.latents import decode_latents, with_tiled_vae
        from ..pipelines.params import generation_params
        from ..pipelines.seeds import image_seeds

        denoised = stop.denoised
        height, width = (side * pipe.latent_factor for side in denoised.shape[-2:])
        images = decode_latents(with_tiled_vae(pipe, None, width, height, len(denoised)), denoised)
        prompts = [work.prompt] * len(images) if isinstance(work.prompt, str) else list(work.prompt)
        seeds = image_seeds(settings["seed"], len(images), settings.get("noise", "diffusers"))
        infotexts = []
        for i, seed in enumerate(seeds):
            fields = generation_params(
                pipe, steps=settings.get("steps", 20), sampler=str(settings.get("sampler", "Euler a")),
                guidance_scale=settings.get("guidance_scale", 7.0), seed=seed, width=width, height=height,
                noise=settings.get("noise", "diffusers"), clip_skip=settings.get("clip_skip", 1),
                batch_size=len(images), batch_pos=i,
                extra={"Interrupted at step": f"{stop.step}/{job.steps}", "Partial": "predicted clean image"})
            infotexts.append(format_infotext(prompts[i], work.negative_prompt if isinstance(work.negative_prompt, str)
                                             else work.negative_prompt[i], fields))
        return images, infotexts, seeds

    def _save(self, work: Work, images, infotexts, seeds) -> None:
        kind = "extras" if work.kind in ("upscale", "extras") else work.kind
        folder = day_folder(self.settings.outputs_dir, kind)
        for image, infotext, seed in zip(images, infotexts, seeds):
            save_numbered(image, folder, infotext, seed, work.save_format)

    # -- extras: the web UI's extra-single-image ------------------------------------------------------

    def _extras(self, job: Job, work: Work) -> None:
        """Enlarge one image by `scale` or to width x height: with PIL (Lanczos, Nearest) or the x4 upscaler."""
        image, options = work.init_image, work.extras
        if "scale" in options:
            width, height = round(image.width * options["scale"]), round(image.height * options["scale"])
        else:
            width, height = options["width"], options["height"]
        upscaler = options["upscaler"]
        job.steps = work.settings.get("steps", 20) if upscaler == "SD x4" else 0
        if upscaler == "None":
            result = image
        elif upscaler == "SD x4":
            settings = dict(work.settings, callback=self._step_callback(job, work, self.upscaler(), None))
            try:
                result = self.upscaler().upscale(image, work.prompt, work.negative_prompt, **settings).images[0]
            except StopSampling:
                job.stopped_early = True
                result = image
            result = self._fit(result, width, height, options.get("crop", True))
        else:
            method = Image.Resampling.LANCZOS if upscaler == "Lanczos" else Image.Resampling.NEAREST
            result = self._fit(image, width, height, options.get("crop", True), method)
        job.images, job.infotexts, job.seeds = [result], [""], []
        if work.save:
            self._save(work, [result], [None], [None])

    @staticmethod
    def _fit(image: Image.Image, width: int, height: int, crop: bool,
             method=Image.Resampling.LANCZOS) -> Image.Image:
        """`image` at width x height; with `crop`, scaled to cover it and cut to it (the web UI's "Crop to fit")."""
        if image.size == (width, height):
            return image
        if not crop:
            return image.resize((width, height), method)
        scale = max(width / image.width, height / image.height)
        covered = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))), method)
        left, top = (covered.width - width) // 2, (covered.height - height) // 2
        return covered.crop((left, top, left + width, top + height))
