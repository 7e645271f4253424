"""`sdlab noise`, `schedule`, `latents` and `interpolate`: pictures of what happens inside the model
(sdlab/inside/). Each checks its input and output before the model loads and writes atomically."""

from __future__ import annotations

import os

from ..errors import InputError
from .common import check_image_file
from .saving import check_writable_file


def add_inside_commands(commands) -> None:
    """Register noise, schedule, latents and interpolate on sdlab's subcommands."""
    noise = commands.add_parser("noise", help="an image noised by the model's schedule at chosen timesteps")
    noise.add_argument("image", help="the image to noise (PNG, JPEG, WebP)")
    noise.add_argument("--at", default="0,100,250,500,750,999",
                       help="timesteps, comma-separated, from 0 to the schedule's last (default 0,100,250,500,750,999)")
    noise.add_argument("-o", "--output", required=True, metavar="PNG", help="the strip to write (.png)")
    noise.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    add_model_options(noise)
    noise.set_defaults(run=cmd_noise)

    schedule = commands.add_parser("schedule", help="plot the noise schedule and the sigmas samplers walk")
    schedule.add_argument("-o", "--output", required=True, metavar="PNG", help="the plot to write (.png)")
    schedule.add_argument("--steps", type=int, default=20, help="sampling steps for the samplers' panel (default 20)")
    add_model_options(schedule)
    schedule.set_defaults(run=cmd_schedule)

    latents = commands.add_parser("latents", help="an image's latent channels as pictures, and its decoded latent")
    latents.add_argument("image", help="the image to encode (PNG, JPEG, WebP)")
    latents.add_argument("-o", "--output", required=True, metavar="PNG", help="the picture to write (.png)")
    add_model_options(latents)
    latents.set_defaults(run=cmd_latents)

    interpolate = commands.add_parser("interpolate", help="images along a walk between two seeds or two prompts")
    walk = interpolate.add_mutually_exclusive_group(required=True)
    walk.add_argument("--seeds", help="two seeds, like 1,2: their starting noises slerped (with --prompt)")
    walk.add_argument("--prompts", nargs=2, metavar=("A", "B"), help="two prompts: their encodings mixed linearly")
    interpolate.add_argument("--prompt", dest="seeds_prompt", default=None, help="with --seeds: the prompt of every frame (needed)")
    interpolate.add_argument("--frames", type=int, default=8, help="images along the walk, 2 or more (default 8)")
    interpolate.add_argument("--seed", type=int, default=None, help="with --prompts: the seed of every frame (default 0)")
    interpolate.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    interpolate.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale (default 7)")
    interpolate.add_argument("--sampler", default=None, help="sampler name (default: sdlab's default)")
    interpolate.add_argument("-o", "--output", required=True, metavar="PNG", help="the strip to write (.png)")
    add_model_options(interpolate)
    interpolate.set_defaults(run=cmd_interpolate)


def add_model_options(parser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint file, diffusers folder or 'demo' (default: bundled)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: detected)")


def check_png_output(path: str) -> None:
    if not path.lower().endswith(".png"):
        raise InputError(f"-o must be a .png file, got '{path}'")
    check_writable_file(path)


def load_model(args):
    from .. import load

    return load(args.model, device=args.device)


def cmd_noise(args) -> int:
    from ..inside.forward_noise import forward_noise, noise_strip_picture, parse_timesteps
    from ..outputs import save_image
    from ..pipelines.images import load_image

    check_png_output(args.output)
    check_image_file(args.image, "image")
    image = load_image(args.image, "image")  # an unreadable image fails before the model loads
    parse_timesteps(args.at, 1000)  # the syntax; the model's own range is checked once it loads
    pipe = load_model(args)
    timesteps = parse_timesteps(args.at, pipe.config.schedule.num_train_timesteps)
    strip = forward_noise(pipe, image, timesteps, seed=args.seed)
    print(f"wrote {save_image(noise_strip_picture(strip), args.output)}")
    return 0


def cmd_schedule(args) -> int:
    from ..inside.schedule_plot import schedule_plot
    from ..outputs import save_image

    check_png_output(args.output)
    if args.steps < 2:
        raise InputError(f"--steps must be 2 or more, got {args.steps}")
    pipe = load_model(args)
    print(f"wrote {save_image(schedule_plot(pipe.config.schedule, args.steps), args.output)}")
    return 0


def cmd_latents(args) -> int:
    from ..inside.latents import latent_channels_picture
    from ..outputs import save_image
    from ..pipelines.images import load_image

    check_png_output(args.output)
    check_image_file(args.image, "image")
    image = load_image(args.image, "image")
    pipe = load_model(args)
    print(f"wrote {save_image(latent_channels_picture(pipe, image), args.output)}")
    return 0


def parse_seed_pair(text: str) -> tuple[int, int]:
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        seeds = ()
    if len(seeds) != 2:
        raise InputError(f"--seeds takes two whole numbers separated by a comma, like 1,2, got '{text}'")
    return seeds


def cmd_interpolate(args) -> int:
    from ..inside.latents import fractions, interpolate_prompts, interpolate_seeds, interpolation_strip
    from ..outputs import save_image

    check_png_output(args.output)
    fractions(args.frames)
    seeds = parse_seed_pair(args.seeds) if args.seeds else None
    if seeds and args.seeds_prompt is None:
        raise InputError('--seeds needs --prompt "...": the prompt every frame draws, from each seed\'s noise')
    if seeds and args.seed is not None:
        raise InputError("--seed goes with --prompts; with --seeds the two seeds are the walk's ends")
    if not seeds and args.seeds_prompt is not None:
        raise InputError("--prompt goes with --seeds; --prompts gives the walk's two prompts")
    if args.steps < 1:
        raise InputError(f"--steps must be 1 or more, got {args.steps}")
    pipe = load_model(args)
    settings = dict(steps=args.steps, guidance_scale=args.cfg)
    if args.sampler:
        settings["sampler"] = args.sampler
    if seeds:
        images = interpolate_seeds(pipe, args.seeds_prompt, seeds, args.frames, **settings)
        strip = interpolation_strip(images, f"seed {seeds[0]}", f"seed {seeds[1]} (slerp)")
    else:
        images = interpolate_prompts(pipe, tuple(args.prompts), args.frames, seed=args.seed or 0, **settings)
        strip = interpolation_strip(images, f"'{args.prompts[0]}'", f"'{args.prompts[1]}' (text embeddings)")
    print(f"wrote {save_image(strip, args.output)}")
    return 0
