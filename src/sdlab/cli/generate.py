"""`sdlab generate`, `img2img`, `inpaint` and `outpaint`: the commands that paint an image from a prompt."""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..errors import InputError
from .common import (add_generation_options, apply_params_from, check_image_file, load_for, prepare_generation,
                     run_and_save, seed_kwargs)
from .saving import check_writable_file, grid_path, output_paths
from .sizing import image_size, refuse_too_large
from .upscale import add_hires_options, cmd_hires, resolve_hires_options


def add_generate_commands(commands) -> None:
    """Register generate, img2img, inpaint and outpaint on sdlab's subcommands."""
    generate = commands.add_parser("generate", help="text to image")
    add_generation_options(generate, params_from=True)
    generate.add_argument("--attention-maps", metavar="PNG", default=None,
                          help="also write where each word of the prompt was read (cross-attention, first image)")
    generate.add_argument("--trajectory", metavar="FILE", default=None,
                          help="also write the denoising trajectory of the first image: the latents and the predicted "
                               "clean image every --every steps, as a .webp or .gif animation with a .png grid beside "
                               "it, or as a .png grid alone")
    generate.add_argument("--every", type=int, default=None, metavar="N",
                          help="with --trajectory: record every Nth step (default 5)")
    add_hires_options(generate)
    generate.set_defaults(run=cmd_generate)

    img2img = commands.add_parser("img2img", help="repaint an image towards a prompt")
    add_generation_options(img2img, default_size="the image's", kind="img2img", params_from=True)
    add_init_options(img2img, strength=0.75)
    img2img.set_defaults(run=cmd_img2img)

    inpaint = commands.add_parser("inpaint", help="repaint the white part of a mask")
    add_generation_options(inpaint, default_size="the image's; with --only-masked the model's", kind="inpaint",
                           params_from=True)
    add_init_options(inpaint, strength=0.75)
    inpaint.add_argument("--mask", required=True, help="mask image: white = repaint, black = keep")
    add_mask_options(inpaint)
    inpaint.add_argument("--only-masked", action="store_true",
                         help="inpaint a box around the mask at --size (default: the model's), paste it back")
    inpaint.add_argument("--padding", type=int, default=32,
                         help="with --only-masked: pixels around the mask (default 32)")
    inpaint.add_argument("--invert-mask", action="store_true", help="repaint the black part instead")
    inpaint.set_defaults(run=cmd_inpaint)

    outpaint = commands.add_parser("outpaint", help="extend an image's canvas and paint the new margins")
    add_generation_options(outpaint, default_size="the image's plus --extend; not settable", kind="outpaint")
    add_init_options(outpaint, strength=0.8, resize=False)
    outpaint.add_argument("--extend", required=True, help="pixels per side, e.g. left=64,right=0,top=0,bottom=64")
    outpaint.add_argument("--overlap", type=int, default=8,
                          help="pixels of the image repainted along the seam (default 8)")
    add_mask_options(outpaint)
    outpaint.set_defaults(run=cmd_outpaint)


def add_init_options(parser: argparse.ArgumentParser, strength: float, resize: bool = True) -> None:
    """Options of the commands that start from an image."""
    parser.add_argument("--init", required=True, help="the image to start from (PNG, JPEG, WebP)")
    parser.add_argument("--strength", type=float, default=strength,
                        help=f"denoising strength: 0 keeps the image, 1 repaints it fully (default {strength})")
    if resize:
        parser.add_argument("--resize-mode", default="just", choices=("just", "crop", "fill"),
                            help="how the image meets --size: stretch, crop the overflow, or fit and stretch "
                                 "the edges into the borders (default just)")


def add_mask_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mask-blur", type=float, default=4, help="Gaussian blur of the mask edge in pixels (default 4)")
    parser.add_argument("--fill", default="original", choices=("original", "fill", "latent-noise", "latent-nothing"),
                        help="what the masked area starts from below strength 1 (default original)")


def generation_kwargs(args) -> dict:
    """The `generate` options as keyword arguments of every pipeline."""
    width, height = args.size or (None, None)
    return dict(steps=args.steps, guidance_scale=args.cfg, seed=args.seed, width=width, height=height,
                batch_size=args.batch, sampler=args.sampler, schedule_type=args.schedule, tiling=args.tiling,
                noise=args.noise, clip_skip=args.clip_skip, eta=args.eta,
                loras=args.lora, lora_dirs=args.lora_dir, lora_mode=args.lora_mode,
                tiled_vae=getattr(args, "tiled_vae", None), fast=args.fast, compile=args.compile, prepack=args.prepack,
                self_attention_scale=args.self_attention_scale, **seed_kwargs(args))


def cmd_generate(args) -> int:
    apply_params_from(args)
    resolve_hires_options(args)
    if args.hires_scale and args.attention_maps:
        raise InputError("--attention-maps maps one sampling pass; leave out --hires-scale")
    if args.n_iter != 1 and args.attention_maps:
        raise InputError("--attention-maps maps one batch; leave out --n-iter")
    from ..fast.modes import as_fast_modes

    fast = as_fast_modes(args.fast)
    if args.attention_maps and (fast.deepcache is not None or fast.token_merging is not None):
        # cached steps skip the deep layers' attention and merged tokens shrink the maps: the sum would
        # weigh layers and steps unevenly
        raise InputError("--attention-maps records every layer at every step; leave out --fast deepcache/tome "
                         "(cfg-trunc may stay)")
    if args.hires_scale and args.trajectory:
        raise InputError("--trajectory follows one sampling pass; leave out --hires-scale")
    if args.hires_scale:
        return cmd_hires(args)
    prepare_generation(args)
    if args.attention_maps:
        check_writable_file(args.attention_maps)
        if not args.attention_maps.lower().endswith(".png"):
            raise InputError(f"--attention-maps must be a .png file, got '{args.attention_maps}'")
        images = output_paths(args.output, args.batch * args.n_iter) + [grid_path(args.output)] if args.output else []
        if os.path.abspath(args.attention_maps) in map(os.path.abspath, images):
            raise InputError(f"--attention-maps {args.attention_maps} is also an image output; give it its own file")
    if args.trajectory:
        check_trajectory_option(args)
    elif args.every is not None:
        raise InputError("--every sets the steps --trajectory records; give --trajectory FILE too")
    started = time.perf_counter()
    pipe = load_for(args)

    def run(step):
        return pipe.txt2img(args.prompt, args.negative, callback=step, **generation_kwargs(args))

    if args.trajectory:
        run = run_saving_trajectory(args, pipe, run)
    if args.attention_maps:
        return run_and_save(args, started, lambda step: run_saving_attention_maps(args, pipe, run, step), args.steps)
    return run_and_save(args, started, run, args.steps)


def check_trajectory_option(args) -> None:
    """--trajectory's files can be written and are none of the image outputs; --every is 1 or more."""
    from ..inside.trajectory import Trajectory, trajectory_paths

    Trajectory(5 if args.every is None else args.every)
    paths = trajectory_paths(args.trajectory)
    for path in paths:
        check_writable_file(path)
    taken = output_paths(args.output, args.batch * args.n_iter) + [grid_path(args.output)] if args.output else []
    taken += [args.attention_maps] if args.attention_maps else []
    clash = set(map(os.path.abspath, paths)) & set(map(os.path.abspath, taken))
    if clash:
        raise InputError(f"--trajectory would write {', '.join(sorted(clash))}, which is also an output; "
                         "give the trajectory its own file name")


def run_saving_trajectory(args, pipe, run):
    """`run`, recording the first image's trajectory and writing it to --trajectory (module inside.trajectory)."""
    from ..inside.trajectory import Trajectory, save_trajectory

    def run_recording(step):
        trajectory = Trajectory(5 if args.every is None else args.every, then=step)
        result = run(trajectory)
        for path in save_trajectory(trajectory.frames(pipe, result), args.trajectory):
            print(f"wrote {path}")
        return result

    return run_recording


def run_saving_attention_maps(args, pipe, run, step):
    """`run(step)` with the UNet's cross-attention recorded; writes the first image's word maps to
    --attention-maps (temp file, then rename) and returns run's result."""
    from ..models.attention import recorded_cross_attention
    from ..inside.attention_maps import WordMaps, attention_sheet, prompt_words

    words = prompt_words(args.prompt, args.steps)
    if not words:
        raise InputError("--attention-maps needs a prompt with words to map")
    maps = WordMaps(batch_size=args.batch, count=len(words))
    with recorded_cross_attention(pipe.unet, sink=maps):
        result = run(step)
    path = args.attention_maps
    partial = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.partial")
    attention_sheet(result.images[0], maps.mean(), words).save(partial, format="PNG")
    os.replace(partial, path)
    print(f"wrote {path}")
    return result


def denoising_steps(args) -> int:
    from ..pipelines.checks import check_strength

    check_strength(args.strength)
    return min(int(args.steps * args.strength), args.steps)


def cmd_img2img(args) -> int:
    from ..pipelines.images import load_image, resize_mode_key

    apply_params_from(args)
    prepare_generation(args)
    check_image_file(args.init, "init image")
    started = time.perf_counter()
    size = args.size or image_size(args.init, "init image")  # the working size; rounding only shrinks it
    sizes = lambda config: [size]  # noqa: E731
    checked = refuse_too_large(args, "txt2img", sizes)  # before the image's pixels are decoded
    image = load_image(args.init, "init image")  # bad input fails before the model loads
    resize_mode_key(args.resize_mode)
    steps = denoising_steps(args)
    pipe = load_for(args, sizes=sizes, checked=checked)
    return run_and_save(args, started, lambda step: pipe.img2img(
        args.prompt, image, args.negative, strength=args.strength, resize_mode=args.resize_mode, callback=step,
        **generation_kwargs(args)), steps)


def cmd_inpaint(args) -> int:
    import warnings

    from ..pipelines.images import load_image, load_mask, resize_mode_key

    apply_params_from(args)
    prepare_generation(args)
    check_image_file(args.init, "init image")
    check_image_file(args.mask, "mask")
    started = time.perf_counter()
    size = args.size or image_size(args.init, "init image")

    def sizes(config):
        return [args.size or (config.resolution, config.resolution)] if args.only_masked else [size]

    checked = refuse_too_large(args, "inpaint", sizes)
    image = load_image(args.init, "init image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mask = load_mask(args.mask, image.size)
    for warning in caught:
        print(f"sdlab: warning: {warning.message}", file=sys.stderr)
    resize_mode_key(args.resize_mode)
    steps = denoising_steps(args)
    pipe = load_for(args, "inpaint", sizes, checked)
    return run_and_save(args, started, lambda step: pipe.inpaint(
        args.prompt, image, mask, args.negative, strength=args.strength, mask_blur=args.mask_blur,
        only_masked=args.only_masked, padding=args.padding, fill=args.fill, invert_mask=args.invert_mask,
        resize_mode=args.resize_mode, callback=step, **generation_kwargs(args)), steps)


def cmd_outpaint(args) -> int:
    from ..pipelines.images import load_image
    from ..pipelines.outpaint import parse_extend, round_canvas

    prepare_generation(args)
    if args.size:
        raise InputError("outpaint takes its size from the image and --extend; leave out --size")
    check_image_file(args.init, "init image")
    started = time.perf_counter()
    extend = parse_extend(args.extend)
    init_size = image_size(args.init, "init image")

    def sizes(config):
        sides = round_canvas(init_size, extend, config.vae.downsample_factor)
        return [(init_size[0] + sides["left"] + sides["right"], init_size[1] + sides["top"] + sides["bottom"])]

    checked = refuse_too_large(args, "txt2img", sizes)  # before the image and its canvas are allocated
    image = load_image(args.init, "init image")
    steps = denoising_steps(args)
    pipe = load_for(args, sizes=sizes, checked=checked)
    options = generation_kwargs(args)
    del options["width"], options["height"]
    return run_and_save(args, started, lambda step: pipe.outpaint(
        args.prompt, image, args.negative, extend=extend, overlap=args.overlap, strength=args.strength,
        mask_blur=args.mask_blur, fill=args.fill, callback=step, **options), steps)
