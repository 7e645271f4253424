"""The denoising run every pipeline shares: check the settings, seed the noise, condition on the
prompts, sample, decode, describe each image in the web UI's words.

A pipeline customises it with a small `prepare(run) -> Start` (init latents, extra UNet inputs, latent
blending) and its own infotext fields (STYLE principle 5).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..adapters import apply_prompt_adapters, lora_request_tags
from ..compile import sampling_unet
from ..denoisers import Denoiser
from ..errors import InputError, TooLargeError
from ..fast.deepcache import DeepCacheUNet, whole_above_timestep
from ..fast.modes import FastModes, as_fast_modes
from ..fast.tome import token_merging
from ..guidance import CFGDenoiser
from ..infotext import format_infotext
from ..memory import available_memory_bytes, check_generation_fits, gib, hooked_attention
from ..models.attention import sharpened_self_attention, text_projections_cached
from ..models.prepack import available as prepack_available, prepacked, unpacked_bytes
from ..models.seamless import seamless
from ..samplers import resolve_sampler, sample, sampler_and_schedule_names, sampler_sigmas
from .checks import (as_list, check_batch_size, check_noise, check_prompts, check_self_attention_scale, check_steps,
                     check_strength, size_or_default)
from .latents import decode_latents, encode_posterior, with_tiled_vae
from .masks import KeepOutsideMask, unmasked_concat
from .options import GenerationOptions
from .params import generation_params
from .pipeline import GenerationResult, Pipeline
from .seeds import NoiseDraws, image_seeds, resolve_seed, resolve_subseed, seed_variation
from .text import encode_text


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
    (B, 1, h, w), 1 = repaint: inpainting with an ordinary UNet (masks.KeepOutsideMask).
    """

    init_latents: Optional[torch.Tensor] = None
    conditioning: dict = field(default_factory=dict)
    keep_latents: Optional[torch.Tensor] = None
    repaint_mask: Optional[torch.Tensor] = None


def make_denoiser(pipe: Pipeline, cond, uncond, guidance_scale: float, sampler=None, sigmas=None,
                  fast: FastModes = FastModes(), compile=False, **extra):
    """The sampler's `model(x, sigma) -> denoised`: UNet + prediction-type wrapper + CFG.

    `sampler` (a SamplerSpec) says whether the UNet's timestep is rounded, as diffusers does for
    DPM++ 2M Karras; `sigmas` (the schedule the sampler walks) let scheduled conditioning find the
    step; `extra` is conditioning both CFG halves share (`concat`, `y`), which the UNet takes as is.
    `fast`: the fast modes acting here, DeepCache around the UNet and CFG truncation (fast/modes.py).
    `compile`: the UNet runs compiled (compile.py), with the weights it has now."""
    if compile and (fast.deepcache is not None or fast.token_merging):
        raise InputError("--compile works with the exact UNet and --fast cfg-trunc only; leave out --compile "
                         "for --fast deepcache or tome")
    quantize = bool(sampler is not None and sampler.quantize)
    if fast.deepcache is not None:
        whole_above = whole_above_timestep(fast.deepcache_whole_first, sigmas, pipe.config.schedule, quantize)
        unet = DeepCacheUNet(pipe.unet, fast.deepcache, fast.deepcache_depth, whole_above)
    else:
        unet = sampling_unet(pipe.unet, compile)
    denoiser = Denoiser(unet, pipe.config.schedule, pipe.config.prediction, quantize=quantize)
    return CFGDenoiser(denoiser, cond, uncond, guidance_scale, sigmas=sigmas, truncation=fast.cfg_truncation, **extra)


def vae_tiling(options: GenerationOptions) -> Optional[bool]:
    """`options.tiled_vae` as the run may use it: seamless images (`tiling`) need the whole VAE, because
    a tile's convolutions would wrap around the tile instead of the image and draw its seams."""
    if not options.tiling:
        return options.tiled_vae
    if options.tiled_vae:
        raise InputError("seamless tiling (tiling, --tiling) needs the whole VAE: leave out tiled_vae (--tiled-vae), "
                         "or generate a smaller texture")
    return False


def over_batches(options: GenerationOptions, run_batch: Callable[[GenerationOptions], GenerationResult]) -> GenerationResult:
    """The web UI's batch count: `options.n_iter` batches of `run_batch` one after another, all images
    returned together. Seeds go on from batch to batch as the web UI's do: batch k starts at seed +
    k * batch_size (with a variation strength the seed stays and the variation seed goes on instead),
    so every image keeps the seed it would have in one long batch. The callback's step dicts say which
    batch they belong to ("batch": k)."""
    n_iter = options.n_iter
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise InputError(f"batch count (n_iter) must be a positive integer, got {n_iter!r}")
    if n_iter > 1 and options.latents is not None:
        raise InputError("latents replace the noise of one batch; give them with n_iter 1")
    seed = resolve_seed(options.seed)
    subseed = resolve_subseed(options.subseed, options.subseed_strength)
    results = []
    for k in range(n_iter):
        offset = k * options.batch_size
        callback = options.callback
        results.append(run_batch(dataclasses.replace(
            options, n_iter=1, seed=seed if options.subseed_strength else seed + offset,
            subseed=subseed + offset if options.subseed_strength else subseed,
            callback=None if callback is None else (lambda info, k=k: callback({**info, "batch": k})),
        )))
    if n_iter == 1:
        return results[0]
    latents = [r.latents for r in results]
    return GenerationResult(
        [image for r in results for image in r.images], [text for r in results for text in r.infotexts],
        [s for r in results for s in r.seeds], None if any(x is None for x in latents) else torch.cat(latents),
    )


@torch.no_grad()
def generate(
    pipe: Pipeline,
    options: GenerationOptions,
    *,
    strength: float = 1.0,
    prepare: Optional[Callable[[Run], Start]] = None,
    params: Optional[dict] = None,
) -> GenerationResult:
    """The denoising run of every pipeline, for `options` (options.GenerationOptions).

    The pipelines differ only in `prepare(run) -> Start` and in `params`, their extra infotext fields.
    `strength` < 1 skips the first steps - int(steps * strength) steps, as diffusers' img2img does;
    with no step left the init latents are decoded as they are. LoRAs (`options.loras` and the prompts'
    `<lora:name:w>` tags) are applied before encoding, merged or on the fly (`options.lora_mode`).
    `options.tiling` makes the UNet and the VAE seamless for the whole run, encoding an init image included;
    `options.self_attention_scale` other than 1 sharpens (or softens) the UNet's self-attention for the run.
    `options.n_iter` batches run one after another (over_batches), `prepare` once for each.
    """
    if options.n_iter != 1:
        return over_batches(options, lambda batch: generate(pipe, batch, strength=strength, prepare=prepare,
                                                            params=params))
    width, height = size_or_default(pipe, options.width, options.height)
    check_steps(options.steps)
    check_noise(options.noise)
    check_strength(strength)
    sampler_and_schedule_names(options.sampler, options.schedule_type)  # an unknown or unfit name fails here
    check_batch_size(options.batch_size)
    check_self_attention_scale(options.self_attention_scale)
    fast = as_fast_modes(options.fast)
    # refused with one line before anything large is allocated, for the Python API and the server as for the CLI
    estimate = check_generation_fits(pipe.config, width, height, options.batch_size, pipe.device, pipe.dtype,
                                     guidance=options.guidance_scale != 1, tiled_vae=vae_tiling(options),
                                     steps=options.steps, weights_loaded=True, hooked=hooked_attention(pipe.unet))
    pipe = with_tiled_vae(pipe, vae_tiling(options), width, height, options.batch_size)
    latent_size = (height // pipe.latent_factor, width // pipe.latent_factor)
    if options.prepack:
        check_prepack_fits(pipe, options, estimate.work)
    sharpened = options.self_attention_scale != 1
    with seamless(pipe.unet, pipe.vae) if options.tiling else nullcontext(), text_projections_cached(pipe.unet), \
            prepacked(pipe.unet, options.prepack), \
            token_merging(pipe.unet, fast.token_merging, latent_size) if fast.token_merging else nullcontext(), \
            sharpened_self_attention(pipe.unet, options.self_attention_scale) if sharpened else nullcontext():
        return _generate(pipe, options, width, height, strength, prepare, params)


def check_prepack_fits(pipe: Pipeline, options: GenerationOptions, work: int) -> None:
    """`prepack` asks for a second copy of the UNet's weights on CPU (models/prepack.py): refuse it, with one
    line, where the machine has not that much free beside the run's `work` (bytes), off fp32 on a CPU, without
    oneDNN, or with `compile` (Inductor packs the weights of the graph it builds itself)."""
    if options.compile:
        raise InputError("--prepack and --compile both prepare the UNet's weights for the CPU: use one "
                         "(--compile also fuses the work between layers but compiles for minutes the first time)")
    if not prepack_available():
        raise InputError("--prepack needs a torch built with oneDNN (torch's x86 CPU builds are); leave it out")
    if pipe.device.type != "cpu" or pipe.dtype != torch.float32:
        raise InputError(f"--prepack is for fp32 on a CPU (this run: {pipe.dtype} on {pipe.device.type}); leave it out")
    packs, free = unpacked_bytes(pipe.unet), available_memory_bytes(pipe.device)
    if free is not None and work + packs > free:
        raise TooLargeError(f"--prepack needs about {gib(packs)} more for the UNet's packed weights, beside "
                            f"{gib(work)} for the run, but the machine has {gib(free)} free: leave out --prepack")


def _generate(pipe: Pipeline, options: GenerationOptions, width: int, height: int, strength: float,
              prepare: Optional[Callable[[Run], Start]], params: Optional[dict]) -> GenerationResult:
    """generate() after its checks, with the VAE tiled or not and the networks seamless when asked."""
    spec = resolve_sampler(options.sampler)
    prompts = as_list(options.prompt, options.batch_size, "prompt")
    negatives = as_list(options.negative_prompt, options.batch_size, "negative prompt")
    seed = resolve_seed(options.seed)
    subseed = resolve_subseed(options.subseed, options.subseed_strength)
    variation = seed_variation(subseed, options.subseed_strength, options.seed_resize_from, options.batch_size,
                               pipe.latent_factor)
    clean, clean_negatives, adapter_fields = apply_prompt_adapters(
        pipe, prompts, negatives, loras=options.loras, lora_search=options.lora_dirs, mode=options.lora_mode)
    check_prompts(clean, clean_negatives)

    shape = (pipe.config.latent_channels, height // pipe.latent_factor, width // pipe.latent_factor)
    if options.latents is not None and tuple(options.latents.shape) != (options.batch_size, *shape):
        raise InputError(f"latents must have shape {(options.batch_size, *shape)}, got {tuple(options.latents.shape)}")
    denoise_steps = min(int(options.steps * strength), options.steps)
    run = Run(pipe, options.batch_size, width, height, seed, options.steps, options.steps - denoise_steps,
              NoiseDraws(options.noise, seed, options.batch_size, shape, options.latents, variation))
    start = prepare(run) if prepare is not None else Start()
    if run.start_step and start.init_latents is None:
        raise InputError(f"denoising strength {strength} needs an init image to start from")
    initial_noise = run.draws.initial()

    conditioning = dict(start.conditioning)
    if pipe.config.unet.in_channels == shape[0] + 5 and "concat" not in conditioning:
        conditioning["concat"] = unmasked_concat(pipe, options.batch_size, width, height)
    extra_channels = conditioning["concat"].shape[1] if "concat" in conditioning else 0
    if pipe.config.unet.in_channels != shape[0] + extra_channels:
        raise InputError(f"{pipe.config.name}: this UNet takes {pipe.config.unet.in_channels} input channels, "
                         f"this pipeline gives it {shape[0] + extra_channels}; use the pipeline made for it")
    conditioning = {key: value.to(pipe.device) for key, value in conditioning.items()}

    if denoise_steps == 0:
        latents = start.init_latents.to(pipe.device)
    else:
        if options.text_embeddings is not None:
            cond, uncond = (embedding.to(pipe.device, pipe.dtype) for embedding in options.text_embeddings)
        else:
            cond, uncond = encode_text(pipe, clean, clean_negatives, options.clip_skip, steps=denoise_steps)
        sigmas = sampler_sigmas(spec, pipe.config.schedule, options.steps,
                                schedule_type=options.schedule_type)[run.start_step:]
        model = make_denoiser(pipe, cond, uncond, options.guidance_scale, sampler=spec, sigmas=sigmas,
                              fast=as_fast_modes(options.fast), compile=options.compile, **conditioning)
        if start.repaint_mask is not None:
            model = KeepOutsideMask(model, start.keep_latents.to(pipe.device, torch.float32),
                                    initial_noise.to(pipe.device), start.repaint_mask.to(pipe.device, torch.float32))
        init = start.init_latents.to(pipe.device, torch.float32) if start.init_latents is not None else None
        latents = sample(
            spec, model, initial_noise.to(pipe.device, torch.float32), pipe.config.schedule, options.steps,
            step_noise=lambda: run.draws.step().to(pipe.device), eta=options.eta, callback=options.callback,
            start_step=run.start_step, init_latents=init, schedule_type=options.schedule_type,
        )
        if start.repaint_mask is not None:
            latents = model.finish(latents)
    images = decode_latents(pipe, latents)

    seeds = image_seeds(seed, options.batch_size, options.noise, variation)
    subseeds = list(variation.subseeds) if variation is not None and variation.strength else [None] * len(seeds)
    # LoRAs asked for beside the prompt are written into it as the web UI's tags, which are all it knows
    lora_tags = lora_request_tags(options.loras)
    sampler_name, schedule_label = sampler_and_schedule_names(spec, options.schedule_type)
    sdlab_fields = {"Eta": options.eta, "Fast": as_fast_modes(options.fast).spec(),
                    "Self-attention scale": options.self_attention_scale if options.self_attention_scale != 1 else None}
    infotexts = []
    for i, image_seed in enumerate(seeds):
        fields = generation_params(
            pipe, steps=options.steps, sampler=sampler_name, schedule_type=schedule_label,
            guidance_scale=options.guidance_scale, seed=image_seed, tiling=options.tiling,
            width=width, height=height, noise=options.noise, clip_skip=options.clip_skip, batch_size=options.batch_size,
            batch_pos=i, subseed=subseeds[i], subseed_strength=options.subseed_strength,
            seed_resize_from=options.seed_resize_from, extra={**(params or {}), **adapter_fields, **sdlab_fields},
        )
        prompt = " ".join(text for text in (prompts[i], lora_tags) if text)
        infotexts.append(format_infotext(prompt, negatives[i], fields))
    return GenerationResult(images, infotexts, seeds, latents)
