"""What every pipeline shares: the loaded components, conditioning, guidance, decoding, parameters.

txt2img, img2img, inpainting and upscaling are short functions over these pieces (STYLE principle 5).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from .. import __version__
from ..config import DEFAULT_SAMPLER, ModelConfig
from ..errors import InputError
from ..infotext import format_infotext
from ..noise import NOISE_MODES, noise_source
from ..samplers import resolve_sampler, sample, sampler_sigmas


@dataclass
class GenerationResult:
    images: list[Image.Image]
    infotexts: list[str]  # the web UI's `parameters` text, one per image
    seeds: list[int]
    latents: Optional[torch.Tensor] = None  # final latents (B, C, h, w), before decoding


@dataclass
class Pipeline:
    """A loaded model: its config, the three networks, and where they compute."""

    config: ModelConfig
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    model_name: str = "model"
    model_path: Optional[str] = None

    def upscale(self, image, prompt, negative_prompt: str = "", **kwargs) -> GenerationResult:
        from .upscale import upscale

        return upscale(self, image, prompt, negative_prompt, **kwargs)

    def hires_fix(self, prompt, negative_prompt: str = "", **kwargs) -> GenerationResult:
        from .hires import hires_fix

        return hires_fix(self, prompt, negative_prompt, **kwargs)

    def txt2img(self, prompt, negative_prompt: str = "", **kwargs) -> GenerationResult:
        from .txt2img import txt2img

        return txt2img(self, prompt, negative_prompt, **kwargs)

    def img2img(self, prompt, init_image, negative_prompt: str = "", **kwargs) -> GenerationResult:
        from .img2img import img2img

        return img2img(self, prompt, init_image, negative_prompt, **kwargs)

    def inpaint(self, prompt, init_image, mask, negative_prompt: str = "", **kwargs) -> GenerationResult:
        from .inpaint import inpaint

        return inpaint(self, prompt, init_image, mask, negative_prompt, **kwargs)

    def outpaint(self, prompt, init_image, negative_prompt: str = "", **kwargs) -> GenerationResult:
        from .outpaint import outpaint

        return outpaint(self, prompt, init_image, negative_prompt, **kwargs)

    @property
    def latent_factor(self) -> int:
        return self.config.vae.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor (8 px for SD). The UNet takes any latent
        size (its up path follows the skip connections' sizes, as diffusers' does)."""
        return self.latent_factor

    @property
    def model_hash(self) -> Optional[str]:
        return model_hash(self.model_path) if self.model_path else None


def load_pipeline(path=None, prediction=None, device=None, dtype=None, task: str = "txt2img") -> Pipeline:
    """A pipeline from a single-file checkpoint, a diffusers folder, 'demo', or (path None) the bundled
    model for `task` ("txt2img", "inpaint", "upscale")."""
    from .. import devices
    from ..checkpoint.load import load_components
    from .. import bundled

    dev, dt = devices.resolve(device, dtype)
    if path is None:
        path = bundled.default_model_path(task)
    if path == "demo":
        config, unet, vae, text_encoder = bundled.demo_components()
        name = "sdlab-demo-random"
    else:
        components = load_components(path, prediction=prediction)
        config, unet, vae, text_encoder = components.config, components.unet, components.vae, components.text_encoder
        name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    unet.to(dev, dt).eval()
    text_encoder.to(dev, dt).eval()
    vae.to(dev, torch.float32 if dev.type == "cpu" else dt).eval()
    return Pipeline(config, unet, vae, text_encoder, dev, dt, name, None if path == "demo" else path)


# -- parameters ------------------------------------------------------------------------------------


def check_size(width: int, height: int, factor: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value <= 0:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
        if value % factor:
            raise InputError(f"{name} {value} is not a multiple of {factor}; try {max(factor, round(value / factor) * factor)}")


def check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps <= 0:
        raise InputError(f"steps must be a positive integer, got {steps!r}")


def check_prompts(prompts: list[str], negative_prompts: list[str]) -> None:
    if all(not p.strip() for p in prompts) and all(not n.strip() for n in negative_prompts):
        raise InputError("the prompt is empty and there is no negative prompt: describe the image you want")


def check_noise(noise: str) -> None:
    if noise not in NOISE_MODES:
        raise InputError(f"unknown noise mode '{noise}'; choose one of: {', '.join(NOISE_MODES)}")


def check_strength(strength) -> None:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise InputError(f"denoising strength must be a number from 0 (keep the image) to 1 (repaint it fully), "
                         f"got {strength!r}")


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise InputError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
    return int(seed)


def random_seed() -> int:
    return random.randrange(2**32)  # the web UI's seeds are 32-bit, so every tool can take ours


def as_list(value, batch_size: int, name: str) -> list[str]:
    if isinstance(value, str):
        return [value] * batch_size
    value = list(value)
    if len(value) != batch_size:
        raise InputError(f"{name}: got {len(value)} texts for a batch of {batch_size}")
    return value


# -- conditioning, guidance, decoding -----------------------------------------------------------------


@torch.no_grad()
def encode_text(pipe: Pipeline, prompts: list[str], negative_prompts: list[str], clip_skip: int = 1,
                steps: Optional[int] = None):
    """Text embeddings for prompts and negative prompts, padded to the same number of 77-token chunks.

    Without `steps`: tensors (B, 77*n, D). With `steps`: ScheduledConditioning pairs that follow the
    web UI's prompt-editing syntax (`[from:to:when]`, `[a|b]`) over that many denoising steps.
    """
    from ..prompts import encode_conditioning, encode_prompts

    if clip_skip < 1 or clip_skip >= pipe.config.text.layers:
        raise InputError(f"clip skip must be between 1 and {pipe.config.text.layers - 1}, got {clip_skip}")
    if steps is not None:
        cond, uncond = encode_conditioning(pipe.text_encoder, prompts, negative_prompts, steps, clip_skip)
        return cond.to(pipe.dtype), uncond.to(pipe.dtype)
    embeddings = encode_prompts(pipe.text_encoder, list(negative_prompts) + list(prompts), clip_skip=clip_skip)
    uncond, cond = embeddings.chunk(2)
    return cond.to(pipe.dtype), uncond.to(pipe.dtype)  # (B, 77*n, D) each


def make_denoiser(pipe: Pipeline, cond, uncond, guidance_scale: float, sampler=None, sigmas=None, **extra):
    """The sampler's `model(x, sigma) -> denoised`: UNet + prediction-type wrapper + CFG.

    `sampler` (a SamplerSpec) says whether the UNet's timestep is rounded, as diffusers does for
    DPM++ 2M Karras; `sigmas` (the schedule the sampler walks) let scheduled conditioning find the
    step; `extra` is conditioning both CFG halves share (`concat`, `y`), which the UNet takes as is."""
    from ..denoisers import Denoiser
    from ..guidance import CFGDenoiser

    denoiser = Denoiser(pipe.unet, pipe.config.schedule, pipe.config.prediction,
                        quantize=bool(sampler is not None and sampler.quantize))
    return CFGDenoiser(denoiser, cond, uncond, guidance_scale, sigmas=sigmas, **extra)


def with_tiled_vae(pipe: Pipeline, tiled_vae: Optional[bool], width: int, height: int, batch_size: int) -> Pipeline:
    """The pipeline with its VAE tiling as `tiled_vae` says (None: above a megapixel or when an untiled
    pass would not fit). Checked now, so a size that cannot fit fails before sampling."""
    from ..devices import wants_tiled_vae
    from ..models.tiling import TiledVAE

    vae = pipe.vae.vae if isinstance(pipe.vae, TiledVAE) else pipe.vae
    vae_dtype = next(vae.parameters()).dtype
    tiled = wants_tiled_vae(pipe.config.vae, height, width, batch_size, vae_dtype, pipe.device, tiled_vae)
    return dataclasses.replace(pipe, vae=TiledVAE(vae, tiled))


@torch.no_grad()
def decode_latents(pipe: Pipeline, latents: torch.Tensor) -> list[Image.Image]:
    vae = pipe.vae
    vae_dtype = next(vae.parameters()).dtype
    images = vae.decode(latents.to(pipe.device, vae_dtype) / pipe.config.vae.scaling_factor)
    # the same rounding as diffusers' image processor, so images compare bit for bit
    array = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]


@torch.no_grad()
def encode_images(pipe: Pipeline, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f), sampled from the VAE's posterior."""
    return encode_posterior(pipe, images).sample(generator).to(pipe.dtype) * pipe.config.vae.scaling_factor


@torch.no_grad()
def encode_posterior(pipe: Pipeline, images: torch.Tensor):
    """(B, 3, H, W) in [-1, 1] -> the VAE's posterior q(z | x) (models/vae.py DiagonalGaussian), unscaled."""
    vae = pipe.vae
    vae_dtype = next(vae.parameters()).dtype
    return vae.encode(images.to(pipe.device, vae_dtype))


# -- web-UI parameters ----------------------------------------------------------------------------


_HASHES_FILE = os.path.join(os.path.expanduser("~"), ".cache", "sdlab", "hashes.json")


def model_hash(path: str) -> Optional[str]:
    """The web UI's 'Model hash': the first 10 hex digits of the file's SHA-256, cached by size+mtime."""
    if not os.path.isfile(path):
        return None
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{int(stat.st_mtime)}"
    try:
        with open(_HASHES_FILE) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        cache[key] = digest.hexdigest()
        try:
            os.makedirs(os.path.dirname(_HASHES_FILE), exist_ok=True)
            tmp = _HASHES_FILE + f".{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(cache, f)
            os.replace(tmp, _HASHES_FILE)
        except OSError:
            pass  # a read-only home only costs re-hashing next time
    return cache[key][:10]


_RNG_NAMES = {"a1111-cpu": "CPU", "a1111-gpu": "NV"}


def generation_params(pipe: Pipeline, *, steps, sampler, guidance_scale, seed, width, height, noise,
                      clip_skip=1, batch_size=1, batch_pos=0, extra=None) -> dict:
    """The web UI's field names and order; sdlab-only fields come after them."""
    params = {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": guidance_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": pipe.model_hash,
        "Model": pipe.model_name,
        "Clip skip": clip_skip if clip_skip != 1 else None,
        "Batch size": batch_size if batch_size > 1 else None,
        "Batch pos": batch_pos if batch_size > 1 else None,
        "RNG": _RNG_NAMES.get(noise),
        "Noise": noise if noise not in _RNG_NAMES else None,
        "Prediction": pipe.config.prediction if pipe.config.prediction != "epsilon" else None,
    }
    params.update(extra or {})
    params["Version"] = f"sdlab {__version__}"
    return params


def sampler_display_name(name: str) -> str:
    from ..samplers import resolve_sampler

    return resolve_sampler(name).name


# -- the denoising run every pipeline shares ------------------------------------------------------


def image_seeds(seed: int, batch_size: int, noise: str) -> list[int]:
    """The seed each image of a batch is reproduced with: the web UI gives image i seed+i."""
    if noise.startswith("a1111"):
        return [seed + i for i in range(batch_size)]
    return [seed] * batch_size


class NoiseDraws:
    """Every random number of one generation, drawn in the order its tool draws them.

    `noise="diffusers"`: one CPU generator seeded once hands out everything in call order, as in
    diffusers' pipelines. Its img2img pipeline draws the init image's VAE posterior sample, then the
    initial noise, then each stochastic step's noise; its inpainting pipeline draws [the init image's
    posterior sample,] the initial noise, the masked image's posterior sample, then the steps. A
    pipeline's `prepare` calls `posterior` and `initial` in that order.
    The other modes draw the initial and step noise as their tool does (noise.py) and take the
    posterior's mean: the web UI samples it from torch's global RNG, which its seed does not fix.
    `latents`, when given, replace the initial noise (it is still drawn, so the steps' noise stays put).
    """

    def __init__(self, mode: str, seed: int, batch_size: int, shape: tuple, latents: Optional[torch.Tensor] = None):
        self.shape = (batch_size, *shape)
        self._latents = latents
        self._initial = None
        if mode == "diffusers":
            self._generator = torch.Generator("cpu").manual_seed(seed)
            self._source = None
        else:
            self._generator = None
            self._source = noise_source(mode, seed, batch_size, shape)

    def posterior(self, shape) -> Optional[torch.Tensor]:
        """Standard-normal eps for a VAE posterior sample mean + std * eps; None: take the mean."""
        if self._generator is None:
            return None
        return torch.randn(tuple(shape), generator=self._generator)

    def initial(self) -> torch.Tensor:
        """The initial noise (B, C, h, w), drawn on the first call."""
        if self._initial is None:
            drawn = self._source.initial() if self._source else torch.randn(self.shape, generator=self._generator)
            self._initial = drawn if self._latents is None else self._latents.float().cpu()
        return self._initial

    def step(self) -> torch.Tensor:
        """The next stochastic step's noise (B, C, h, w)."""
        self.initial()
        if self._source is not None:
            return self._source.step_noise()
        return torch.randn(self.shape, generator=self._generator)


@dataclass
class Run:
    """The checked settings and random numbers of one generation, as a pipeline's `prepare` sees them."""

    pipe: Pipeline
    batch_size: int
    width: int
    height: int
    seed: int
    steps: int
    start_step: int  # steps skipped: steps - int(steps * strength)
    draws: NoiseDraws

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return self.draws.shape

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pixels in [-1, 1] -> scaled latents (batch_size, C, h, w), one posterior draw.

        N = 1 (one image for the whole batch) or batch_size; diffusers encodes the image once and
        repeats its latents over the batch, and so draws the posterior noise for N images only.
        Float32 on the CPU, like the noise: `prepare` mixes them freely and `generate` moves the result."""
        if pixels.shape[0] not in (1, self.batch_size):
            raise InputError(f"got {pixels.shape[0]} images for a batch of {self.batch_size}")
        posterior = encode_posterior(self.pipe, pixels)
        mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
        eps = self.draws.posterior(mean.shape)
        z = mean if eps is None else mean + std * eps
        latents = z * self.pipe.config.vae.scaling_factor
        return latents.expand(self.batch_size, -1, -1, -1).contiguous()


@dataclass
class Start:
    """What an editing pipeline changes in the shared run; txt2img changes nothing.

    init_latents (B, C, h, w): clean latents noised to the first sigma used (img2img); required
    when strength < 1. conditioning: UNet inputs both CFG halves share, e.g. {"concat": (B, 5, h, w)}
    (inpainting UNets' mask + masked-image latents) or {"y": (B,)}. keep_latents + repaint_mask
    (B, 1, h, w), 1 = repaint: inpainting with an ordinary UNet (KeepOutsideMask).
    """

    init_latents: Optional[torch.Tensor] = None
    conditioning: dict = field(default_factory=dict)
    keep_latents: Optional[torch.Tensor] = None
    repaint_mask: Optional[torch.Tensor] = None


class KeepOutsideMask(torch.nn.Module):
    """Inpainting with any UNet: outside the mask, the original latents noised to the current sigma
    replace what the sampler made, so only the masked area is generated.

    diffusers' StableDiffusionInpaintPipeline does this for 4-channel UNets after every scheduler step,
    `(1 - mask) * add_noise(image_latents, noise, t_next) + mask * latents`; the next model call is the
    first place a denoiser sees that step's result. The samplers hand the model the very tensor they
    step, so the blend is written into it in place and the sampler carries the blended latents on.
    The first call sees the sampler's own start, as diffusers' first step does; `finish` blends the
    returned latents with the clean originals, as diffusers' last step does.
    """

    def __init__(self, model, latents: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.model, self.latents, self.noise, self.mask = model, latents, noise, mask
        self.calls = 0

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if self.calls:
            s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
            x.copy_((1 - self.mask) * (self.latents + self.noise * s) + self.mask * x)
        self.calls += 1
        return self.model(x, sigma)

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        return (1 - self.mask) * self.latents + self.mask * latents


def unmasked_concat(run: Run) -> torch.Tensor:
    """(B, 5, h, w) for an inpainting UNet used without a mask (txt2img, img2img): everything is to be
    painted (mask 1) and the masked image is all grey (0 in [-1, 1]), as the web UI conditions them."""
    pixels = torch.zeros(1, 3, run.height, run.width)
    grey = encode_posterior(run.pipe, pixels).mode().float() * run.pipe.config.vae.scaling_factor
    b, _, h, w = run.latent_shape
    return torch.cat([torch.ones(1, 1, h, w), grey.cpu()], dim=1).expand(b, -1, -1, -1)


@torch.no_grad()
def generate(
    pipe: Pipeline,
    prompt,
    negative_prompt="",
    *,
    steps: int = 20,
    guidance_scale: float = 7.0,
    seed: Optional[int] = None,
    width: Optional[int] = None,
    height: Optional[int] = None,
    batch_size: int = 1,
    sampler: str = DEFAULT_SAMPLER,
    noise: str = "diffusers",
    latents: Optional[torch.Tensor] = None,
    clip_skip: int = 1,
    eta: Optional[float] = None,
    callback: Optional[Callable[[dict], None]] = None,
    strength: float = 1.0,
    prepare: Optional[Callable[[Run], Start]] = None,
    params: Optional[dict] = None,
    loras=(),
    lora_dirs=(),
    lora_mode: str = "merge",
    tiled_vae: Optional[bool] = None,
) -> GenerationResult:
    """The denoising run of every pipeline: check the settings, seed the noise, condition on the
    prompts, sample, decode, describe each image in the web UI's words.

    The pipelines differ only in `prepare(run) -> Start` (init latents, extra UNet inputs, latent
    blending) and in `params`, their extra infotext fields. `strength` < 1 skips the first
    steps - int(steps * strength) steps, as diffusers' img2img does; with no step left the init
    latents are decoded as they are. `loras` ([file | (file, weight)]) and the prompts' `<lora:name:w>`
    tags (files found by stem in `lora_dirs`) are applied before encoding, merged or on the fly
    (`lora_mode` "merge" | "dynamic"). `tiled_vae`: decode/encode in tiles (None: when the image is
    large or would not fit). Other arguments: see txt2img.
    """
    from ..adapters import apply_prompt_adapters

    width = width or pipe.config.resolution
    height = height or pipe.config.resolution
    check_size(width, height, pipe.latent_factor)
    check_steps(steps)
    check_noise(noise)
    check_strength(strength)
    spec = resolve_sampler(sampler)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
    pipe = with_tiled_vae(pipe, tiled_vae, width, height, batch_size)
    prompts = as_list(prompt, batch_size, "prompt")
    negatives = as_list(negative_prompt, batch_size, "negative prompt")
    clean, clean_negatives, adapter_fields = apply_prompt_adapters(
        pipe, prompts, negatives, loras=loras, lora_search=lora_dirs, mode=lora_mode)
    check_prompts(clean, clean_negatives)
    seed = check_seed(random_seed() if seed is None else seed)

    shape = (pipe.config.latent_channels, height // pipe.latent_factor, width // pipe.latent_factor)
    if latents is not None and tuple(latents.shape) != (batch_size, *shape):
        raise InputError(f"latents must have shape {(batch_size, *shape)}, got {tuple(latents.shape)}")
    denoise_steps = min(int(steps * strength), steps)
    run = Run(pipe, batch_size, width, height, seed, steps, steps - denoise_steps,
              NoiseDraws(noise, seed, batch_size, shape, latents))
    start = prepare(run) if prepare is not None else Start()
    if run.start_step and start.init_latents is None:
        raise InputError(f"denoising strength {strength} needs an init image to start from")
    initial_noise = run.draws.initial()

    conditioning = dict(start.conditioning)
    if pipe.config.unet.in_channels == shape[0] + 5 and "concat" not in conditioning:
        conditioning["concat"] = unmasked_concat(run)
    extra_channels = conditioning["concat"].shape[1] if "concat" in conditioning else 0
    if pipe.config.unet.in_channels != shape[0] + extra_channels:
        raise InputError(f"{pipe.config.name}: this UNet takes {pipe.config.unet.in_channels} input channels, "
                         f"this pipeline gives it {shape[0] + extra_channels}; use the pipeline made for it")
    conditioning = {key: value.to(pipe.device) for key, value in conditioning.items()}

    if denoise_steps == 0:
        latents = start.init_latents.to(pipe.device)
    else:
        cond, uncond = encode_text(pipe, clean, clean_negatives, clip_skip, steps=denoise_steps)
        sigmas = sampler_sigmas(spec, pipe.config.schedule, steps)[run.start_step:]
        model = make_denoiser(pipe, cond, uncond, guidance_scale, sampler=spec, sigmas=sigmas, **conditioning)
        if start.repaint_mask is not None:
            model = KeepOutsideMask(model, start.keep_latents.to(pipe.device, torch.float32),
                                    initial_noise.to(pipe.device), start.repaint_mask.to(pipe.device, torch.float32))
        init = start.init_latents.to(pipe.device, torch.float32) if start.init_latents is not None else None
        latents = sample(
            spec, model, initial_noise.to(pipe.device, torch.float32), pipe.config.schedule, steps,
            step_noise=lambda: run.draws.step().to(pipe.device), eta=eta, callback=callback,
            start_step=run.start_step, init_latents=init,
        )
        if start.repaint_mask is not None:
            latents = model.finish(latents)
    images = decode_latents(pipe, latents)

    seeds = image_seeds(seed, batch_size, noise)
    infotexts = []
    for i, image_seed in enumerate(seeds):
        fields = generation_params(
            pipe, steps=steps, sampler=spec.name, guidance_scale=guidance_scale, seed=image_seed,
            width=width, height=height, noise=noise, clip_skip=clip_skip, batch_size=batch_size,
            batch_pos=i, extra={**(params or {}), **adapter_fields, "Eta": eta},
        )
        infotexts.append(format_infotext(prompts[i], negatives[i], fields))
    return GenerationResult(images, infotexts, seeds, latents)
