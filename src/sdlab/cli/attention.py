"""`sdlab attention "PROMPT" -o maps.png`: where each word of the prompt is read, per word, over chosen
sampling steps and UNet levels, and the per-step maps as an animation."""

from __future__ import annotations

import os
import sys
import time

from ..config import DEFAULT_SAMPLER
from ..errors import InputError
from .common import guidance_scale, load_for, parse_size, progress_callback
from .sizing import add_limit_options
from .saving import check_writable_file

LAYERS = {"down": ("down",), "mid": ("mid",), "up": ("up",), "all": ("down", "mid", "up")}


def add_attention_command(commands) -> None:
    parser = commands.add_parser("attention", help="heat maps of where each word of a prompt is read")
    parser.add_argument("prompt", help="the prompt to draw and map")
    parser.add_argument("-o", "--output", required=True, metavar="PNG", help="the sheet: the picture, one map per word")
    parser.add_argument("--words", default=None, metavar="W1,W2",
                        help="the words to map, comma-separated (default: every token of the prompt)")
    parser.add_argument("--steps", dest="step_window", default=":", metavar="A:B",
                        help="the sampling steps to average, 0-based, B excluded, either side open (default: all)")
    parser.add_argument("--layers", choices=tuple(LAYERS), default="all",
                        help="the UNet's down, middle or up blocks, or all (default all)")
    parser.add_argument("--overlay", action="store_true", help="draw each map over the picture")
    parser.add_argument("--animation", default=None, metavar="WEBP_OR_GIF",
                        help="also write the maps of each step as an animation (.webp or .gif)")
    parser.add_argument("--sampling-steps", dest="steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: random, printed)")
    parser.add_argument("--cfg", type=guidance_scale, default=7.0, help="classifier-free guidance scale (default 7)")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, help=f"sampler name (default: {DEFAULT_SAMPLER})")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--size", type=parse_size, default=None, help="WIDTHxHEIGHT (default: the model's)")
    parser.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: detected)")
    parser.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: fastest safe for the device)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_limit_options(parser)
    parser.set_defaults(run=cmd_attention, prediction=None, vae=None, embedding=[], batch=1)


def step_range(text: str, steps: int) -> range:
    """`--steps A:B` as a range of 0-based sampling steps within `steps`."""
    start, sep, stop = text.partition(":")
    try:
        first = int(start) if start.strip() else 0
        last = int(stop) if stop.strip() else steps
    except ValueError:
        first = last = None
    if not sep or first is None or not 0 <= first < last <= steps:
        raise InputError(f"--steps takes A:B with 0 <= A < B <= {steps} (the sampling steps), got '{text}'")
    return range(first, last)


def chosen_words(prompt: str, words_option, steps: int) -> tuple[list[str], list[list[int]]]:
    """The labels of the maps to draw and, for each, the token indices (0 = the first word) it sums."""
    from ..inside.attention_maps import prompt_words, word_positions
    from ..prompts import tokenize_weighted
    from ..tokenizer import END_ID, get_tokenizer

    tokens = prompt_words(prompt, steps)
    if not tokens:
        raise InputError("sdlab attention needs a prompt with words to map")
    if words_option is None:
        return tokens, [[i] for i in range(len(tokens))]
    ids = tokenize_weighted(prompt, get_tokenizer())[0].ids[1:]
    ids = ids[:ids.index(END_ID)] if END_ID in ids else ids
    words = [w.strip() for w in words_option.split(",") if w.strip()]
    if not words:
        raise InputError("--words takes words of the prompt, comma-separated, e.g. --words red,circle")
    return words, [[p - 1 for p in word_positions(word, ids, "--words")] for word in words]


def cmd_attention(args) -> int:
    import torch

    from ..inside.attention_maps import StepMaps, attention_sheet
    from ..models.attention import attention_hooks
    from ..outputs import save_image

    if not args.output.lower().endswith(".png"):
        raise InputError(f"-o must be a .png file, got '{args.output}'")
    check_writable_file(args.output)
    if args.animation is not None:
        if os.path.splitext(args.animation)[1].lower() not in (".webp", ".gif"):
            raise InputError(f"--animation must be a .webp or .gif file, got '{args.animation}'")
        check_writable_file(args.animation)
    if args.steps < 1:
        raise InputError(f"--sampling-steps must be 1 or more, got {args.steps}")
    steps = step_range(args.step_window, args.steps)
    words, token_groups = chosen_words(args.prompt, args.words, args.steps)
    count = max(i for group in token_groups for i in group) + 1
    started = time.perf_counter()
    pipe = load_for(args)
    recorder = StepMaps(batch_size=1, count=count, steps=steps)
    step, close = progress_callback(args.steps, args.quiet)

    def callback(info):
        recorder.advance(info)
        if step is not None:
            step(info)

    width, height = args.size or (None, None)
    try:
        with attention_hooks(pipe.unet, recorder, places=LAYERS[args.layers]):
            result = pipe.txt2img(args.prompt, args.negative, steps=args.steps, guidance_scale=args.cfg,
                                  seed=args.seed, sampler=args.sampler, width=width, height=height, callback=callback)
    finally:
        close()
    if not recorder.per_step:
        raise InputError(f"the model has no cross-attention in the --layers {args.layers} blocks; try --layers all")

    def word_maps(maps: torch.Tensor) -> torch.Tensor:
        return torch.stack([maps[group].sum(0) for group in token_groups])

    image = result.images[0]
    sheet = attention_sheet(image, word_maps(recorder.mean()), words, overlay=args.overlay)
    written = [save_image(sheet, args.output, result.infotexts[0])]
    if args.animation is not None:
        frames = [attention_sheet(image, word_maps(maps.mean()), words, overlay=args.overlay)
                  for _, maps in sorted(recorder.per_step.items())]
        written.append(save_animation(frames, args.animation))
    for path in written:
        print(f"wrote {path}")
    print(f"seed {result.seeds[0]}, {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0


def save_animation(frames, path: str, frame_ms: int = 250) -> str:
    """The frames as an animated WebP or GIF (by the extension), written to a temporary file, then renamed."""
    fmt = "GIF" if path.lower().endswith(".gif") else "WEBP"
    partial = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.partial")
    try:
        frames[0].save(partial, format=fmt, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path
