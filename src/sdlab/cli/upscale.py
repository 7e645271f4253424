"""Command-line pieces for super-resolution: `sdlab upscale` and the hires-fix options of `sdlab generate`.

generate.py adds the hires options to `sdlab generate` and hands `--hires-scale` to cmd_hires.
"""

from __future__ import annotations

import argparse
import time

from ..errors import InputError
from .common import (add_generation_options, add_tiled_vae_option, check_image_file, load_for, prepare_generation,
                     run_and_save, seed_kwargs)
from .sizing import image_size, refuse_too_large


HIRES_UPSCALER_CHOICES = ("latent", "latent-nearest-exact", "lanczos")  # pipelines/hires.HIRES_UPSCALERS' keys
HIRES_STRENGTH, HIRES_UPSCALER = 0.5, "latent"  # the second pass's defaults, as hires_fix()'s


def add_hires_options(parser: argparse.ArgumentParser) -> None:
    """The web UI's "Hires. fix" as options of `sdlab generate`."""
    group = parser.add_argument_group("hires fix", "generate at --size, enlarge, then repaint part-way at the larger size")
    group.add_argument("--hires-scale", type=float, default=None,
                       help="enlarge by this factor (e.g. 2) and run the second pass; off when not given")
    group.add_argument("--hires-strength", type=float, default=None,
                       help=f"denoising strength of the second pass (default {HIRES_STRENGTH}; below 0.5 the "
                            "latent upscaler blurs)")
    group.add_argument("--hires-steps", type=int, default=None, help="steps of the second pass (default: --steps)")
    group.add_argument("--hires-upscaler", default=None, choices=HIRES_UPSCALER_CHOICES,
                       help="enlarge the latents (bilinear or nearest-exact) or the decoded pixels (lanczos); "
                            f"default: {HIRES_UPSCALER}")
    add_tiled_vae_option(parser)


def resolve_hires_options(args) -> None:
    """The hires options' defaults filled in when --hires-scale turns the fix on; a second-pass option
    without --hires-scale would change nothing, so it is refused in one line."""
    given = [f"--{name.replace('_', '-')}" for name in ("hires_strength", "hires_steps", "hires_upscaler")
             if getattr(args, name, None) is not None]
    if args.hires_scale is None:
        if given:
            raise InputError(f"{', '.join(given)} set{'s' if len(given) == 1 else ''} the hires fix's second pass, "
                             "which runs only with --hires-scale: add --hires-scale (e.g. 2) or leave "
                             f"{'it' if len(given) == 1 else 'them'} out")
        return
    if args.hires_strength is None:
        args.hires_strength = HIRES_STRENGTH
    if args.hires_upscaler is None:
        args.hires_upscaler = HIRES_UPSCALER


def _common_kwargs(args) -> dict:
    return dict(steps=args.steps, guidance_scale=args.cfg, seed=args.seed, sampler=args.sampler,
                schedule_type=args.schedule, tiling=args.tiling, noise=args.noise,
                clip_skip=args.clip_skip, eta=args.eta, loras=args.lora, lora_dirs=args.lora_dir,
                lora_mode=args.lora_mode, fast=args.fast, compile=args.compile, prepack=args.prepack,
                self_attention_scale=args.self_attention_scale, **seed_kwargs(args))


def cmd_hires(args) -> int:
    """`sdlab generate ... --hires-scale S`: txt2img, then the hires pass; one progress bar for both."""
    resolve_hires_options(args)
    from ..pipelines.hires import hires_fix, hires_size

    prepare_generation(args)
    started = time.perf_counter()
    hires_steps = args.steps if args.hires_steps is None else args.hires_steps

    def sizes(config):  # both passes: the first at --size, the second enlarged
        first = args.size or (config.resolution, config.resolution)
        return [first, hires_size(*first, args.hires_scale, config.vae.downsample_factor)]

    pipe = load_for(args, sizes=sizes)
    width, height = args.size or (None, None)
    return run_and_save(args, started, lambda step: hires_fix(
        pipe, args.prompt, args.negative, hires_scale=args.hires_scale, hires_strength=args.hires_strength,
        hires_steps=args.hires_steps, hires_upscaler=args.hires_upscaler, width=width, height=height,
        batch_size=args.batch, tiled_vae=args.tiled_vae, callback=step, **_common_kwargs(args)), args.steps + hires_steps)


def cmd_upscale(args) -> int:
    from ..pipelines.images import load_image
    from ..pipelines.upscale import SCALE, upscale

    prepare_generation(args)
    if args.size is not None or args.batch != 1:
        raise InputError("upscale takes its size from the image (4 times larger) and one image per run; "
                         "leave out --size and --batch")
    check_image_file(args.image, "image to upscale")
    started = time.perf_counter()
    width, height = image_size(args.image, "image to upscale")
    sizes = lambda config: [(width * SCALE, height * SCALE)]  # noqa: E731
    checked = refuse_too_large(args, "upscale", sizes)  # the 4x output, before the image is decoded
    image = load_image(args.image, "image to upscale")  # bad input fails before the model loads
    pipe = load_for(args, "upscale", sizes, checked)
    return run_and_save(args, started, lambda step: upscale(
        pipe, image, args.prompt, args.negative, noise_level=args.noise_level, tiled_vae=args.tiled_vae,
        callback=step, **_common_kwargs(args)), args.steps)


def add_upscale_command(commands) -> None:
    """`sdlab upscale low.png PROMPT --model x4-upscaler-ema.safetensors -o big.png`."""
    parser = commands.add_parser("upscale", help="4x super-resolution with the SD x4 upscaler model",
                                 description="4x super-resolution with the SD x4 upscaler model; --cfg defaults "
                                             "to 9 here, diffusers' default for it")
    parser.add_argument("image", help="the low-resolution image (PNG, JPEG, WebP)")
    add_generation_options(parser, default_size="4 times the image", kind="extras", cfg=9.0)
    parser.add_argument("--noise-level", type=int, default=20,
                        help="noise added to the image before upscaling, 0-350 (default 20): more repairs "
                             "artefacts and invents more detail")
    add_tiled_vae_option(parser)
    parser.set_defaults(run=cmd_upscale)
